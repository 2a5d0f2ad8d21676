"""Rectified flow, the paper's default formulation (sections 3 and 5), in plain ``jnp``:
``z_t = (1 - t) x0 + t eps`` with t in [0, 1] (t = 0 data), the network predicts the
velocity ``v = eps - x0``, and the timestep density carries the weighting (sampling t from
pi(t) with an unweighted MSE is the loss weight t/(1-t) pi(t)), so there is no weight here.

  sample_t / shift_t               training timesteps (logit-normal, mode, cosmap, uniform) + shift
  noised / velocity_target / per_example_loss / denoised
  batch_broadcast                  a per-example [B] value against an NHWC batch

``flow.formulations`` builds the rf formulations from these, so their losses are these exactly.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp

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


def batch_broadcast(t: ArrayLike, x: Array) -> Array:
  """t of shape [] or [B] -> broadcastable against x [B, ...]."""
  t = jnp.asarray(t, jnp.float32)
  if t.ndim == 0:
    return t
  if t.ndim != 1 or t.shape[0] != x.shape[0]:
    raise ValueError(f"t must be a scalar or [B] with B = {x.shape[0]}, got shape {t.shape}")
  return t.reshape((-1,) + (1,) * (x.ndim - 1))  # [B, 1, ..., 1]


def noised(x0: Array, eps: Array, t: ArrayLike) -> Array:
  """z_t = (1 - t) x0 + t eps with t [B] (or scalar) broadcast over x0 [B, ...]; float32."""
  tb = batch_broadcast(t, x0)
  return (1.0 - tb) * x0.astype(jnp.float32) + tb * eps.astype(jnp.float32)


def velocity_target(x0: Array, eps: Array) -> Array:
  """The regression target u = eps - x0 (float32); independent of t."""
  return eps.astype(jnp.float32) - x0.astype(jnp.float32)


def denoised(z_t: Array, v: Array, t: ArrayLike) -> Array:
  """x0 estimate from a velocity: x0_hat = z_t - t v (exact for v = velocity_target)."""
  return z_t.astype(jnp.float32) - batch_broadcast(t, z_t) * v.astype(jnp.float32)


def per_example_loss(v_pred: Array, x0: Array, eps: Array) -> Array:
  """Unweighted MSE ||v_pred - (eps - x0)||^2 averaged over non-batch axes, in float32: [B]."""
  err = v_pred.astype(jnp.float32) - velocity_target(x0, eps)
  return jnp.mean(jnp.square(err), axis=tuple(range(1, err.ndim)))
