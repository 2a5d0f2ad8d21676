"""Rectified-flow math for SD3 training (the paper, sections 2-3 and 5): everything
between data and model.

Conventions (the paper's, [P] s3): t in [0, 1], t = 0 is data and t = 1 is noise,
``z_t = (1 - t) x0 + t eps`` and the network predicts the velocity ``v = eps - x0``.
Sampling t from a density pi(t) and using an *unweighted* MSE is the paper's way of
weighting timesteps, so there is no loss weight here.

Everything is plain ``jnp`` with typed arguments and explicit RNG keys, usable inside ``jit``:

  sample_t / shift_t               training timesteps (logit-normal, mode, cosmap, uniform) + shift
  noised / velocity_target / per_example_loss / denoised
  TextLayout / assemble_conditioning / drop_text_conditioning   text conditioning layout and dropout
  val_t_levels / fixed_validation_noise / validation_loss_sums / validation_losses /
  summarize_validation            the paper's validation loss on a fixed t-grid with fixed noise
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
ArrayLike = Any

SAMPLERS = ("logit_normal", "mode", "cosmap", "uniform")


# ----------------------------------------------------------------------------- timesteps


def shift_t(t: ArrayLike, alpha: float) -> Array:
  """Resolution-dependent shift t -> alpha t / (1 + (alpha - 1) t) ([P] s5.3.2 eq. 23).

  Equivalently logit(t') = logit(t) + log(alpha) (a log-SNR shift of -2 log alpha). alpha > 1
  moves mass towards noise; alpha = 3 is the paper's choice at 1024^2 for training and sampling.
  Endpoints are fixed (0 -> 0, 1 -> 1) and the map is strictly increasing for alpha > 0.
  """
  if not alpha > 0:
    raise ValueError(f"shift alpha must be > 0, got {alpha}")
  t = jnp.asarray(t, jnp.float32)
  return alpha * t / (1.0 + (alpha - 1.0) * t)


def _mode_fn(u: Array, s: float) -> Array:
  # f_mode(u; s) = 1 - u - s (cos^2(pi u / 2) - 1 + u); decreasing in u, f(0) = 1, f(1) = 0.
  return 1.0 - u - s * (jnp.cos(0.5 * jnp.pi * u) ** 2 - 1.0 + u)


def sample_t(
  rng: Array,
  shape: int | Sequence[int],
  sampler: str = "logit_normal",
  *,
  m: float = 0.0,
  s: float = 1.0,
  mode_scale: float = 1.29,
  shift: float = 1.0,
) -> Array:
  """Training timesteps t in [0, 1] (float32), [P] s3.1, then ``shift_t(t, shift)``.

  Samplers:
    'logit_normal'  t = sigmoid(u), u ~ N(m, s)  (the paper's best: m=0, s=1)
    'mode'          t = f_mode(u; mode_scale), u ~ U(0, 1); heavy tails for mode_scale > 0
                    (valid for -1 <= mode_scale <= 2/(pi-2); 0 is uniform; the paper ranks 1.29)
    'cosmap'        t = 1 - 1/(tan(pi/2 u) + 1), u ~ U(0, 1); density 2/(pi(1 - 2t + 2t^2))
    'uniform'       t ~ U(0, 1)  (plain rectified flow)

  The endpoints are NOT clipped away: the RF loss has no 1/t or 1/(1-t) factor and the model
  takes t in [0, 1] including both ends, so an exact 0 or 1 (possible only by float rounding,
  at probability ~1e-7 or less) is a valid training input. 'mode' and 'cosmap' are clipped to
  [0, 1] purely as a guard against rounding just outside the interval.
  """
  shape = (shape,) if isinstance(shape, int) else tuple(shape)
  if sampler == "logit_normal":
    if not s > 0:
      raise ValueError(f"logit_normal needs s > 0, got {s}")
    t = jax.nn.sigmoid(m + s * jax.random.normal(rng, shape, jnp.float32))
  elif sampler == "mode":
    if not -1.0 <= mode_scale <= 2.0 / (math.pi - 2.0):
      raise ValueError(
        f"mode_scale must be in [-1, 2/(pi-2)] = [-1, {2 / (math.pi - 2):.4f}] for "
        f"f_mode to be monotone, got {mode_scale}"
      )
    t = jnp.clip(_mode_fn(jax.random.uniform(rng, shape, jnp.float32), mode_scale), 0.0, 1.0)
  elif sampler == "cosmap":
    u = jax.random.uniform(rng, shape, jnp.float32)
    t = jnp.clip(1.0 - 1.0 / (jnp.tan(0.5 * jnp.pi * u) + 1.0), 0.0, 1.0)
  elif sampler == "uniform":
    t = jax.random.uniform(rng, shape, jnp.float32)
  else:
    raise ValueError(f"unknown timestep sampler {sampler!r}; valid: {', '.join(SAMPLERS)}")
  return t if shift == 1.0 else shift_t(t, shift)


# ----------------------------------------------------------------------------- forward process / loss


def _bcast_t(t: ArrayLike, x: Array) -> Array:
  """t of shape [] or [B] -> broadcastable against x [B, ...]."""
  t = jnp.asarray(t, jnp.float32)
  if t.ndim == 0:
    return t
  if t.ndim != 1 or t.shape[0] != x.shape[0]:
    raise ValueError(f"t must be a scalar or [B] with B = {x.shape[0]}, got shape {t.shape}")
  return t.reshape((-1,) + (1,) * (x.ndim - 1))  # [B, 1, ..., 1]


def noised(x0: Array, eps: Array, t: ArrayLike) -> Array:
  """z_t = (1 - t) x0 + t eps with t [B] (or scalar) broadcast over x0 [B, ...]; float32."""
  tb = _bcast_t(t, x0)
  return (1.0 - tb) * x0.astype(jnp.float32) + tb * eps.astype(jnp.float32)


def velocity_target(x0: Array, eps: Array) -> Array:
  """The regression target u = eps - x0 (float32); independent of t."""
  return eps.astype(jnp.float32) - x0.astype(jnp.float32)


def denoised(z_t: Array, v: Array, t: ArrayLike) -> Array:
  """x0 estimate from a velocity: x0_hat = z_t - t v (exact for v = velocity_target)."""
  return z_t.astype(jnp.float32) - _bcast_t(t, z_t) * v.astype(jnp.float32)


def per_example_loss(v_pred: Array, x0: Array, eps: Array) -> Array:
  """Unweighted MSE ||v_pred - (eps - x0)||^2 averaged over non-batch axes, in float32: [B]."""
  err = v_pred.astype(jnp.float32) - velocity_target(x0, eps)
  return jnp.mean(jnp.square(err), axis=tuple(range(1, err.ndim)))


# ----------------------------------------------------------------------------- text conditioning


@dataclasses.dataclass(frozen=True)
class TextLayout:
  """Where each text encoder lives in ``context`` [B, L, D] and ``pooled`` [B, P] (docs/sampling.md).

  context[:, :clip_tokens, :clip_l_dim]                       CLIP-L tokens
  context[:, :clip_tokens, clip_l_dim:clip_l_dim+clip_g_dim]  CLIP-G tokens (rest: zero padding)
  context[:, clip_tokens:, :]                                 T5 tokens
  pooled[:, :clip_l_dim] / pooled[:, clip_l_dim:]             CLIP-L / CLIP-G pooled
  """

  clip_l_dim: int = 768
  clip_g_dim: int = 1280
  clip_tokens: int = 77

  @property
  def pooled_dim(self) -> int:
    return self.clip_l_dim + self.clip_g_dim


def assemble_conditioning(
  clip_l_seq: ArrayLike,
  clip_g_seq: ArrayLike,
  t5_seq: ArrayLike,
  clip_l_pooled: ArrayLike,
  clip_g_pooled: ArrayLike,
  context_dim: int = 4096,
) -> tuple[Array, Array]:
  """Reference assembly of the MM-DiT text inputs (sd3.5 reference code, ``sd3_infer.py``).

  Args: clip_l_seq [..., Tc, Dl], clip_g_seq [..., Tc, Dg], t5_seq [..., Tt, context_dim],
    clip_l_pooled [..., Dl], clip_g_pooled [..., Dg] (leading batch axes shared).
  Returns: context [..., Tc + Tt, context_dim] = [CLIP-L | CLIP-G | zeros] tokens then T5 tokens
    (CLIP first), and pooled [..., Dl + Dg] = CLIP-L pooled | CLIP-G pooled. Dtype is the
    promoted input dtype.
  """
  clip_l_seq, clip_g_seq, t5_seq = map(jnp.asarray, (clip_l_seq, clip_g_seq, t5_seq))
  clip_l_pooled, clip_g_pooled = jnp.asarray(clip_l_pooled), jnp.asarray(clip_g_pooled)
  if clip_l_seq.shape[:-1] != clip_g_seq.shape[:-1]:
    raise ValueError(
      f"CLIP-L and CLIP-G sequences must share batch and token axes, got {clip_l_seq.shape} and {clip_g_seq.shape}"
    )
  clip_width = clip_l_seq.shape[-1] + clip_g_seq.shape[-1]
  if clip_width > context_dim:
    raise ValueError(f"CLIP-L + CLIP-G width {clip_width} exceeds context_dim {context_dim}")
  if t5_seq.shape[-1] != context_dim or t5_seq.shape[:-2] != clip_l_seq.shape[:-2]:
    raise ValueError(
      f"t5_seq must be [..., T, {context_dim}] with batch axes {clip_l_seq.shape[:-2]}, got {t5_seq.shape}"
    )
  if (
    clip_l_pooled.shape[-1] != clip_l_seq.shape[-1]
    or clip_g_pooled.shape[-1] != clip_g_seq.shape[-1]
    or clip_l_pooled.shape[:-1] != clip_l_seq.shape[:-2]
    or clip_g_pooled.shape[:-1] != clip_g_seq.shape[:-2]
  ):
    raise ValueError(
      f"pooled shapes {clip_l_pooled.shape}, {clip_g_pooled.shape} do not match the "
      f"sequences {clip_l_seq.shape}, {clip_g_seq.shape}"
    )
  dtype = jnp.result_type(clip_l_seq, clip_g_seq, t5_seq)
  clip = jnp.concatenate([clip_l_seq, clip_g_seq], axis=-1).astype(dtype)  # [..., Tc, Dl+Dg]
  pad = [(0, 0)] * (clip.ndim - 1) + [(0, context_dim - clip_width)]
  context = jnp.concatenate([jnp.pad(clip, pad), t5_seq.astype(dtype)], axis=-2)
  pooled = jnp.concatenate([clip_l_pooled, clip_g_pooled], axis=-1)
  return context, pooled


def drop_text_conditioning(
  rng: Array, context: Array, pooled: Array, p: float, layout: TextLayout
) -> tuple[Array, Array]:
  """Zero each text encoder's outputs independently per example with probability p ([P] s5.3.3).

  Three independent Bernoulli(p) draws per example (CLIP-L, CLIP-G, T5); the paper uses
  p = 0.464 so all three are dropped (an unconditional step) in ~10% of examples. A dropped
  encoder's tokens/channels become exact zeros (not an encoded empty prompt, as the paper's training);
  everything else is returned unchanged. context [B, L, D] with L >= clip_tokens and
  D >= clip_l_dim + clip_g_dim; pooled [B, clip_l_dim + clip_g_dim].
  """
  if isinstance(p, (int, float)) and not 0.0 <= p <= 1.0:
    raise ValueError(f"dropout probability must be in [0, 1], got {p}")
  b, seq_len, width = context.shape
  lo, hi = layout.clip_l_dim, layout.clip_l_dim + layout.clip_g_dim
  if seq_len < layout.clip_tokens or width < hi:
    raise ValueError(f"context {context.shape} too small for {layout}")
  if pooled.shape != (b, layout.pooled_dim):
    raise ValueError(f"pooled must be [{b}, {layout.pooled_dim}] for {layout}, got {pooled.shape}")
  drop = jax.random.bernoulli(rng, p, (b, 3))  # [B, (clip_l, clip_g, t5)]
  drop_l, drop_g, drop_t5 = (drop[:, i, None, None] for i in range(3))  # each [B, 1, 1]

  tok = jnp.arange(seq_len)[None, :, None]  # [1, L, 1]
  ch = jnp.arange(width)[None, None, :]  # [1, 1, D]
  is_clip_tok = tok < layout.clip_tokens
  ctx_drop = (
    (is_clip_tok & (ch < lo) & drop_l) | (is_clip_tok & (ch >= lo) & (ch < hi) & drop_g) | (~is_clip_tok & drop_t5)
  )  # [B, L, D]
  pch = jnp.arange(layout.pooled_dim)[None, :]  # [1, P]
  pool_drop = ((pch < lo) & drop_l[:, :, 0]) | ((pch >= lo) & drop_g[:, :, 0])  # [B, P]
  # where(), not a multiply: exact zeros even for inf/nan inputs, and no -0.0.
  return (
    jnp.where(ctx_drop, jnp.zeros((), context.dtype), context),
    jnp.where(pool_drop, jnp.zeros((), pooled.dtype), pooled),
  )


# ----------------------------------------------------------------------------- validation loss


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


def validation_loss_sums(
  velocity_fn: Callable[[Array, Array], Array], x0: Array, eps: Array, levels: ArrayLike, mask: ArrayLike | None = None
) -> tuple[Array, Array]:
  """Per-level SUM of per-example losses and the number of examples: ([n_levels], []).

  The additive form aggregates exactly over batches and processes (add sums and counts, then
  divide). velocity_fn(z_t [B, ...], t [B]) -> v [B, ...]; every level uses the same eps.
  mask [B] (1 = real example, 0 = padding) weights examples; None means all count.
  """
  levels = jnp.asarray(levels, jnp.float32)
  b = x0.shape[0]
  w = jnp.ones((b,), jnp.float32) if mask is None else jnp.asarray(mask).astype(jnp.float32)

  def one_level(t):
    tb = jnp.full((b,), t, jnp.float32)
    v = velocity_fn(noised(x0, eps, tb), tb)
    return jnp.sum(w * per_example_loss(v, x0, eps))

  return jax.lax.map(one_level, levels), jnp.sum(w)  # traces velocity_fn once


def validation_losses(
  velocity_fn: Callable[[Array, Array], Array], x0: Array, eps: Array, levels: ArrayLike, mask: ArrayLike | None = None
) -> Array:
  """Per-level mean RF loss [n_levels] on one batch with FIXED noise eps ([P] s5.3.3, App. B.3).

  Use ``fixed_validation_noise`` for eps and ``val_t_levels()`` for levels; combine batches
  with ``validation_loss_sums`` and summarise with ``summarize_validation``.
  """
  sums, count = validation_loss_sums(velocity_fn, x0, eps, levels, mask)
  return sums / jnp.maximum(count, 1.0)


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
    per_level: [n_levels] mean losses (e.g. from ``validation_losses``).
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
