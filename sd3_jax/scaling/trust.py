"""When a fitted law cannot be trusted.

A fit always returns numbers; these checks say whether the data determined them. Each problem
is a dict with a machine-readable ``code``, the ``message`` a person reads, and its details:

* ``at_bound``: a parameter sits at a bound of its search range (the range, not the data, set it);
* ``few_sizes``: fewer distinct model sizes (or lengths, or budgets) than the law needs to
  separate its terms: a law with a size exponent needs at least ``MIN_SIZES``, since with two
  sizes E, A and alpha are not identified (any alpha fits two values); one model's own loss
  curve is not a compute law;
* ``few_points``: no more points than parameters plus one (the fit has at most one degree of
  freedom left to show that the law's form is wrong);
* ``wide_interval``: a bootstrap 95% interval spans more than a factor ``MAX_CI_RATIO``, or
  includes 0 (the parameter is not known to within an order of magnitude, so no extrapolation
  with it is a prediction). Scale parameters (A, B, k) are judged at the data's geometric centre
  (``ci_at_centre``), where the fit sets them: in original units their interval inherits the
  exponent's uncertainty times log C and spans orders of magnitude even for good fits;
* ``vertex_outside``: an isoFLOP parabola's minimum lies outside the sizes it was fitted on.

``verdict(warnings)`` gives ``{"trusted": not warnings, "warnings": warnings}``; a fit that is not
trusted is marked in scaling.json and on the plots and is never presented as a result.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

BOUND_TOL = 1e-4  # of a search range's width: L-BFGS-B puts an active bound's parameter on it
MAX_CI_RATIO = 10.0
MIN_SIZES = 3

NAMES = {"e": "E", "a": "A", "b": "B", "alpha": "alpha", "beta": "beta", "k": "k"}


def bound_hits(theta, bounds, names: Sequence[str], tol: float = BOUND_TOL) -> dict[str, str]:
  """{name: 'lower' | 'upper'} for each entry of ``theta`` within ``tol`` x its range's width of
  a bound of ``bounds`` (a list of (lo, hi) pairs)."""
  out = {}
  for name, value, (lo, hi) in zip(names, np.asarray(theta, np.float64), bounds):
    slack = tol * (hi - lo)
    if value <= lo + slack:
      out[name] = "lower"
    elif value >= hi - slack:
      out[name] = "upper"
  return out


def _as_dict(fit) -> dict[str, Any]:
  return fit.to_dict() if dataclasses.is_dataclass(fit) else dict(fit)


def _g(x: float) -> str:
  return f"{x:.3g}"


def interval_problem(name: str, lo: float, hi: float, where: str = "") -> dict | None:
  """A ``wide_interval`` problem when [lo, hi] includes 0 or spans more than MAX_CI_RATIO."""
  label = NAMES.get(name, name) + where
  if not (np.isfinite(lo) and np.isfinite(hi)):
    return {"code": "wide_interval", "param": name, "ratio": None, "message": f"the interval of {label} is not finite"}
  if lo <= 0 <= hi:
    return {
      "code": "wide_interval",
      "param": name,
      "ratio": None,
      "message": f"the 95% interval of {label} [{_g(lo)}, {_g(hi)}] includes 0",
    }
  small, large = sorted((abs(lo), abs(hi)))
  ratio = large / small
  if ratio > MAX_CI_RATIO:
    return {
      "code": "wide_interval",
      "param": name,
      "ratio": float(ratio),
      "message": f"the 95% interval of {label} spans a factor {ratio:.2g} (more than {MAX_CI_RATIO:g})",
    }
  return None


def check(fit, *, num_params: int, num_points: int, sizes: Sequence[tuple[str, int | None, int]] = ()) -> list[dict]:
  """The problems of one fit (a fit object or its ``to_dict()``): its ``at_bound``, ``ci`` and
  ``ci_at_centre`` entries, its point count, and ``sizes``: (what, have, need) triples such as
  ('model sizes', 1, 3) (``have`` None: not known, not checked)."""
  f = _as_dict(fit)
  out = []
  for name, side in (f.get("at_bound") or {}).items():
    value = f.get(name)
    shown = f" = {_g(value)}" if isinstance(value, (int, float)) else ""
    out.append(
      {
        "code": "at_bound",
        "param": name,
        "side": side,
        "message": f"{NAMES.get(name, name)}{shown} sits at the {side} bound of its search range",
      }
    )
  for what, have, need in sizes:
    if have is not None and have < need:
      out.append(
        {
          "code": "few_sizes",
          "what": what,
          "have": int(have),
          "need": int(need),
          "message": f"{have} distinct {what if have != 1 else what[:-1]}, the law needs at least {need}",
        }
      )
  if num_points <= num_params + 1:
    out.append(
      {
        "code": "few_points",
        "have": int(num_points),
        "need": num_params + 2,
        "message": f"{num_points} points for {num_params} parameters (needs at least {num_params + 2})",
      }
    )
  centred = f.get("ci_at_centre") or {}
  for name, (lo, hi) in (f.get("ci") or {}).items():
    if name in centred:
      lo, hi = centred[name]
      problem = interval_problem(name, lo, hi, " (at the data's centre)")
    else:
      problem = interval_problem(name, lo, hi)
    if problem:
      out.append(problem)
  return out


def power_law(fit, *, num_sizes: int | None = None) -> list[dict]:
  """Problems of L(C) = E + A C^-alpha; ``num_sizes``: distinct model sizes among its points."""
  f = _as_dict(fit)
  return check(f, num_params=3, num_points=f["num_points"], sizes=[("model sizes", num_sizes, MIN_SIZES)])


def parametric(fit, *, num_sizes: int | None = None, num_lengths: int | None = None) -> list[dict]:
  """Problems of L(N, D) = E + A/N^alpha + B/D^beta: each exponent needs MIN_SIZES distinct values."""
  f = _as_dict(fit)
  sizes = [("model sizes", num_sizes, MIN_SIZES), ("training lengths", num_lengths, MIN_SIZES)]
  return check(f, num_params=5, num_points=f["num_points"], sizes=sizes)


def isoflop(fit) -> list[dict]:
  """Problems of N_opt(C) = k C^a over the budgets' vertices, and of each budget's parabola
  (three parameters: at least five sizes; its minimum inside the sizes fitted)."""
  f = _as_dict(fit)
  profiles = f["profiles"]
  out = check(f, num_params=2, num_points=len(profiles))
  for p in profiles:
    at = f"the parabola at C = {_g(p['budget'])}"
    if p["num_points"] <= 4:
      out.append(
        {
          "code": "few_points",
          "budget": p["budget"],
          "have": p["num_points"],
          "need": 5,
          "message": f"{at} has {p['num_points']} points for 3 parameters (needs at least 5)",
        }
      )
    if not p["inside"]:
      out.append(
        {
          "code": "vertex_outside",
          "budget": p["budget"],
          "message": f"{at} has its minimum outside the sizes it was fitted on",
        }
      )
  return out


def verdict(warnings: Sequence[dict]) -> dict[str, Any]:
  return {"trusted": not warnings, "warnings": list(warnings)}


def summary(warnings: Sequence[dict]) -> str:
  """The problems on one line."""
  return "; ".join(w["message"] for w in warnings)
