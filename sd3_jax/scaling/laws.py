"""The laws of a scaling study, fitted to its runs, each judged by ``trust``.

``fit_laws(runs)`` fits the compute frontier L(C), the parametric L(N, D) and (sweeps with
budgets) the isoFLOP N_opt(C) to the validation points of ``runs`` (as ``analysis.read_run``
gives them) and marks each: ``{"fit": ..., "error": ..., "trusted": bool, "warnings": [...]}``.
A law that is not trusted is never presented as a result: ``headline`` says "not a result:
<reasons>" in its place and withholds the held-out errors predicted from it, the plots draw it
dashed with its reasons, and ``warning_line`` summarises every such law on one line.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np

from sd3_jax.scaling import fits, isoflop, trust

log = logging.getLogger(__name__)

LAWS = {"frontier": "compute frontier L(C)", "parametric": "parametric L(N, D)", "isoflop": "isoFLOP N_opt(C)"}


def points(runs: Sequence[dict], n_key: str):
  """(run names, N, D, C, loss) arrays over every validation point of ``runs``."""
  rows = [(r["name"], r["params"][n_key], p["images"], p["compute"], p["loss"]) for r in runs for p in r["points"]]
  names = np.array([x[0] for x in rows])
  return names, *(np.array([x[i] for x in rows], np.float64) for i in range(1, 5))


def _try(what: str, fn):
  try:
    return fn(), None
  except ValueError as e:
    log.debug("%s: not fitted (%s)", what, e)  # warning_line names it
    return None, str(e)


def _entry(fit, why: str | None, warnings: list[dict] | None = None, **extra) -> dict[str, Any]:
  """A law's record: the fit (None when it could not be fitted) and whether it can be trusted."""
  judged = trust.verdict(warnings or []) if fit is not None else {"trusted": False, "warnings": []}
  return {"fit": fit.to_dict() if fit is not None else None, "error": why, **judged, **extra}


def fit_laws(
  runs: Sequence[dict], *, param_count: str = "non_embedding", num_bootstrap: int = 200, seed: int = 0
) -> tuple[dict[str, Any], Any, Any]:
  """({'frontier', 'parametric', 'isoflop'} records, the frontier fit, the parametric fit)."""
  names, n, d, c, y = points(runs, param_count)
  front = isoflop.frontier(c, y) if len(c) else np.array([], int)
  law, why = _try(
    "compute frontier", lambda: fits.fit_power_law(c[front], y[front], num_bootstrap=num_bootstrap, seed=seed)
  )
  out: dict[str, Any] = {}
  out["frontier"] = _entry(
    law,
    why,
    law and trust.power_law(law, num_sizes=len(np.unique(n[front]))),
    points=[{"run": str(names[i]), "compute": c[i], "loss": y[i]} for i in front],
  )
  par, why = _try(
    "parametric law", lambda: fits.fit_parametric(n, d, y, num_bootstrap=num_bootstrap, seed=seed, groups=names)
  )
  warnings = par and trust.parametric(par, num_sizes=len(np.unique(n)), num_lengths=len(np.unique(d)))
  out["parametric"] = _entry(par, why, warnings, num_runs=len(runs))
  budgeted = [r for r in runs if r["budget"]]
  out["isoflop"] = None
  if len({r["budget"] for r in budgeted}) >= 2:
    iso, why = _try(
      "isoFLOP",
      lambda: isoflop.fit_isoflop(
        [r["budget"] for r in budgeted],
        [r["params"][param_count] for r in budgeted],
        [r["points"][-1]["loss"] for r in budgeted],
        num_bootstrap=num_bootstrap,
        seed=seed,
      ),
    )
    out["isoflop"] = _entry(iso, why, iso and trust.isoflop(iso))
  return out, law, par


def predict(run: dict, law, par, param_count: str, result: dict) -> dict:
  """A held-out run's curve predicted by the parametric law, and its final point by the frontier
  law; ``*_law_trusted`` says whether the law that predicts can be trusted."""
  out = {
    "run": run["name"],
    "parametric_law_trusted": bool(result["parametric"]["trusted"]),
    "frontier_law_trusted": bool(result["frontier"]["trusted"]),
    "points": [],
  }
  for p in run["points"]:
    pred = float(par.predict(run["params"][param_count], p["images"])) if par else None
    out["points"].append(
      {
        "step": p["step"],
        "compute": p["compute"],
        "measured": p["loss"],
        "predicted": pred,
        "rel_error": None if pred is None else (pred - p["loss"]) / p["loss"],
      }
    )
  errs = [abs(q["rel_error"]) for q in out["points"] if q["rel_error"] is not None]
  out["parametric_mean_abs_rel_error"] = float(np.mean(errs)) if errs else None
  out["parametric_final_rel_error"] = out["points"][-1]["rel_error"]
  last = run["points"][-1]
  out["frontier_final_predicted"] = float(law.predict(last["compute"])) if law else None
  out["frontier_final_rel_error"] = (out["frontier_final_predicted"] - last["loss"]) / last["loss"] if law else None
  return out


def not_a_result(entry: dict | None) -> str | None:
  """Why a law's record is not a result ('not fitted: ...' or 'not a result: ...'), or None."""
  if entry is None:
    return None
  if entry["fit"] is None:
    return f"not fitted: {entry['error']}"
  if not entry["trusted"]:
    return f"not a result: {trust.summary(entry['warnings'])}"
  return None


def warning_line(result: dict) -> str | None:
  """One line naming every law of ``result`` that is not a result and why, or None."""
  parts = [f"{LAWS[k]} {why}" for k in LAWS if (why := not_a_result(result.get(k)))]
  if not parts:
    return None
  return "warning: " + " | ".join(" ".join(p.split()) for p in parts) + " (marked in scaling.json)"


def headline(result: dict) -> dict:
  """The laws and held-out errors of the headline (``analysis.headline``); a law that is not
  trusted appears as 'not a result: ...', and so do the errors it predicted."""
  out: dict[str, Any] = {}
  keys = {"frontier": ("e", "a", "alpha", "r2_log", "ci"), "parametric": ("e", "a", "b", "alpha", "beta", "r2_log")}
  keys["isoflop"] = ("a", "k", "ci")
  for name, shown in keys.items():
    entry = result.get(name)
    if entry is not None:
      out[name] = not_a_result(entry) or {k: entry["fit"][k] for k in shown}
  withheld = "not a result: predicted by a law that is not trusted"
  for h in result.get("holdout", []):
    par_ok, law_ok = h.get("parametric_law_trusted", True), h.get("frontier_law_trusted", True)
    out[f"holdout {h['run']}"] = {
      "parametric_mean_abs_rel_error": h["parametric_mean_abs_rel_error"] if par_ok else withheld,
      "parametric_final_rel_error": h["parametric_final_rel_error"] if par_ok else withheld,
      "frontier_final_rel_error": h["frontier_final_rel_error"] if law_ok else withheld,
    }
  return out
