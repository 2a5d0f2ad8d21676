"""Comparing runs that differ in one config key, as the paper's formulation study ranks
formulations (section 5.1, Table 1).

Runs equal in everything but the key (same depth, length and other settings) form a group. In a
group every run is ranked by each criterion: the loss (for ``flow.formulation`` the yardstick
val/rf_loss, the only loss all formulations share; otherwise the fitted loss), and every sample
metric at each sampling step count it was logged at (``clip_score@25``, ``fid_clip@25``,
``sample_accuracy@20``, ``reading_distance@20``: lower is better for losses, FIDs and distances,
higher for the rest). Two summaries per run: the mean of its ranks, and the paper's: at each step
count where every run has both of two quality measures, non-dominated sorting of the pairs (rank 1
= no run is better in both), averaged over the step counts. The pair is CLIP score and FID where
they were logged (the paper's), otherwise the toy study's sample accuracy and reading distance
(``QUALITY_PAIRS``).
"""

from __future__ import annotations

import collections
from typing import Any, Sequence

import numpy as np
from scipy import stats

LOWER_IS_BETTER = ("loss", "fid", "distance")
# The paper's rank sorts by two quality measures, one of alignment with the caption and one of
# distance to real images; the first pair every run has at some step count is used.
QUALITY_PAIRS = (("clip_score", "fid_clip"), ("sample_accuracy", "reading_distance"))


def higher_is_better(metric: str) -> bool:
  name = metric.split("@")[0].rsplit("/", 1)[-1]
  return not any(w in name for w in LOWER_IS_BETTER)


def ranks(values: Sequence[float], higher_better: bool) -> list[float]:
  """1 = best; ties share their mean rank; a missing value (None) gets no rank."""
  idx = [i for i, v in enumerate(values) if v is not None and np.isfinite(v)]
  out: list[float] = [None] * len(values)  # type: ignore[list-item]
  if not idx:
    return out
  x = np.array([values[i] for i in idx], np.float64)
  r = stats.rankdata(-x if higher_better else x, method="average")
  for i, ri in zip(idx, r):
    out[i] = float(ri)
  return out


def pareto_ranks(points: Sequence[tuple[float, float]]) -> list[int]:
  """Non-dominated sorting of points to be maximised in both coordinates: rank 1 is the front
  no point beats in both (and strictly in one), rank 2 the front once rank 1 is removed, ..."""
  left, out, level = set(range(len(points))), [0] * len(points), 1
  while left:
    front = {
      i
      for i in left
      if not any(points[j][0] >= points[i][0] and points[j][1] >= points[i][1] and points[j] != points[i] for j in left)
    }
    for i in front:
      out[i] = level
    left -= front
    level += 1
  return out


def _steps(metric: str) -> str | None:
  return metric.split("@", 1)[1] if "@" in metric else None


def _shared_counts(members: Sequence[dict], pair: tuple[str, str]) -> list[str]:
  """The sampling step counts at which every run has both metrics of `pair`."""
  counts = {_steps(m) for r in members for m in r["sample_metrics"] if m.startswith(f"{pair[0]}@")}
  shared = [c for c in counts if all(r["sample_metrics"].get(f"{m}@{c}") is not None for r in members for m in pair)]
  return sorted(shared, key=lambda c: (len(c), c))  # numeric order


def quality_pair(members: Sequence[dict]) -> tuple[str, str] | None:
  """The first of QUALITY_PAIRS that every run has at some sampling step count, or None."""
  return next((pair for pair in QUALITY_PAIRS if _shared_counts(members, pair)), None)


def paper_average_rank(members: Sequence[dict], pair: tuple[str, str] | None = None) -> list[float | None]:
  """The paper's summary: at each step count where every run has both quality measures of
  `pair` (default ``quality_pair(members)``: CLIP score and FID, else sample accuracy and reading
  distance), the non-dominated-sorting rank of the pair, each measure turned so that higher is
  better (``higher_is_better``: -FID, -distance); averaged over those step counts."""
  pair = pair or quality_pair(members)
  per_run: list[list[int]] = [[] for _ in members]
  for steps in _shared_counts(members, pair) if pair else []:
    sign = [1.0 if higher_is_better(m) else -1.0 for m in pair]
    points = [tuple(s * r["sample_metrics"][f"{m}@{steps}"] for s, m in zip(sign, pair)) for r in members]
    for i, rank in enumerate(pareto_ranks(points)):
      per_run[i].append(rank)
  return [float(np.mean(r)) if r else None for r in per_run]


def rank_group(members: Sequence[dict], key: str, loss: str) -> list[dict]:
  """Rows of one group, best first by the loss criterion (see the module docstring)."""
  criteria = {loss: False}
  for m in sorted({m for r in members for m in r["sample_metrics"]}):
    criteria[m] = higher_is_better(m)
  values = {c: [_value(r, c, loss) for r in members] for c in criteria}
  by = {c: ranks(v, hb) for (c, hb), v in zip(criteria.items(), values.values())}
  pair = quality_pair(members)
  paper = paper_average_rank(members, pair)
  rows = []
  for i, r in enumerate(members):
    own = [by[c][i] for c in criteria if by[c][i] is not None]
    rows.append(
      {
        "value": r["config"].get(key),
        "run": r["name"],
        "final_loss": r["points"][-1]["loss"],
        "val_loss": r["points"][-1]["val_loss"],
        "rf_loss": r["points"][-1].get("rf_loss"),
        "sample_metrics": dict(r["sample_metrics"]),
        "ranks": {c: by[c][i] for c in criteria},
        "mean_rank": float(np.mean(own)) if own else None,
        "paper_rank": paper[i],
        "paper_rank_by": "/".join(pair) if pair else None,
        # kept for readers of older reports
        "sample_accuracy": r.get("sample_accuracy"),
        "part_accuracy": r.get("part_accuracy"),
      }
    )
  order = sorted(range(len(rows)), key=lambda i: (rows[i]["ranks"][loss] is None, rows[i]["ranks"][loss] or 0, i))
  out = [rows[i] for i in order]
  for place, row in enumerate(out, 1):
    row["rank"] = place
  return out


def _value(run: dict, criterion: str, loss: str) -> Any:
  if criterion == loss:
    last = run["points"][-1]
    return last.get("rf_loss") if loss == "rf_loss" else last["loss"]
  return run["sample_metrics"].get(criterion)


def comparisons(runs: Sequence[dict], keys: Sequence[str]) -> list[dict]:
  """For each varied key, the groups of runs that differ only in it (same depth and length),
  ranked (module docstring): e.g. the formulations, or the timestep samplers, at equal compute."""
  out = []
  for k in keys:
    others = [o for o in keys if o != k]
    groups = collections.defaultdict(list)
    for r in runs:
      groups[(r["depth"], r["total_steps"], tuple(repr(r["config"].get(o)) for o in others))].append(r)
    for (depth, steps, _), members in groups.items():
      if len({repr(m["config"].get(k)) for m in members}) < 2:
        continue
      shared = all(m["points"][-1].get("rf_loss") is not None for m in members)
      loss = "rf_loss" if k == "flow.formulation" and shared else "loss"
      rows = rank_group(members, k, loss)
      out.append(
        {
          "key": k,
          "depth": depth,
          "steps": steps,
          "ranked_by": "val/rf_loss" if loss == "rf_loss" else "the fitted loss",
          "compute": members[0]["points"][-1]["compute"],
          "rows": rows,
        }
      )
  return out


def write_csv(groups: Sequence[dict], path: str) -> None:
  """One row per run of every group: its value, losses, sample metrics and ranks."""
  import csv

  metrics = sorted({m for g in groups for row in g["rows"] for m in row["sample_metrics"]})
  header = ["key", "depth", "steps", "value", "run", "rank", "rf_loss", "val_loss", "final_loss", *metrics]
  header += ["mean_rank", "paper_rank", "paper_rank_by"]
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(header)
    for g in groups:
      for row in g["rows"]:
        w.writerow(
          [g["key"], g["depth"], g["steps"], row["value"], row["run"], row["rank"], row["rf_loss"], row["val_loss"]]
          + [row["final_loss"], *[row["sample_metrics"].get(m) for m in metrics], row["mean_rank"], row["paper_rank"]]
          + [row["paper_rank_by"]]
        )


def rank_correlation(x: Sequence[float], y: Sequence[float]) -> dict[str, float | None]:
  """Spearman's rho of ``x`` and ``y`` with its p-value; None for what is undefined (a constant
  series has no rank correlation; two points have no p-value)."""
  if len(set(x)) < 2 or len(set(y)) < 2:
    return {"rho": None, "p_value": None}
  rho, p = stats.spearmanr(x, y)
  return {"rho": None if np.isnan(rho) else float(rho), "p_value": None if np.isnan(p) else float(p)}


def spearman(runs: Sequence[dict]) -> dict | None:
  """Rank correlation of final loss with sample accuracy across every scored run."""
  scored = [r for r in runs if r["sample_accuracy"] is not None]
  if len(scored) < 3:
    return None
  loss = [r["points"][-1]["loss"] for r in scored]
  out = {"num_runs": len(scored), "runs": [r["name"] for r in scored]}
  for key in ("sample_accuracy", "part_accuracy"):
    out[key] = rank_correlation(loss, [r[key] for r in scored])
  return out
