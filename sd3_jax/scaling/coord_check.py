"""The muP coordinate check (Yang et al. 2022, "Tensor Programs V"; the mup package's coord check):
train a few steps at several widths and measure, for every layer, the size of its output
(mean |h|) and how far the updates have moved it (mean |h_t - h_0|), on one fixed batch.

Under muP both stay flat as the width grows; under SP the updates' effect grows with width
(each hidden Adam step changes a layer's output by about lr x width). ``slopes`` fits log size
against log width per layer; a correct muP has slopes near 0 everywhere. The widths vary the
hidden size at a fixed number of heads, so the head dimension (and muP's attention scale) grows
too; muP's base width is the smallest width, where muP and SP are the same model.

``python -m sd3_jax.scaling coord_check --config configs/tiny.py --out DIR`` plots it.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

log = logging.getLogger(__name__)

# A few steps per width: compiling dominates, and XLA's unoptimised CPU code halves it.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def width_config(config: ml_collections.ConfigDict, width: int, parametrization: str, base_width: int):
  """``config`` at hidden size ``width`` (heads unchanged) under ``parametrization``, with a
  constant learning rate from the first step (the check is about the update rule)."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.model.hidden_size = width
  c.model.parametrization = parametrization
  c.model.mup_base_width = base_width
  c.model.mup_base_head_dim = None
  c.update(dict(dtype="float32", remat="none", scan_layers=False, attention_impl="xla"))
  c.optimizer.update(dict(schedule="constant", warmup_steps=0))
  return c


def _layers(intermediates) -> dict[str, jax.Array]:
  """Every captured module output, named by its module path ('joint_blocks_0/x_block/attn/qkv')."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(intermediates)[0]:
    names = [str(getattr(k, "key", "")) for k in path if getattr(k, "key", "__call__") != "__call__"]
    index = [str(k.idx) for k in path if hasattr(k, "idx")][1:]  # [0] is the call number
    out["/".join(names) + (f"[{'.'.join(index)}]" if index else "") or "output"] = leaf
  return out


def coord_data(
  config: ml_collections.ConfigDict,
  widths: Sequence[int],
  parametrization: str,
  *,
  steps: int = 3,
  batch_size: int = 4,
  seed: int = 0,
) -> dict:
  """{'widths', 'act': {layer: [[size at t = 0..steps] per width]}, 'delta': {layer: [...]}}."""
  from sd3_jax.models import mmdit
  from sd3_jax.training import optimizer, state, step

  widths = sorted(int(w) for w in widths)
  d = config.data
  keys = jax.random.split(jax.random.key(seed), 6)
  x0 = jax.random.normal(keys[0], (batch_size, d.latent_size, d.latent_size, d.latent_channels))
  eps = jax.random.normal(keys[1], x0.shape)
  f = step.step_options(config).formulation  # the config's own loss (rectified flow by default)
  t = f.sample_t(keys[2], (batch_size,))
  pooled = jax.random.normal(keys[3], (batch_size, d.pooled_dim))
  context = jax.random.normal(keys[4], (batch_size, d.context_len, d.context_dim))
  z_t = f.noised(x0, eps, t)
  act: dict[str, list] = {}
  delta: dict[str, list] = {}
  size = lambda x: jnp.mean(jnp.abs(x.astype(jnp.float32)))  # noqa: E731
  for w in widths:
    cfg = width_config(config, w, parametrization, widths[0])
    model = state.make_model(cfg, platform="cpu")
    tx = optimizer.make_optimizer(cfg)

    def forward(p):
      inputs = (f.model_input(z_t, t), f.time_input(t), pooled, context)
      out, captured = model.apply({"params": p}, *inputs, capture_intermediates=True, mutable=["intermediates"])
      return jnp.mean(f.loss(out, x0, eps, t)), _layers(captured["intermediates"])

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def step(params, opt_state, first):
      """One update, and the sizes of every layer's output before it (and of its change since
      ``first``, the outputs before any update)."""
      (_, layers), grads = jax.value_and_grad(forward, has_aux=True)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      sizes = {n: size(h) for n, h in layers.items()}
      moved = {n: size(h - first[n]) for n, h in layers.items()}
      return jax.tree.map(jnp.add, params, updates), opt_state, layers, (sizes, moved)

    init = jax.jit(lambda k: (lambda p: (p, tx.init(p)))(mmdit.init_params(model, k)), compiler_options=FAST_COMPILE)
    params, opt_state = init(keys[5])
    first = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(forward, params)[1])
    measured = []
    for k in range(steps + 1):  # call k sees the parameters after k updates
      params, opt_state, layers, m = step(params, opt_state, first)
      first = layers if k == 0 else first
      measured.append(m)
    measured = jax.device_get(measured)
    for name in measured[0][0]:
      act.setdefault(name, []).append([float(a[name]) for a, _ in measured])
      delta.setdefault(name, []).append([0.0] + [float(d[name]) for _, d in measured[1:]])
    log.info("coord check %s width %d: %d layers", parametrization, w, len(measured[0][0]))
  return {"parametrization": parametrization, "widths": widths, "steps": steps, "act": act, "delta": delta}


def slopes(data: dict, step: int = -1) -> dict[str, dict[str, float]]:
  """Per layer, the least-squares slope of log size against log width at ``step`` (default the
  last), for the activations ('act') and the updates' effect ('delta'); layers whose size is 0 at
  some width (a zero-initialised output before any update) are left out."""
  x = np.log(np.asarray(data["widths"], np.float64))
  out: dict[str, dict[str, float]] = {}
  for kind in ("act", "delta"):
    for name, per_width in data[kind].items():
      y = np.asarray([s[step] for s in per_width], np.float64)
      if np.all(y > 0) and np.all(np.isfinite(y)):
        out.setdefault(name, {})[kind] = float(np.polyfit(x, np.log(y), 1)[0])
  return out


def summary(data: dict) -> dict:
  """The largest |slope| over layers, for activations and updates, and the layer it is at."""
  s = slopes(data)
  out = {}
  for kind in ("act", "delta"):
    found = [(abs(v[kind]), name) for name, v in s.items() if kind in v]
    worst, name = max(found) if found else (0.0, None)
    out[kind] = {"max_abs_slope": worst, "layer": name}
  return out


def plot(results: Sequence[dict], path: str) -> None:
  """One row per parametrization, columns: output size at t=0, after the last step, and the
  updates' effect; one line per layer against width (log-log)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(len(results), 3, figsize=(13, 3.8 * len(results)), dpi=100, squeeze=False)
  for row, data in zip(axes, results):
    panels = (("act", 0, "mean |h|, t = 0"), ("act", -1, f"mean |h|, t = {data['steps']}"))
    panels += (("delta", -1, f"mean |h_t - h_0|, t = {data['steps']}"),)
    for ax, (kind, step, title) in zip(row, panels):
      for values in data[kind].values():
        y = [v[step] for v in values]
        if all(v > 0 for v in y):
          ax.plot(data["widths"], y, "-", lw=0.8, alpha=0.7)
      ax.set_xscale("log", base=2)
      ax.set_yscale("log")
      ax.set_xlabel("width (hidden size)")
      worst = summary(data)[kind]["max_abs_slope"] if step == -1 else None
      ax.set_title(f"{data['parametrization']}: {title}" + (f" (max |slope| {worst:.2f})" if worst else ""), fontsize=9)
      ax.grid(alpha=0.3, which="both")
  device = jax.devices()[0]
  cores = f"{os.cpu_count()}-core CPU"
  machine = f"{cores}, no accelerator" if device.platform == "cpu" else f"{device.device_kind} ({cores} host)"
  fig.suptitle(f"coordinate check: one line per layer (flat = width-independent); measured on {machine}", fontsize=10)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
