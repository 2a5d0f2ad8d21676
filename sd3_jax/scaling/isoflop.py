"""The compute frontier and isoFLOP profiles (Hoffmann et al. 2022, approaches 1 and 2).

``frontier(compute, loss)`` picks the points of loss-vs-compute curves that no cheaper point
beats (the lowest loss reached at each compute). ``fit_isoflop(budget, n, loss)`` fits a parabola
in log N to the final losses of each budget, takes its vertex as the budget's optimal size, and
fits N_opt(C) = k C^a over the budgets, with a bootstrap 95% interval (points resampled within
each budget). Parabolas are biased when the sizes are not centred on the optimum (Besiroglu et
al. 2024); each profile reports whether its vertex lies inside the sizes it was fitted on.
``ci_at_centre`` holds the interval of N_opt at the budgets' geometric mean (k's interval
inherits a's times log C); ``trust.isoflop`` says when the fit cannot be trusted.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from sd3_jax.scaling.fits import CI_LEVEL, positive_array


def frontier(compute, loss) -> np.ndarray:
  """Indices (in increasing compute) of the points whose loss is below that of every point with
  less or equal compute: the lower envelope of loss-vs-compute curves."""
  c = positive_array("compute", compute)
  y = positive_array("loss", loss, len(c))
  order = np.lexsort((y, c))
  keep, best = [], np.inf
  for i in order:
    if y[i] < best:
      keep.append(int(i))
      best = y[i]
  return np.array(keep, dtype=int)


@dataclasses.dataclass(frozen=True)
class IsoFlopFit:
  """One parabola per budget and N_opt(C) = k C^a across budgets."""

  profiles: list[dict]  # {budget, coeffs (c2, c1, c0 in log N), n_opt, loss_opt, inside, num_points}
  a: float
  k: float
  ci: dict[str, tuple[float, float]]
  num_bootstrap: int
  ci_at_centre: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)

  def predict_n_opt(self, compute) -> np.ndarray:
    return self.k * np.asarray(compute, np.float64) ** self.a

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def _vertices(c, log_n, log_y, budgets):
  """(budget, n_opt, loss_opt, coeffs, inside) per budget whose parabola opens upwards."""
  out = []
  for b in budgets:
    m = c == b
    if len(np.unique(log_n[m])) < 3:
      continue
    c2, c1, c0 = np.polyfit(log_n[m], log_y[m], 2)
    if c2 <= 0:
      continue
    x = -c1 / (2 * c2)
    out.append(
      (
        b,
        float(np.exp(x)),
        float(np.exp(c0 - c1 * c1 / (4 * c2))),
        (float(c2), float(c1), float(c0)),
        bool(log_n[m].min() <= x <= log_n[m].max()),
      )
    )
  return out


def fit_isoflop(budget, n, loss, *, num_bootstrap: int = 200, seed: int = 0) -> IsoFlopFit:
  """Parabolas of log loss in log N per budget; N_opt(C) = k C^a from their vertices.

  Needs at least two budgets with three or more distinct sizes each whose parabola has a
  minimum (an upward-opening fit)."""
  c = positive_array("budget", budget)
  n_ = positive_array("n", n, len(c))
  y = positive_array("loss", loss, len(c))
  budgets = sorted(set(c.tolist()))
  log_n, log_y = np.log(n_), np.log(y)
  found = _vertices(c, log_n, log_y, budgets)
  if len(found) < 2:
    raise ValueError(
      f"an isoFLOP fit needs at least two budgets with >= 3 distinct sizes and a minimum; "
      f"got {len(found)} of {len(budgets)} budgets"
    )
  a, log_k = np.polyfit(np.log([f[0] for f in found]), np.log([f[1] for f in found]), 1)
  log_centre = float(np.mean(np.log(budgets)))
  rng = np.random.default_rng(seed)
  samples = []
  for _ in range(num_bootstrap):
    idx = np.concatenate([rng.choice(np.flatnonzero(c == b), size=int(np.sum(c == b))) for b in budgets])
    v = _vertices(c[idx], log_n[idx], log_y[idx], budgets)
    if len(v) >= 2:
      sa, sk = np.polyfit(np.log([f[0] for f in v]), np.log([f[1] for f in v]), 1)
      samples.append((sa, np.exp(sk), np.exp(sk + sa * log_centre)))
  samples = np.array(samples)
  lo, hi = 100 * (1 - CI_LEVEL) / 2, 100 * (1 + CI_LEVEL) / 2
  ci, centred = {}, {}
  if len(samples):
    centred = {"k": (float(np.percentile(samples[:, 2], lo)), float(np.percentile(samples[:, 2], hi)))}
    ci = {
      "a": (float(np.percentile(samples[:, 0], lo)), float(np.percentile(samples[:, 0], hi))),
      "k": (float(np.percentile(samples[:, 1], lo)), float(np.percentile(samples[:, 1], hi))),
    }
  profiles = [
    {
      "budget": f[0],
      "n_opt": f[1],
      "loss_opt": f[2],
      "coeffs": list(f[3]),
      "inside": f[4],
      "num_points": int(np.sum(c == f[0])),
    }
    for f in found
  ]
  return IsoFlopFit(
    profiles=profiles, a=float(a), k=float(np.exp(log_k)), ci=ci, num_bootstrap=num_bootstrap, ci_at_centre=centred
  )
