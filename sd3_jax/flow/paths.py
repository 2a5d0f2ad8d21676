"""Noising paths ``z_t = a_t x0 + b_t eps`` on t in [0, 1], t = 0 the data: the first half of a
formulation (the paper, section 3). A path gives a_t, b_t, the log-SNR
``lambda_t = log(a_t^2 / b_t^2)`` and its inverse. Two paths at equal log-SNR hold the same z up
to a scale, which is how a noise level of one formulation is found in another (validation
levels, the sampler's schedules).

  RectifiedPath   a = 1 - t, b = t
  CosinePath      a = cos(pi t / 2), b = sin(pi t / 2)
  LinearVPPath    LDM's variance-preserving discrete schedule: betas interpolated linearly in
                  sqrt(beta) between beta_start and beta_end over T steps, a = sqrt(alphas_cumprod),
                  b = sqrt(1 - alphas_cumprod); step k sits at t = k / (T - 1), alphas_cumprod
                  is interpolated linearly between steps
  VEPath          a = 1, b = sigma_t (EDM): log sigma a normal quantile of t, or another path's
                  noise-to-signal ratio b/a (the paper's edm/cos, edm/rf)

``time_input(t)`` is what the network receives as its time argument (the MM-DiT embeds 1000
times it): t for the continuous paths, k / 1000 (the network sees the discrete step k) for LDM,
EDM's c_noise / 1000 (the network sees c_noise = log(sigma) / 4) for VE.

Every function takes numpy arrays or Python floats (schedules and validation levels, computed on
the host in float64) or jax arrays (inside ``jit``, float32) and answers in the same kind.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import jax.scipy.special as jsp
import numpy as np
from scipy import special as ssp

ArrayLike = Any


def xp_of(*xs):
  """jax.numpy if any argument is a jax array (or tracer), else numpy."""
  return jnp if any(isinstance(x, jax.Array) for x in xs) else np


def _f(t):
  """t as a float array of its kind: float32 for jax, float64 for numpy and Python numbers."""
  return jnp.asarray(t, jnp.float32) if isinstance(t, jax.Array) else np.asarray(t, np.float64)


def _sigmoid(xp, x):
  return jax.nn.sigmoid(x) if xp is jnp else ssp.expit(x)


class Path:
  """Interface of a noising path (see the module docstring)."""

  lam_min: float = -math.inf  # the log-SNR range the path covers
  lam_max: float = math.inf
  covers_ends: bool = True  # whether lambda = +-inf (t = 0 or 1 exactly) is a valid point

  def alpha(self, t):
    raise NotImplementedError

  def sigma(self, t):
    raise NotImplementedError

  def log_snr(self, t):
    a, b = self.alpha(t), self.sigma(t)
    xp = xp_of(a, b)
    with np.errstate(divide="ignore"):
      return 2.0 * (xp.log(a) - xp.log(b))

  def t_of_log_snr(self, lam):
    raise NotImplementedError

  def time_input(self, t):
    return _f(t)

  def scale(self, lam):
    """(a, b) at log-SNR lambda (numpy, float64): the path's point of that noise level, exact
    where its t is not (EDM's far tail)."""
    lam = np.asarray(lam, np.float64)
    return np.sqrt(ssp.expit(lam)), np.sqrt(ssp.expit(-lam))  # variance preserving

  def time_input_at(self, lam):
    """The network's time input at log-SNR lambda (numpy)."""
    return np.asarray(self.time_input(self.t_of_log_snr(np.asarray(lam, np.float64))), np.float64)

  def covers(self, lam) -> np.ndarray:
    """bool: which log-SNR values (numpy) the path can represent."""
    lam = np.asarray(lam, np.float64)
    inside = (lam >= self.lam_min) & (lam <= self.lam_max)
    return inside & (np.isfinite(lam) | self.covers_ends)


@dataclasses.dataclass(frozen=True)
class RectifiedPath(Path):
  def alpha(self, t):
    return 1.0 - _f(t)

  def sigma(self, t):
    return _f(t)

  def t_of_log_snr(self, lam):
    lam = _f(lam)
    return _sigmoid(xp_of(lam), -0.5 * lam)  # (1 - t) / t = exp(lambda / 2)

  def scale(self, lam):
    lam = np.asarray(lam, np.float64)
    return ssp.expit(0.5 * lam), ssp.expit(-0.5 * lam)


@dataclasses.dataclass(frozen=True)
class CosinePath(Path):
  def alpha(self, t):
    t = _f(t)
    return xp_of(t).sin(0.5 * math.pi * (1.0 - t))  # = cos(pi t / 2), accurate near t = 1

  def sigma(self, t):
    t = _f(t)
    return xp_of(t).sin(0.5 * math.pi * t)

  def t_of_log_snr(self, lam):
    lam = _f(lam)
    xp = xp_of(lam)
    return (2.0 / math.pi) * xp.arctan(xp.exp(-0.5 * lam))  # tan(pi t / 2) = exp(-lambda / 2)


@functools.lru_cache(maxsize=8)
def alphas_cumprod(num_steps: int, beta_start: float, beta_end: float) -> np.ndarray:
  """LDM's 'scaled linear' schedule: prod_{s <= k} (1 - beta_s), beta linear in sqrt (float64)."""
  betas = np.linspace(math.sqrt(beta_start), math.sqrt(beta_end), num_steps, dtype=np.float64) ** 2
  out = np.cumprod(1.0 - betas)
  out.setflags(write=False)
  return out


@dataclasses.dataclass(frozen=True)
class LinearVPPath(Path):
  num_steps: int = 1000
  beta_start: float = 0.00085
  beta_end: float = 0.012
  covers_ends = False

  def __post_init__(self):
    if self.num_steps < 2 or not 0.0 < self.beta_start < self.beta_end < 1.0:
      raise ValueError(f"LDM schedule needs >= 2 steps and 0 < beta_start < beta_end < 1, got {self}")

  @property
  def table(self) -> np.ndarray:
    return alphas_cumprod(self.num_steps, self.beta_start, self.beta_end)

  @property
  def lam_min(self) -> float:
    a = self.table[-1]
    return float(math.log(a) - math.log1p(-a))

  @property
  def lam_max(self) -> float:
    a = self.table[0]
    return float(math.log(a) - math.log1p(-a))

  def step(self, t):
    """The discrete step k = t (T - 1) (fractional between steps)."""
    return _f(t) * (self.num_steps - 1)

  def _abar(self, t):
    k = self.step(t)
    xp = xp_of(k)
    table = jnp.asarray(self.table, jnp.float32) if xp is jnp else self.table
    return xp.interp(k, xp.arange(self.num_steps, dtype=table.dtype), table)

  def alpha(self, t):
    abar = self._abar(t)
    return xp_of(abar).sqrt(abar)

  def sigma(self, t):
    abar = self._abar(t)
    return xp_of(abar).sqrt(1.0 - abar)

  def t_of_log_snr(self, lam):
    """NaN outside [lam_min, lam_max] (the schedule's SNR range is bounded)."""
    lam = _f(lam)
    xp = xp_of(lam)
    abar = _sigmoid(xp, lam)
    table = jnp.asarray(self.table, jnp.float32) if xp is jnp else self.table
    k = xp.interp(abar, table[::-1], xp.arange(self.num_steps - 1, -1, -1, dtype=table.dtype))
    inside = (lam >= self.lam_min) & (lam <= self.lam_max)
    return xp.where(inside, k / (self.num_steps - 1), xp.nan)

  def time_input(self, t):
    return self.step(t) / 1000.0  # the network sees the discrete step k


@dataclasses.dataclass(frozen=True)
class LogNormalSigma:
  """EDM's noise levels: log sigma_t = p_mean + p_std Phi^-1(t) (sigma log-normal for uniform t)."""

  p_mean: float = -1.2
  p_std: float = 1.2

  def __post_init__(self):
    if not self.p_std > 0:
      raise ValueError(f"EDM's P_std must be > 0, got {self.p_std}")

  def sigma(self, t):
    t = _f(t)
    xp = xp_of(t)
    ndtri = jsp.ndtri if xp is jnp else ssp.ndtri
    with np.errstate(divide="ignore"):
      return xp.exp(self.p_mean + self.p_std * ndtri(t))

  def t_of_sigma(self, s):
    s = _f(s)
    xp = xp_of(s)
    ndtr = jsp.ndtr if xp is jnp else ssp.ndtr
    with np.errstate(divide="ignore"):
      return ndtr((xp.log(s) - self.p_mean) / self.p_std)


@dataclasses.dataclass(frozen=True)
class RatioSigma:
  """sigma_t = b_t / a_t of another path: EDM at that path's log-SNR for the same t."""

  path: Path

  def sigma(self, t):
    a, b = self.path.alpha(t), self.path.sigma(t)
    with np.errstate(divide="ignore"):
      return b / a

  def t_of_sigma(self, s):
    s = _f(s)
    with np.errstate(divide="ignore"):
      return self.path.t_of_log_snr(-2.0 * xp_of(s).log(s))


@dataclasses.dataclass(frozen=True)
class VEPath(Path):
  """a = 1, b = sigma_t; ``levels`` is a LogNormalSigma or a RatioSigma."""

  levels: Any = LogNormalSigma()
  covers_ends = False

  @property
  def lam_min(self) -> float:
    return getattr(self.levels.path, "lam_min", -math.inf) if isinstance(self.levels, RatioSigma) else -math.inf

  @property
  def lam_max(self) -> float:
    return getattr(self.levels.path, "lam_max", math.inf) if isinstance(self.levels, RatioSigma) else math.inf

  def alpha(self, t):
    t = _f(t)
    return xp_of(t).ones_like(t)

  def sigma(self, t):
    return self.levels.sigma(t)

  def t_of_log_snr(self, lam):
    lam = _f(lam)
    return self.levels.t_of_sigma(xp_of(lam).exp(-0.5 * lam))

  def t_of_sigma(self, s):
    return self.levels.t_of_sigma(s)

  def time_input(self, t):
    s = self.sigma(t)
    return 0.25 * xp_of(s).log(s) / 1000.0  # the network sees c_noise = log(sigma) / 4

  def scale(self, lam):
    lam = np.asarray(lam, np.float64)
    return np.ones_like(lam), np.exp(-0.5 * lam)

  def time_input_at(self, lam):
    return -np.asarray(lam, np.float64) / 8000.0  # log(sigma) / 4 with sigma = exp(-lambda / 2)
