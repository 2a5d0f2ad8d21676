"""Scaling-law fits with bootstrap confidence intervals, usable on any numbers.

* ``fit_power_law(compute, loss)``: L(C) = E + A C^-alpha (the compute frontier, Hoffmann et al.
  2022 approach 1 in its loss-vs-compute form).
* ``fit_parametric(n, d, loss)``: L(N, D) = E + A / N^alpha + B / D^beta (approach 3).
* ``fit_isoflop(budget, n, loss)``: a parabola in log N per compute budget and the optimal size
  N_opt(C) = k C^a (approach 2).

The first two follow Hoffmann et al. as re-done by Besiroglu et al. 2024 (Epoch AI) and by
OLMo-core's model ladder: the prediction is written as a log-sum-exp of its terms, the objective
is the Huber loss (delta 1e-3) of the log residuals, minimised by L-BFGS-B from a grid of
starting points, E bounded by the lowest observed loss. Inputs are centred on their geometric
means inside the fit (better conditioning); results are reported in the original units.
Confidence intervals are percentile bootstrap 95% intervals (``ci``; ``ci_at_centre``: A and B
as the term's value at the data's geometric mean, where the fit sets them); ``at_bound`` names
the parameters the search range stopped (``trust`` says when a fit cannot be trusted); ``groups`` (e.g. the run of each
point of a loss curve) makes the bootstrap resample whole groups, since points of one curve are
not independent. Everything is deterministic for a given ``seed``.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Callable, Sequence

import numpy as np
from scipy import optimize
from threadpoolctl import threadpool_limits

from sd3_jax.scaling import trust

HUBER_DELTA = 1e-3
CI_LEVEL = 0.95


# --------------------------------------------------------------------------------------------
# Input checks


def positive_array(name: str, values, n: int | None = None) -> np.ndarray:
  """``values`` as a 1-D float64 array of finite positive numbers (of length ``n`` if given), or a
  ValueError that names ``name`` and the offending entry."""
  x = np.asarray(values, dtype=np.float64)
  if x.ndim != 1:
    raise ValueError(f"{name} must be a 1-D sequence of numbers, got shape {x.shape}")
  if n is not None and x.shape[0] != n:
    raise ValueError(f"{name} has {x.shape[0]} values but the other inputs have {n}")
  if np.isnan(x).any():
    raise ValueError(f"{name} contains NaN at index {int(np.flatnonzero(np.isnan(x))[0])}; drop those points")
  if not np.isfinite(x).all():
    raise ValueError(f"{name} contains an infinite value at index {int(np.flatnonzero(~np.isfinite(x))[0])}")
  if (x <= 0).any():
    i = int(np.flatnonzero(x <= 0)[0])
    raise ValueError(f"{name} must be positive (the fit works on logarithms), got {x[i]} at index {i}")
  return x


def _check_count(what: str, num_points: int, num_params: int) -> None:
  if num_points < num_params:
    raise ValueError(
      f"{what} has {num_params} parameters but only {num_points} points were given; it needs at least {num_params}"
    )


# --------------------------------------------------------------------------------------------
# The robust log-space least-squares core


def _huber(r: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
  """Huber loss / delta (so that large residuals cost |r|) and its derivative."""
  a = np.abs(r)
  value = np.where(a <= delta, 0.5 * r * r / delta, a - 0.5 * delta)
  return value, np.clip(r, -delta, delta) / delta


def _lse_terms(theta: np.ndarray, features: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """log(E + sum_k A_k x_k^-p_k) and its Jacobian for theta = (e, a_1..a_K, p_1..p_K), where
  E = exp(e), A_k = exp(a_k) and features are log x_k (centred)."""
  k = len(features)
  e, a, p = theta[0], theta[1 : 1 + k], theta[1 + k :]
  terms = np.stack([np.full_like(features[0], e)] + [a[i] - p[i] * features[i] for i in range(k)])
  top = terms.max(axis=0)
  w = np.exp(terms - top)
  total = w.sum(axis=0)
  log_pred = top + np.log(total)
  w = w / total
  jac = np.empty((len(theta), features[0].shape[0]))
  jac[0] = w[0]
  for i in range(k):
    jac[1 + i] = w[1 + i]
    jac[1 + k + i] = -features[i] * w[1 + i]
  return log_pred, jac


def _minimise(features, log_y, starts, bounds, delta, keep: int = 1) -> tuple[np.ndarray, list[np.ndarray]]:
  """The best L-BFGS-B solution over ``starts`` of the summed Huber loss of log residuals, and
  the ``keep`` best starting points (to warm-start bootstrap refits)."""

  def objective(theta):
    log_pred, jac = _lse_terms(theta, features)
    value, grad_r = _huber(log_pred - log_y, delta)
    return float(value.sum()), (jac * grad_r).sum(axis=1)

  lo, hi = np.array(bounds).T
  results = []
  # One BLAS thread: L-BFGS-B's tiny linear algebra is slowed ~10x by thread hand-offs on a
  # busy machine, and thousands of bootstrap refits add up.
  with threadpool_limits(limits=1):
    for start in starts:
      start = np.clip(start, lo, hi)
      res = optimize.minimize(
        objective, start, jac=True, method="L-BFGS-B", bounds=bounds, options=dict(maxiter=200, ftol=1e-9, gtol=1e-6)
      )
      if np.isfinite(res.fun):
        results.append((float(res.fun), res.x, start))
  if not results:
    raise ValueError("the fit did not converge from any starting point")
  results.sort(key=lambda r: r[0])
  return results[0][1], [r[2] for r in results[:keep]]


def _bootstrap(
  fit_once: Callable[[np.ndarray], np.ndarray], n: int, groups, num_bootstrap: int, seed: int
) -> np.ndarray:
  """Parameter vectors refitted on ``num_bootstrap`` resamples (of points, or of whole groups)."""
  if num_bootstrap < 0:
    raise ValueError(f"num_bootstrap must be >= 0, got {num_bootstrap}")
  rng = np.random.default_rng(seed)
  if groups is None:
    members = [np.array([i]) for i in range(n)]
  else:
    labels = np.asarray(groups)
    if labels.shape != (n,):
      raise ValueError(f"groups has {labels.shape} entries, expected one per point ({n})")
    members = [np.flatnonzero(labels == g) for g in dict.fromkeys(labels.tolist())]
  out = []
  for _ in range(num_bootstrap):
    pick = rng.integers(len(members), size=len(members))
    out.append(fit_once(np.concatenate([members[j] for j in pick])))
  if not out:
    return np.empty((0, 0))
  out = np.array(out)
  return out[np.isfinite(out).all(axis=1)]  # resamples too degenerate to fit are dropped


def _intervals(names: Sequence[str], samples: np.ndarray) -> dict[str, tuple[float, float]]:
  lo, hi = 100 * (1 - CI_LEVEL) / 2, 100 * (1 + CI_LEVEL) / 2
  return {
    name: (float(np.percentile(samples[:, i], lo)), float(np.percentile(samples[:, i], hi)))
    for i, name in enumerate(names)
  }


def r2_log(pred, loss) -> float:
  """Coefficient of determination of log(pred) against log(loss)."""
  log_y = np.log(np.asarray(loss, np.float64))
  ss_res = float(np.sum((np.log(np.asarray(pred, np.float64)) - log_y) ** 2))
  ss_tot = float(np.sum((log_y - log_y.mean()) ** 2))
  return 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")


# --------------------------------------------------------------------------------------------
# L(C) = E + A C^-alpha


@dataclasses.dataclass(frozen=True)
class PowerLawFit:
  """L(C) = e + a C^-alpha; ``ci`` maps each parameter to its bootstrap 95% interval."""

  e: float
  a: float
  alpha: float
  ci: dict[str, tuple[float, float]]
  r2_log: float
  num_points: int
  num_bootstrap: int
  at_bound: dict[str, str] = dataclasses.field(default_factory=dict)
  ci_at_centre: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)

  def predict(self, compute) -> np.ndarray:
    c = np.asarray(compute, np.float64)
    return self.e + self.a * c**-self.alpha

  def to_dict(self) -> dict:
    return {k: (dict(v) if isinstance(v, dict) else v) for k, v in dataclasses.asdict(self).items()}


def _power_law_bounds(log_y):
  y_min, y_mid = float(np.exp(log_y.min())), float(np.exp(np.median(log_y)))
  return [(np.log(y_min) - 25.0, np.log(y_min)), (-25.0, np.log(y_mid) + 5.0), (0.0, 5.0)]


def _power_law_theta(x, log_y, delta, extra_starts=(), grid=True):
  y_min, y_mid = float(np.exp(log_y.min())), float(np.exp(np.median(log_y)))
  bounds = _power_law_bounds(log_y)
  starts = list(extra_starts)
  if grid:  # 3 x 4 x 2 starting points around the data's scale
    for frac, alpha, shift in itertools.product((0.01, 0.5, 0.9), (0.05, 0.2, 0.6, 1.5), (-1.0, 1.0)):
      e = frac * y_min
      starts.append(np.array([np.log(e), np.log(max(y_mid - e, 1e-3 * y_mid)) + shift, alpha]))
  return _minimise([x], log_y, starts, bounds, delta)


def fit_power_law(
  compute, loss, *, num_bootstrap: int = 200, seed: int = 0, huber_delta: float = HUBER_DELTA, groups=None
) -> PowerLawFit:
  """Fits L(C) = E + A C^-alpha to (compute, loss) pairs; see the module docstring."""
  c = positive_array("compute", compute)
  y = positive_array("loss", loss, len(c))
  _check_count("L(C) = E + A C^-alpha", len(c), 3)
  if len(np.unique(c)) < 2:
    raise ValueError("compute must take at least two different values to fit an exponent")
  c0 = float(np.exp(np.mean(np.log(c))))
  x, log_y = np.log(c / c0), np.log(y)
  theta, starts = _power_law_theta(x, log_y, huber_delta)
  warm = [theta] + starts  # bootstrap refits start from the full fit and the best grid starts

  def to_params(t):  # (E, A, alpha) in original units: A C^-alpha = A' (C / c0)^-alpha; and A'
    return np.array([np.exp(t[0]), np.exp(t[1]) * c0 ** t[2], t[2], np.exp(t[1])])

  def fit_once(idx):
    if len(np.unique(x[idx])) < 2:
      return np.full(4, np.nan)
    return to_params(_power_law_theta(x[idx], log_y[idx], huber_delta, extra_starts=warm, grid=False)[0])

  params = to_params(theta)
  samples = _bootstrap(fit_once, len(c), groups, num_bootstrap, seed)
  ci = _intervals(("e", "a", "alpha", "a_at_centre"), samples) if len(samples) else {}
  centred = {"a": ci.pop("a_at_centre")} if ci else {}
  fit = PowerLawFit(
    e=float(params[0]),
    a=float(params[1]),
    alpha=float(params[2]),
    ci=ci,
    r2_log=0.0,
    num_points=len(c),
    num_bootstrap=num_bootstrap,
    at_bound=trust.bound_hits(theta, _power_law_bounds(log_y), ("e", "a", "alpha")),
    ci_at_centre=centred,
  )
  return dataclasses.replace(fit, r2_log=r2_log(fit.predict(c), y))


# --------------------------------------------------------------------------------------------
# L(N, D) = E + A / N^alpha + B / D^beta


@dataclasses.dataclass(frozen=True)
class ParametricFit:
  """L(N, D) = e + a / N^alpha + b / D^beta; ``ci``: bootstrap 95% interval per parameter."""

  e: float
  a: float
  b: float
  alpha: float
  beta: float
  ci: dict[str, tuple[float, float]]
  r2_log: float
  num_points: int
  num_bootstrap: int
  at_bound: dict[str, str] = dataclasses.field(default_factory=dict)
  ci_at_centre: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)

  def predict(self, n, d) -> np.ndarray:
    n, d = np.asarray(n, np.float64), np.asarray(d, np.float64)
    return self.e + self.a * n**-self.alpha + self.b * d**-self.beta

  def to_dict(self) -> dict:
    return {k: (dict(v) if isinstance(v, dict) else v) for k, v in dataclasses.asdict(self).items()}


def _parametric_bounds(log_y):
  y_min, y_mid = float(np.exp(log_y.min())), float(np.exp(np.median(log_y)))
  hi = np.log(y_mid) + 5.0
  return [(np.log(y_min) - 25.0, np.log(y_min)), (-25.0, hi), (-25.0, hi), (0.0, 5.0), (0.0, 5.0)]


def _parametric_theta(xn, xd, log_y, delta, extra_starts=(), grid=True):
  y_min, y_mid = float(np.exp(log_y.min())), float(np.exp(np.median(log_y)))
  bounds = _parametric_bounds(log_y)
  starts = list(extra_starts)
  if grid:  # 3 x 3 x 3 x 2 starting points around the data's scale
    for frac, alpha, beta, sa in itertools.product((0.01, 0.5, 0.9), (0.1, 0.4, 1.2), (0.1, 0.4, 1.2), (-1.0, 0.5)):
      sb = -0.25 - sa  # the other term takes the rest
      e = frac * y_min
      r = np.log(max(y_mid - e, 1e-3 * y_mid) / 2)
      starts.append(np.array([np.log(e), r + sa, r + sb, alpha, beta]))
  return _minimise([xn, xd], log_y, starts, bounds, delta)


def fit_parametric(
  n, d, loss, *, num_bootstrap: int = 200, seed: int = 0, huber_delta: float = HUBER_DELTA, groups=None
) -> ParametricFit:
  """Fits L(N, D) = E + A / N^alpha + B / D^beta (N parameters, D data seen, e.g. images)."""
  n_ = positive_array("n", n)
  d_ = positive_array("d", d, len(n_))
  y = positive_array("loss", loss, len(n_))
  _check_count("L(N, D) = E + A/N^alpha + B/D^beta", len(n_), 5)
  for name, v in (("n", n_), ("d", d_)):
    if len(np.unique(v)) < 2:
      raise ValueError(f"{name} must take at least two different values to fit its exponent")
  n0, d0 = float(np.exp(np.mean(np.log(n_)))), float(np.exp(np.mean(np.log(d_))))
  xn, xd, log_y = np.log(n_ / n0), np.log(d_ / d0), np.log(y)
  theta, starts = _parametric_theta(xn, xd, log_y, huber_delta)
  warm = [theta] + starts  # bootstrap refits start from the full fit and the best grid starts

  def to_params(t):  # (E, A, B, alpha, beta) in original units, then A' and B' (at n0, d0)
    return np.array([np.exp(t[0]), np.exp(t[1]) * n0 ** t[3], np.exp(t[2]) * d0 ** t[4], t[3], t[4], *np.exp(t[1:3])])

  def fit_once(idx):
    if len(np.unique(xn[idx])) < 2 or len(np.unique(xd[idx])) < 2:
      return np.full(7, np.nan)
    t, _ = _parametric_theta(xn[idx], xd[idx], log_y[idx], huber_delta, extra_starts=warm, grid=False)
    return to_params(t)

  params = to_params(theta)
  samples = _bootstrap(fit_once, len(n_), groups, num_bootstrap, seed)
  ci = _intervals(("e", "a", "b", "alpha", "beta", "a_at_centre", "b_at_centre"), samples) if len(samples) else {}
  centred = {k: ci.pop(f"{k}_at_centre") for k in ("a", "b")} if ci else {}
  fit = ParametricFit(
    e=float(params[0]),
    a=float(params[1]),
    b=float(params[2]),
    alpha=float(params[3]),
    beta=float(params[4]),
    ci=ci,
    r2_log=0.0,
    num_points=len(n_),
    num_bootstrap=num_bootstrap,
    at_bound=trust.bound_hits(theta, _parametric_bounds(log_y), ("e", "a", "b", "alpha", "beta")),
    ci_at_centre=centred,
  )
  return dataclasses.replace(fit, r2_log=r2_log(fit.predict(n_, d_), y))
