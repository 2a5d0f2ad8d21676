"""The trainer with every formulation: the default is today's rectified flow bit for bit, each of
the paper's formulations trains (its loss falls) through the real jitted step, and one run of
the real loop (gradient accumulation, EMA, validation with the yardstick) samples afterwards
with its own formulation."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from sd3_jax import config as config_lib
from sd3_jax import flow, sharding
from sd3_jax.flow import conditioning, levels, rectified
from sd3_jax.inference import sampling
from sd3_jax.models import mmdit
from sd3_jax.storage import checkpoint
from sd3_jax.training import optimizer, state as state_lib, step as step_lib, train

# Each trains through the real jitted step here; edm/cos trains through the whole loop below.
STEP_TRAINED = ("eps/linear", "v/linear", "eps/cos", "v/cos", "edm(-1.20,1.20)", "edm/rf")


def _config(formulation=flow.DEFAULT, **overrides):
  c = tiny.get_config()
  c.model.update(dict(depth=1, hidden_size=32, num_heads=2))
  c.flow.formulation = formulation
  c.optimizer.update(dict(learning_rate=3e-3, warmup_steps=5))
  for k, v in overrides.items():
    node = c
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return c


def _batches(c, n, seed=0):
  rng = np.random.default_rng(seed)
  d, b = c.data, c.global_batch_size
  # Structured latents (a per-channel mean and a smooth pattern): something to learn.
  base = rng.standard_normal((1, d.latent_size, d.latent_size, d.latent_channels)).astype(np.float32)
  return [
    dict(
      latent=(0.8 * base + 0.3 * rng.standard_normal((b,) + base.shape[1:])).astype(np.float32),
      context=rng.standard_normal((b, d.context_len, d.context_dim)).astype(np.float32),
      pooled=rng.standard_normal((b, d.pooled_dim)).astype(np.float32),
    )
    for _ in range(n)
  ]


def _todays_loss(params, model, ex):
  """The trainer's loss before formulations existed (training.step.rf_loss), for comparison."""
  z_t = rectified.noised(ex["x0"], ex["eps"], ex["t"])
  v = model.apply({"params": params}, z_t, ex["t"], ex["pooled"], ex["context"])
  per_example = rectified.per_example_loss(v, ex["x0"], ex["eps"])
  return jnp.sum(per_example), per_example


def test_default_formulation_is_todays_rectified_flow():
  c = _config(**{"flow.text_dropout": 0.3})
  model, opts = state_lib.make_model(c), step_lib.step_options(c)
  assert opts.formulation == flow.get_formulation("rf/lognorm(0.00,1.00)")
  params = mmdit.init_params(model, jax.random.key(0))
  rng = np.random.default_rng(1)  # every layer non-zero (adaLN-Zero starts at zero)
  params = jax.tree.map(lambda p: p + 0.02 * rng.standard_normal(p.shape, np.float32), params)
  batch = {k: jnp.asarray(v) for k, v in _batches(c, 1)[0].items()}
  rng = jax.random.key(3)
  ex = step_lib.sample_noise(batch, rng, opts)
  # today's sample_noise: the same keys, logit-normal(0, 1) t, the same dropout
  k_t, k_eps, k_drop = jax.random.split(rng, 3)
  np.testing.assert_array_equal(ex["t"], rectified.sample_t(k_t, (c.global_batch_size,), "logit_normal", m=0.0, s=1.0))
  np.testing.assert_array_equal(ex["eps"], jax.random.normal(k_eps, batch["latent"].shape, jnp.float32))
  layout = conditioning.TextLayout(c.text.clip_l_dim, c.text.clip_g_dim, c.text.clip_tokens)
  want = conditioning.drop_text_conditioning(k_drop, batch["context"], batch["pooled"], 0.3, layout)
  np.testing.assert_array_equal(ex["context"], want[0])
  # the same operations, so the same numbers (and the same gradients)
  l_new, pe_new = jax.jit(step_lib.formulation_loss, static_argnums=(1, 2))(params, model, opts.formulation, ex)
  l_old, pe_old = jax.jit(_todays_loss, static_argnums=(1,))(params, model, ex)
  np.testing.assert_array_equal(pe_new, pe_old)
  np.testing.assert_array_equal(l_new, l_old)


def _train(c, batches, steps):
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  model, tx, opts = state_lib.make_model(c), optimizer.make_optimizer(c), step_lib.step_options(c)
  _, shardings = state_lib.state_shardings(model, tx, mesh)
  state = state_lib.create_sharded_state(model, tx, mesh, jax.random.key(c.seed), shardings)
  schedule = optimizer.learning_rate_schedule(c.optimizer, c.total_steps)
  step = step_lib.make_train_step(
    model, tx, opts, schedule, mesh, shardings, {k: v.shape for k, v in batches[0].items()}
  )
  losses = []
  for i in range(steps):
    state, out = step(state, sharding.make_global_batch(batches[i % len(batches)], mesh), jax.random.key(1))
    losses.append(float(out["loss"]))
  return np.array(losses)


@pytest.mark.parametrize("name", STEP_TRAINED)
def test_each_formulation_trains(name):
  c = _config(name, **{"ema.every": 1, "flow.text_dropout": 0.0})
  losses = _train(c, _batches(c, 4), 60)
  assert np.all(np.isfinite(losses))
  # per-step losses are noisy (t is random): compare the means of the first and last 15 steps
  assert losses[-15:].mean() < 0.85 * losses[:15].mean(), (name, losses[:15].mean(), losses[-15:].mean())


def test_shift_and_retired_keys_are_refused_at_start(tmp_path):
  with pytest.raises(ValueError, match="rectified-flow formulations"):
    train.train_and_evaluate(_config("eps/cos", **{"flow.shift": 3.0}), str(tmp_path / "a"))
  c = _config()
  c.flow.sampler = "uniform"
  with pytest.raises(ValueError, match=r"flow.sampler is retired.*flow.formulation='rf'"):
    train.train_and_evaluate(c, str(tmp_path / "b"))
  with pytest.raises(ValueError, match="unknown formulation 'v/cosine'"):
    train.train_and_evaluate(_config("v/cosine"), str(tmp_path / "c"))


def test_loop_with_a_formulation_validates_and_samples(tmp_path):
  workdir = str(tmp_path / "run")
  c = _config(
    "edm/cos",
    global_batch_size=16,
    total_steps=45,
    log_every=15,
    checkpoint_every=45,
    grad_accum_steps=2,
    **{"ema.every": 1, "val.every": 45, "val.num_examples": 8, "data.prefetch": 0, "data.num_synthetic": 64},
  )
  last = train.train_and_evaluate(c, workdir)
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  train_losses = [r["loss"] for r in rows if "loss" in r]  # means over 15 steps each
  # random synthetic latents leave less to learn than the structured batches above
  assert len(train_losses) == 3 and train_losses[-1] < 0.92 * train_losses[0], train_losses
  val = [r for r in rows if "val/loss" in r][-1]
  assert np.isfinite(val["val/rf_loss"]) and np.isfinite(val["val/loss"]) and last["val/rf_loss"] == val["val/rf_loss"]
  grid = np.asarray(levels.val_t_levels(8))
  assert {f"val/rf_loss_t{t:.3f}" for t in grid[1:-1]} <= set(val)
  assert "val/loss_t0.000" not in val and "val/loss_t1.000" not in val  # EDM cannot take them
  # sampling from the run with its own formulation (read from the saved config), with CFG
  model, params, config, _ = checkpoint.load_workdir(workdir)
  f = flow.get_formulation(config_lib.formulation_name(config))
  assert f.name == "edm/cos"
  d = c.data
  ctx = jax.random.normal(jax.random.key(0), (2, d.context_len, d.context_dim))
  pooled = jax.random.normal(jax.random.key(1), (2, d.pooled_dim))
  kw = dict(rng=jax.random.key(2), latent_shape=(d.latent_size, d.latent_size, d.latent_channels), cfg_scale=2.0)
  out = sampling.sample(model, params, ctx, pooled, ctx[:1] * 0, pooled[:1] * 0, num_steps=4, formulation=f, **kw)
  assert out.shape == (2, d.latent_size, d.latent_size, d.latent_channels) and np.all(np.isfinite(out))
