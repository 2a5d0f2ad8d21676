"""The deterministic sampler of every formulation: its probability-flow ODE integrated from noise
to data with one network call per step, and the schedule of noise levels it steps through.

A step from z at t_i to t_{i+1} takes the data and noise estimates the output implies (the
formulation's coefficients) and puts them back at the next level:

  x0, eps = p z + q out, r z + u out;   z' = a_{i+1} x0 + b_{i+1} eps   (the last level is the data: z' = x0)

This is the Euler step of the ODE written in the scale-free variables x = z / a and
sigma = b / a, where it reads dx/dsigma = eps(x, sigma): DDIM (eta = 0) for the variance-
preserving paths, Karras et al.'s Euler step for EDM, and plain Euler in t for rectified flow.
Every parametrisation is linear in (z, out), so a step is ``z' = A_i z + B_i out`` with
coefficients computed on the host in float64 (``ode_schedule``).

Native schedules (own t of the n network calls, noise first):
  rf       the reference's shifted sigmas (sampling.sampling_sigmas, diffusers' flow-match Euler)
  uniform  variance preserving: t = t_start (1 - i / n); LDM at the integer steps
           round(T (1 - i / n)) - 1 (diffusers' DDIM 'trailing' spacing)
  karras   EDM: sigma_i = (smax^(1/7) + i/(n-1) (smin^(1/7) - smax^(1/7)))^7 with sigma 0.002..80
           (diffusers' EDMEulerScheduler)
A shift moves a schedule by the log-SNR -2 log(shift) (rf: the reference's t -> shift t / (1 +
(shift - 1) t)); LDM's levels stay inside its bounded SNR range.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from sd3_jax.flow.formulations import Formulation
from sd3_jax.flow.paths import LinearVPPath

KARRAS_SIGMA_MIN, KARRAS_SIGMA_MAX, KARRAS_RHO = 0.002, 80.0, 7.0


@dataclasses.dataclass(frozen=True)
class ODESchedule:
  """The n steps of a sampler run (numpy arrays of length n): own times ``t`` and ``log_snr``
  (float64, for reading; EDM's t of a large sigma is 1 even in float64), and in float32 the
  network's ``time_input`` and ``input_scale`` at each, the step coefficients ``A``, ``B``, and
  ``alpha``, ``sigma`` of each level (to start there: z = alpha x_init + sigma noise)."""

  t: np.ndarray
  log_snr: np.ndarray
  time_input: np.ndarray
  input_scale: np.ndarray
  A: np.ndarray
  B: np.ndarray
  alpha: np.ndarray
  sigma: np.ndarray

  def __len__(self) -> int:
    return len(self.t)

  def start_noise_scale(self, start: int = 0) -> float:
    """The std of the noise-only latent at step ``start`` for unit-variance data,
    sqrt(a^2 + b^2): 1 on variance-preserving paths, sqrt(1 + sigma^2) for EDM."""
    return float(math.hypot(float(self.alpha[start]), float(self.sigma[start])))

  def arrays(self, start: int = 0) -> dict[str, np.ndarray]:
    """The per-step arrays from ``start`` on (what ``integrate`` takes)."""
    return {k: getattr(self, k)[start:] for k in ("A", "B", "input_scale", "time_input")}


def native_log_snr(f: Formulation, num_steps: int) -> np.ndarray:
  """The log-SNR of the n network calls of the formulation's native schedule (float64)."""
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  i = np.arange(num_steps, dtype=np.float64)
  if f.schedule == "karras":
    ramp = i / max(num_steps - 1, 1)
    lo, hi = KARRAS_SIGMA_MIN ** (1 / KARRAS_RHO), KARRAS_SIGMA_MAX ** (1 / KARRAS_RHO)
    return -2.0 * KARRAS_RHO * np.log(hi + ramp * (lo - hi))
  if f.schedule == "uniform":
    if isinstance(f.path, LinearVPPath):
      total = f.path.num_steps
      t = (np.round(total * (1.0 - i / num_steps)) - 1.0) / (total - 1)
    else:
      t = f.t_start * (1.0 - i / num_steps)
    with np.errstate(divide="ignore"):
      return np.asarray(f.log_snr(t), np.float64)
  raise ValueError(f"{f.name}: rectified flow samples with sampling.sampling_sigmas, not ode_schedule")


def shift_log_snr(f: Formulation, lam: np.ndarray, shift: float) -> np.ndarray:
  """Moves log-SNRs by -2 log(shift), staying inside the path's SNR range."""
  if not shift > 0:
    raise ValueError(f"shift must be > 0, got {shift}")
  if shift == 1.0:
    return lam
  return np.clip(lam - 2.0 * math.log(shift), f.path.lam_min, f.path.lam_max)


def ode_schedule(f: Formulation, num_steps: int, shift: float = 1.0) -> ODESchedule:
  """The schedule and step coefficients of an n-step run (module docstring). Everything is
  computed from the levels' log-SNR in float64, exact also where t is not."""
  lam = shift_log_snr(f, native_log_snr(f, num_steps), shift)
  a, b = f.path.scale(lam)
  p, q, r, u = (np.broadcast_to(np.asarray(c, np.float64), lam.shape) for c in f.coefficients_at(a, b))
  a_next = np.append(a[1:], 1.0)  # the last step lands on the data
  b_next = np.append(b[1:], 0.0)
  values = dict(
    time_input=f.path.time_input_at(lam),
    input_scale=f.input_scale_at(b),
    A=a_next * p + b_next * r,
    B=a_next * q + b_next * u,
    alpha=a,
    sigma=b,
  )
  bad = [k for k, v in values.items() if not np.all(np.isfinite(v))]
  if bad:
    raise ValueError(f"{f.name}: the {num_steps}-step schedule with shift {shift} is not finite ({bad})")
  t = np.asarray(f.t_of_log_snr(lam), np.float64)
  return ODESchedule(t=t, log_snr=lam, **{k: np.asarray(v, np.float32) for k, v in values.items()})


def integrate(
  predict_fn: Callable[[jax.Array, jax.Array, jax.Array], jax.Array], z: jax.Array, A, B, input_scale, time_input
) -> jax.Array:
  """Runs the steps: ``z <- A_i z + B_i predict_fn(input_scale_i z, time_input_i, i)``.

  predict_fn(network input, time input (scalar), step index) -> the network output (guided or
  not) at that step. The arrays are ``ODESchedule.arrays(start)``; one ``lax.fori_loop``, so a
  run compiles once per number of steps.
  """
  A, B = jnp.asarray(A, jnp.float32), jnp.asarray(B, jnp.float32)
  scale, tin = jnp.asarray(input_scale, jnp.float32), jnp.asarray(time_input, jnp.float32)

  def body(i, z):
    out = predict_fn(scale[i] * z, tin[i], i).astype(jnp.float32)
    return A[i] * z + B[i] * out

  return jax.lax.fori_loop(0, A.shape[0], body, jnp.asarray(z, jnp.float32))
