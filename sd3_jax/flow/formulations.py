"""One form for the paper's formulations (section 2, appendix B): a path (a_t, b_t), what the
network predicts, a training density of t and a loss weighting. Written in the paper's terms,
``L = -1/2 E_t[w_t lambda'_t ||eps_hat - eps||^2]``; each formulation trains with an MSE on its
own target, and the weighting is what that MSE and its density of t amount to.

Predictions (the target of the MSE) and how (x0, eps) follow from an output ``p`` at z_t:

  velocity  rf only: eps - x0;  x0 = z - t p,  eps = z + (1 - t) p
  eps       eps;  x0 = (z - b p) / a
  v         variance-preserving paths: a eps - b x0;  x0 = a z - b p,  eps = b z + a p
  F         EDM (a = 1, b = sigma): Karras et al.'s preconditioning with sigma_data,
            x0 = c_skip z + c_out p, network input c_in z and time input c_noise

All four are linear in (z, p), so classifier-free guidance on the outputs is guidance on x0 and
eps alike, and a sampler step is affine (``flow.solver``).

Arrays broadcast as everywhere in ``flow``: t is [B] (or a scalar) against NHWC [B, H, W, C];
losses are per example [B] in float32. Coefficients also take numpy t (host: float64).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sd3_jax.flow import rectified
from sd3_jax.flow.paths import Path, RectifiedPath, VEPath, xp_of

Array = jax.Array
PREDICTIONS = ("velocity", "eps", "v", "F")
EDGE = 1e-5  # EDM's t is kept in [EDGE, 1 - EDGE], where sigma and c_noise are finite


# --------------------------------------------------------------------------------------------
# Training densities of t


@dataclasses.dataclass(frozen=True)
class RectifiedDensity:
  """rf's densities (``rectified.sample_t``): logit_normal(m, s), mode(mode_scale), cosmap,
  uniform; then the resolution shift."""

  sampler: str = "logit_normal"
  m: float = 0.0
  s: float = 1.0
  mode_scale: float = 1.29
  shift: float = 1.0

  def sample(self, rng: Array, shape) -> Array:
    return rectified.sample_t(
      rng, shape, self.sampler, m=self.m, s=self.s, mode_scale=self.mode_scale, shift=self.shift
    )


@dataclasses.dataclass(frozen=True)
class UniformDensity:
  """t ~ U(0, 1), kept in [edge, 1 - edge]."""

  edge: float = 0.0

  def sample(self, rng: Array, shape) -> Array:
    t = jax.random.uniform(rng, _shape(shape), jnp.float32)
    return jnp.clip(t, self.edge, 1.0 - self.edge) if self.edge else t


@dataclasses.dataclass(frozen=True)
class DiscreteUniformDensity:
  """Step k uniform in {0, ..., T - 1}, t = k / (T - 1) (DDPM / LDM training)."""

  num_steps: int = 1000

  def sample(self, rng: Array, shape) -> Array:
    k = jax.random.randint(rng, _shape(shape), 0, self.num_steps)
    return k.astype(jnp.float32) / (self.num_steps - 1)


@dataclasses.dataclass(frozen=True)
class ClippedDensity:
  """Another density kept in [edge, 1 - edge] (EDM at another formulation's log-SNR)."""

  base: Any
  edge: float = EDGE

  def sample(self, rng: Array, shape) -> Array:
    return jnp.clip(self.base.sample(rng, shape), self.edge, 1.0 - self.edge)


def _shape(shape) -> tuple[int, ...]:
  return (shape,) if isinstance(shape, int) else tuple(shape)


# --------------------------------------------------------------------------------------------
# The formulation


@dataclasses.dataclass(frozen=True)
class Formulation:
  """A path, a prediction, a training density and (EDM with another weighting) a reference
  formulation whose per-log-SNR weighting the loss takes. Build them with
  ``flow.get_formulation(name)``.

  name: canonical name in the paper's Table 1 notation.
  schedule: the sampler's native schedule ('rf', 'uniform' in t, 'karras' in sigma).
  t_start: where the sampler starts (t = 1 unless the prediction is singular there).
  """

  name: str
  path: Path
  prediction: str
  density: Any
  weighting_of: Optional["Formulation"] = None
  sigma_data: float = 0.5
  schedule: str = "uniform"
  t_start: float = 1.0

  def __post_init__(self):
    if self.prediction not in PREDICTIONS:
      raise ValueError(f"prediction must be one of {PREDICTIONS}, got {self.prediction!r}")
    if (self.prediction == "velocity") != isinstance(self.path, RectifiedPath):
      raise ValueError("the velocity prediction goes with the rectified path, and only with it")
    if (self.prediction == "F") != isinstance(self.path, VEPath):
      raise ValueError("the F prediction (EDM) goes with a VE path, and only with it")

  @property
  def is_rectified(self) -> bool:
    """rf formulations: their output is the velocity the reference sampler integrates."""
    return self.prediction == "velocity"

  # ------------------------------------------------------------------ the path
  def alpha(self, t):
    return self.path.alpha(t)

  def sigma(self, t):
    return self.path.sigma(t)

  def log_snr(self, t):
    return self.path.log_snr(t)

  def t_of_log_snr(self, lam):
    return self.path.t_of_log_snr(lam)

  def noised(self, x0: Array, eps: Array, t) -> Array:
    """z_t = a_t x0 + b_t eps (float32)."""
    if self.is_rectified:
      return rectified.noised(x0, eps, t)
    x0, eps = x0.astype(jnp.float32), eps.astype(jnp.float32)
    return _b(self.alpha(_j(t)), x0) * x0 + _b(self.sigma(_j(t)), x0) * eps

  # ------------------------------------------------------------------ what the network sees
  def input_scale(self, t):
    """c_in: the factor on z_t before the network (1 except for EDM)."""
    return self.input_scale_at(self.sigma(t))

  def input_scale_at(self, b):
    """c_in at a level whose path value is b."""
    if self.prediction != "F":
      return xp_of(b).ones_like(b)
    d = self.sigma_data
    return 1.0 / xp_of(b).sqrt(b * b + d * d)

  def model_input(self, z: Array, t) -> Array:
    return z if self.prediction != "F" else _b(self.input_scale(_j(t)), z) * z

  def time_input(self, t):
    """The network's time argument (the MM-DiT embeds 1000 times it)."""
    return self.path.time_input(t)

  # ------------------------------------------------------------------ targets and estimates
  def coefficients(self, t):
    """(p, q, r, u) with x0 = p z + q out and eps = r z + u out for a network output ``out``."""
    if self.prediction == "velocity":
      t = self.path.sigma(t)
      one = xp_of(t).ones_like(t)
      return one, -t, one, 1.0 - t
    return self.coefficients_at(self.alpha(t), self.sigma(t))

  def coefficients_at(self, a, b):
    """``coefficients`` at a level whose path values are (a, b) (e.g. from ``path.scale``)."""
    xp = xp_of(a, b)
    if self.prediction == "velocity":  # rf: b = t, a = 1 - t
      one = xp.ones_like(b)
      return one, -b, one, a
    if self.prediction == "eps":
      with np.errstate(divide="ignore", invalid="ignore"):
        return 1.0 / a, -b / a, xp.zeros_like(a), xp.ones_like(a)
    if self.prediction == "v":
      return a, -b, b, a
    d = self.sigma_data
    norm = xp.sqrt(b * b + d * d)
    return d * d / (norm * norm), b * d / norm, b / (norm * norm), -d / norm

  def target(self, x0: Array, eps: Array, t) -> Array:
    """What the network is trained to output (float32)."""
    x0, eps = x0.astype(jnp.float32), eps.astype(jnp.float32)
    if self.prediction == "velocity":
      return rectified.velocity_target(x0, eps)
    if self.prediction == "eps":
      return eps
    a, b = _b(self.alpha(_j(t)), x0), _b(self.sigma(_j(t)), x0)
    if self.prediction == "v":
      return a * eps - b * x0
    d = self.sigma_data
    return (b * x0 - d * d * eps) / (d * jnp.sqrt(b * b + d * d))  # (x0 - c_skip z) / c_out

  def x0_from(self, out: Array, z: Array, t) -> Array:
    """The data estimate from a network output at z_t."""
    if self.is_rectified:
      return rectified.denoised(z, out, t)
    p, q, _, _ = self.coefficients(_j(t))
    return _b(p, z) * z.astype(jnp.float32) + _b(q, z) * out.astype(jnp.float32)

  def eps_from(self, out: Array, z: Array, t) -> Array:
    _, _, r, u = self.coefficients(_j(t))
    return _b(r, z) * z.astype(jnp.float32) + _b(u, z) * out.astype(jnp.float32)

  def rf_velocity(self, out: Array, z: Array, t) -> Array:
    """The rectified-flow velocity eps - x0 that the output implies (the output itself for rf)."""
    if self.is_rectified:
      return out.astype(jnp.float32)
    return self.eps_from(out, z, t) - self.x0_from(out, z, t)

  # ------------------------------------------------------------------ training
  def sample_t(self, rng: Array, shape: int | Sequence[int]) -> Array:
    """Training timesteps from the formulation's density (float32)."""
    return self.density.sample(rng, shape)

  def eps_weight(self, t):
    """w such that the per-example loss is w ||eps_hat - eps||^2 (mean over elements)."""
    u = self.coefficients(t)[3]
    w = self.loss_weight(t)
    with np.errstate(divide="ignore"):
      return w / (u * u)

  def loss_weight(self, t):
    """The factor on the output MSE: 1, except EDM at another formulation's weighting, where it
    makes the eps-weighting per log-SNR that formulation's."""
    if self.weighting_of is None:
      return xp_of(t).ones_like(self.sigma(t))
    u = self.coefficients(t)[3]
    return u * u * self.weighting_of.eps_weight(t)

  def loss(self, out: Array, x0: Array, eps: Array, t) -> Array:
    """Per-example loss [B]: the MSE of the output against the target, weighting included."""
    if self.is_rectified:
      return rectified.per_example_loss(out, x0, eps)
    err = out.astype(jnp.float32) - self.target(x0, eps, t)
    mse = jnp.mean(jnp.square(err), axis=tuple(range(1, err.ndim)))
    if self.weighting_of is None:
      return mse
    return self.loss_weight(_j(t)) * mse

  def __str__(self) -> str:
    return self.name


def _j(t):
  """t as a float32 jax array (the training and sampling side)."""
  return jnp.asarray(t, jnp.float32)


def _b(v, x: Array) -> Array:
  """A scalar or per-example [B] value broadcast against x [B, ...]."""
  v = jnp.asarray(v, jnp.float32)
  return v if v.ndim == 0 else rectified.batch_broadcast(v, x)


def check_train_shift(f: Formulation, shift: float) -> None:
  if shift != 1.0 and not f.is_rectified:
    raise ValueError(
      f"config.flow.shift={shift} applies to rectified-flow formulations (rf, rf/...); "
      f"{f.name} trains with its own density: set config.flow.shift=1.0"
    )
