"""Across-run views of a study that are about its cost and its hyperparameters, from runs read by
``analysis.read_run``: the compute spent with cooldown branches against the compute of the same
runs from scratch, and hyperparameter transfer across width (muP). ``keys`` are the config keys
that vary between the runs (``analysis.varying_keys``).
"""

from __future__ import annotations

import collections
from typing import Sequence


def compute_totals(runs: Sequence[dict]) -> dict:
  """The study's compute: ``spent`` counts what each run added (a branch only its cooldown),
  ``from_scratch`` what its models would have cost trained apart, and the saving."""
  spent = float(sum(r["own_compute"] for r in runs))
  scratch = float(sum(r["points"][-1]["compute"] for r in runs))
  return {
    "spent": spent,
    "from_scratch": scratch,
    "saved": scratch - spent,
    "saved_fraction": (scratch - spent) / scratch if scratch else 0.0,
    "branches": sum(1 for r in runs if r["branch_of"]),
  }


def transfer(runs: Sequence[dict], keys: Sequence[str], key: str = "optimizer.learning_rate") -> list[dict]:
  """Hyperparameter transfer across width: for runs that vary ``key`` at two or more widths and
  agree on everything else (depth, length, every other varied key, e.g. the parametrization), the
  final loss of each (width, value), the best value per width, and ``shift``: how many grid steps
  the best value moves between widths (muP's claim: at most one). A run that diverged has final
  loss None and is never the best."""
  if key not in keys:
    return []
  others = [k for k in keys if k != key]
  groups = collections.defaultdict(list)
  for r in runs:
    if key in r["config"]:
      groups[(r["depth"], r["total_steps"], tuple((o, r["config"].get(o)) for o in others))].append(r)
  out = []
  for (depth, steps, fixed), members in sorted(groups.items(), key=lambda kv: repr(kv[0])):
    widths = sorted({m["width"] for m in members})
    if len(widths) < 2:
      continue
    grid = sorted({m["config"][key] for m in members})
    curves, best = {}, {}
    for w in widths:
      rows = sorted((m["config"][key], _final(m)) for m in members if m["width"] == w)
      curves[w] = [{"value": v, "final_loss": loss} for v, loss in rows]
      done = [(loss, v) for v, loss in rows if loss is not None]
      best[w] = min(done)[1] if done else None
    index = [grid.index(v) for v in best.values() if v is not None]
    out.append(
      {
        "key": key,
        "depth": depth,
        "steps": steps,
        "fixed": {o: v for o, v in fixed},
        "grid": grid,
        "curves": {str(w): c for w, c in curves.items()},
        "best": {str(w): v for w, v in best.items()},
        "shift": (max(index) - min(index)) if index else None,
      }
    )
  return out


def _final(run: dict) -> float | None:
  """The final loss of a run that reached its last step; None for one that diverged or stopped."""
  if run["diverged"] or not run["finished"]:
    return None
  return float(run["points"][-1]["loss"])
