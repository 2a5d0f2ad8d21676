"""The paper's validation loss (section 5.3.3, appendix B.3): the loss at fixed t levels over
fixed examples with fixed noise, comparable across runs, batch sizes and restarts; and the
formulation-independent yardstick.

The levels are rectified flow's t grid. A formulation is evaluated at the same noise levels,
found in its own time at equal log-SNR (``level_times``), so that z_t is rf's z_t up to a scale:

  val/loss       the formulation's own loss (its target and weighting) at those levels, the
                 mean over all but t = 1; for rf exactly the paper's validation loss
  val/rf_loss    the yardstick: its outputs converted to the rf velocity eps - x0 and scored
                 with rf's unweighted loss at the interior levels 0 < t < 1, the same number
                 for every formulation (for rf: the mean of its interior val/loss levels)

t = 0 and t = 1 are infinite and zero SNR: EDM cannot take them (sigma = 0 or infinite), eps-
prediction cannot give x0 at zero SNR, and LDM's discrete schedule covers only log-SNR from
about -5.4 to 7.1 (rf t from about 0.029 to 0.936). Levels a formulation does not cover are not
evaluated; the yardstick's mean is logged only when every interior level is covered (always
with the default 8 levels).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sd3_jax.flow.formulations import Formulation
from sd3_jax.flow.paths import RectifiedPath
from sd3_jax.flow.rectified import velocity_target

Array = jax.Array
ArrayLike = Any


def val_t_levels(n: int = 8) -> Array:
  """The paper's validation grid: n equally spaced t in [0, 1] including both ends (float32)."""
  if n < 2:
    raise ValueError(f"need at least 2 validation levels, got {n}")
  return jnp.linspace(0.0, 1.0, n, dtype=jnp.float32)


def fixed_validation_noise(seed: int, example_ids: ArrayLike, shape: Sequence[int], dtype: Any = jnp.float32) -> Array:
  """Noise [len(example_ids), *shape] where row i depends only on (seed, example_ids[i], shape).

  Each row uses key fold_in(key(seed), id), so the noise of an example is the same whatever
  batch, batch size, process count, model or restart it is evaluated in. ids must be integers
  in [0, 2^32); padding rows (id -1) wrap around and get some valid noise (mask them out).
  """
  if not isinstance(example_ids, jax.Array):  # host ids (int64 from the pipeline): wrap in numpy
    example_ids = np.asarray(example_ids)
    if example_ids.size and np.issubdtype(example_ids.dtype, np.integer) and example_ids.max() >= 2**32:
      raise ValueError(f"example ids must be < 2^32, got {example_ids.max()}")
    if np.issubdtype(example_ids.dtype, np.integer):
      example_ids = example_ids.astype(np.int64).astype(np.uint32)  # -1 -> 2^32 - 1
  if not jnp.issubdtype(example_ids.dtype, jnp.integer) or example_ids.ndim != 1:
    raise ValueError(f"example_ids must be a 1-D integer array, got {example_ids.dtype}{list(example_ids.shape)}")
  base = jax.random.key(seed)
  ids = jnp.asarray(example_ids).astype(jnp.uint32)
  keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(ids)
  return jax.vmap(lambda k: jax.random.normal(k, tuple(shape), dtype))(keys)


def summarize_validation(
  per_level: ArrayLike, levels: ArrayLike | None = None, prefix: str = "val"
) -> dict[str, float]:
  """Per-level values plus the paper's summary: the mean over all levels except t = 1.

  "We average the loss across all but the last (t = 1) levels" ([P] App. B.3). The OCR is
  ambiguous about t = 0; we INCLUDE it and exclude only t = 1. Neither end measures model
  quality much: at t = 1 (z = eps) the best prediction is eps - E[x0 | text], leaving the data
  variance; at t = 0 (z = x0) the noise is unpredictable, so the loss is at least
  E[eps^2] = 1 per element; including it adds a near-constant offset.

  Args:
    per_level: [n_levels] mean losses (e.g. own sums / count from ``loss_sums``).
    levels: the t of each entry; defaults to ``val_t_levels(len(per_level))``. Levels equal to 1
      are left out of the mean (with the default grid: exactly the last one).
  Returns: {f'{prefix}/loss_t{t:.3f}': value for each level} and f'{prefix}/loss' (the mean).
  """
  per_level = np.asarray(per_level, np.float64)
  levels = np.asarray(val_t_levels(len(per_level)) if levels is None else levels, np.float64)
  if per_level.ndim != 1 or per_level.shape != levels.shape:
    raise ValueError(f"per_level {per_level.shape} and levels {levels.shape} must be equal 1-D")
  keep = levels < 1.0
  if not keep.any():
    raise ValueError("no validation level below t = 1 to average")
  out = {f"{prefix}/loss_t{t:.3f}": float(v) for t, v in zip(levels, per_level)}
  out[f"{prefix}/loss"] = float(per_level[keep].mean())
  return out


def level_times(f: Formulation, levels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
  """(own t [L] float32, covered [L] bool): rf's levels at equal log-SNR in ``f``'s own time,
  and which of them ``f`` covers (uncovered entries hold 0)."""
  levels = np.asarray(levels, np.float64)
  if f.is_rectified:
    return levels.astype(np.float32), np.ones(levels.shape, bool)
  with np.errstate(divide="ignore"):
    lam = RectifiedPath().log_snr(levels)
  covered = f.path.covers(lam)
  own = np.where(covered, f.t_of_log_snr(np.where(covered, lam, 0.0)), 0.0).astype(np.float32)
  # The network side works in float32 t: a level whose t does not survive that (EDM's far tail,
  # where t rounds to 1) is not covered either.
  with np.errstate(divide="ignore", invalid="ignore"):
    back = f.log_snr(own.astype(np.float64))
    close = np.abs(back - lam) <= 1e-3 * np.maximum(1.0, np.abs(lam))
  covered &= np.where(np.isinf(lam), back == lam, np.isfinite(back) & close)
  return np.where(covered, own, 0.0).astype(np.float32), covered


def loss_sums(
  predict_fn: Callable[[Array, Array], Array],
  f: Formulation,
  x0: Array,
  eps: Array,
  own_t: ArrayLike,
  mask: ArrayLike | None = None,
) -> tuple[Array, Array, Array]:
  """Per-level SUMS of per-example losses: (own loss [L], rf yardstick loss [L], example count).

  predict_fn(network input [B, ...], time input [B]) -> network output; ``own_t`` are the
  levels in f's time (``level_times``); every level uses the same eps. Sums and counts add up
  exactly over batches and processes. mask [B] (1 = real example, 0 = padding) weights
  examples. For rf the two sums are the same numbers.
  """
  own_t = jnp.asarray(own_t, jnp.float32)
  b = x0.shape[0]
  w = jnp.ones((b,), jnp.float32) if mask is None else jnp.asarray(mask).astype(jnp.float32)
  x0 = x0.astype(jnp.float32)

  def one_level(t):
    tb = jnp.full((b,), t, jnp.float32)
    z = f.noised(x0, eps, tb)
    out = predict_fn(f.model_input(z, tb), f.time_input(tb))
    own = jnp.sum(w * f.loss(out, x0, eps, tb))
    if f.is_rectified:
      return own, own
    err = f.rf_velocity(out, z, tb) - velocity_target(x0, eps)
    rf = jnp.mean(jnp.square(err), axis=tuple(range(1, err.ndim)))
    return own, jnp.sum(w * rf)

  own, rf = jax.lax.map(one_level, own_t)  # traces predict_fn once
  return own, rf, jnp.sum(w)


def summarize_yardstick(
  per_level: ArrayLike, levels: ArrayLike, grid: ArrayLike, prefix: str = "val"
) -> dict[str, float]:
  """{prefix}/rf_loss_t... at every interior level evaluated, and {prefix}/rf_loss, their mean,
  when ``levels`` (those evaluated) include every interior level of ``grid``."""
  per_level, levels, grid = (np.asarray(a, np.float64) for a in (per_level, levels, grid))
  interior = (levels > 0.0) & (levels < 1.0)
  out = {f"{prefix}/rf_loss_t{t:.3f}": float(v) for t, v in zip(levels[interior], per_level[interior])}
  wanted = grid[(grid > 0.0) & (grid < 1.0)]
  if len(wanted) and np.all(np.isin(wanted, levels[interior])):
    out[f"{prefix}/rf_loss"] = float(per_level[interior].mean())
  return out
