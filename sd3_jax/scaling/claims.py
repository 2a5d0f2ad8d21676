"""The toy study's claims judged from its parts' runs (``study.study`` writes the report).

``read_part`` reads one part's runs (``configs/scaling/toy_study.py``: each run's validation points,
held-out sample scores ``RUN/sample_eval.json`` and logged throughput); ``regime``,
``throughput_table`` and one ``claim_*`` function per claim of the paper turn them into tables and
a verdict from the numbers, with the paper's result beside ours.

Quality is the checker's all-parts sample accuracy (``sample_accuracy@N``: colours, both shapes
and the relation right) and the reading distance to real renders (``reading_distance@N``, lower is
better) at N sampling steps; the validation loss of every claim is the rf yardstick
``val/rf_loss`` (``docs/formulations.md``), the one loss every formulation shares.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import numpy as np
from scipy import stats

from sd3_jax.scaling import analysis, laws, ranking

log = logging.getLogger(__name__)

PARTS = ("scaling", "formulations", "backbones")
MANY, FEW = 25, 5  # sampling step counts the study scores
REGIME_FACTOR = 10.0  # the best run must reach this multiple of the checker's chance level

# The paper's results the claims are read against (Esser et al. 2024).
PAPER_FORMULATION_RANK = {  # Table 1, average rank over all 24 settings (lower is better)
  "rf/lognorm(0.00,1.00)": 1.54,
  "rf/mode(1.29)": 2.75,
  "eps/linear": 2.88,
  "rf/cosmap": 4.13,
  "rf": 5.67,
  "v/cos": 9.17,
  "edm(-1.20,1.20)": 15.58,
}
PAPER_STEP_DROP = {15: 0.0430, 38: 0.0271}  # section 5.3: relative CLIP-score drop, 50 -> 5 steps
PAPER_BACKBONES = (
  "MM-DiT best in loss and quality; DiT worst; UViT fastest early; 3 weight sets only slightly better than 2"
)


def read_part(part_dir: str) -> list[dict]:
  """The runs of one part that have a validation point (``analysis.read_run``, with its
  throughput), each with its quality at the study's step counts, chance level and yardstick loss."""
  out = []
  for run_dir in analysis.find_runs([part_dir]):
    try:
      run = analysis.read_run(run_dir, loss="val/rf_loss")
    except FileNotFoundError as e:
      log.warning("skipping %s: %s", run_dir, e)
      continue
    if not run["points"]:
      continue
    sample = run["sample_eval"]
    by_steps = sample.get("by_steps", {})
    run["num_samples"] = sample.get("num_prompts", 0) * sample.get("samples_per_prompt", 0) or None
    run["quality"] = {
      int(n): {k: v[k] for k in ("sample_accuracy", "part_accuracy", "reading_distance", "chance") if k in v}
      for n, v in by_steps.items()
    }
    run["final_rf_loss"] = run["points"][-1]["loss"]
    out.append(run)
  return out


def backbone_of(run: dict) -> str:
  """The backbone a run trained (a config without the key, or with None, is an MM-DiT)."""
  return run["config"].get("model.backbone") or "mmdit"


def quality(run: dict, n: int, key: str = "sample_accuracy") -> float | None:
  return (run["quality"].get(n) or {}).get(key)


def chance_of(run: dict, n: int = MANY) -> float | None:
  chance = (run["quality"].get(n) or {}).get("chance")
  return None if chance is None else float(chance.get("all", np.nan) if isinstance(chance, dict) else chance)


def interval(values: Sequence[float], level: float = 0.95) -> dict[str, Any]:
  """Mean and the Student-t interval of the mean over ``values`` (seeds); no interval from one value."""
  x = np.asarray([v for v in values if v is not None], np.float64)
  if len(x) == 0:
    return {"mean": None, "low": None, "high": None, "n": 0}
  if len(x) == 1:
    return {"mean": float(x[0]), "low": None, "high": None, "n": 1}
  half = stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x))
  return {"mean": float(x.mean()), "low": float(x.mean() - half), "high": float(x.mean() + half), "n": len(x)}


# Regime and throughput


def regime(runs: Sequence[dict]) -> dict[str, Any]:
  """Does the checker separate runs? Each run's accuracy (at MANY steps) against its own chance
  level (its samples scored against shuffled captions: a model that draws blobs the checker reads
  generously has a high one), the best and worst runs by that ratio."""
  scored = [r for r in runs if quality(r, MANY) is not None and chance_of(r)]
  if not scored:
    return {"scored_runs": 0}
  ratio = [quality(r, MANY) / chance_of(r) for r in scored]
  best, worst = int(np.argmax(ratio)), int(np.argmin(ratio))

  def entry(i):
    return {
      "run": scored[i]["name"],
      "accuracy": quality(scored[i], MANY),
      "chance": chance_of(scored[i]),
      "times_chance": ratio[i],
    }

  return {
    "scored_runs": len(scored),
    "chance": float(np.median([chance_of(r) for r in scored])),  # the median run's
    "best": entry(best),
    "worst": entry(worst),
    "discriminates": bool(ratio[best] >= REGIME_FACTOR),
  }


def throughput_table(runs: Sequence[dict]) -> list[dict]:
  """Per part and model (depth, backbone): parameters, exact train FLOPs per step, median step
  time and GFLOP/s achieved per run, over the runs that logged them (a part trained with
  ``--jobs N`` ran N such runs at once)."""
  groups: dict[tuple, list[dict]] = {}
  for r in runs:
    groups.setdefault((r.get("part", ""), r["depth"], backbone_of(r)), []).append(r)
  rows = []
  for (part, depth, backbone), members in sorted(
    groups.items(), key=lambda kv: (PARTS.index(kv[0][0]) if kv[0][0] in PARTS else 9, kv[0])
  ):
    timed = [m for m in members if m["gflops_per_sec"] is not None]
    rows.append(
      {
        "part": part,
        "depth": depth,
        "backbone": backbone,
        "params": members[0]["params"]["total"],
        "gflop_per_step": members[0]["flops_per_step"] / 1e9,
        "step_time": float(np.median([m["step_time"] for m in timed])) if timed else None,
        "gflops_per_sec": float(np.median([m["gflops_per_sec"] for m in timed])) if timed else None,
        "runs": len(members),
      }
    )
  return rows


# Claim 1: loss against compute


def claim_frontier(part_dir: str, out: str, num_bootstrap: int = 200) -> dict[str, Any]:
  """The frontier and parametric laws over every depth, and with the largest depth held out and
  predicted (figures: out/claim1_all/, out/claim1_holdout/)."""
  full = analysis.analyze([part_dir], os.path.join(out, "claim1_all"), loss="val/rf_loss", num_bootstrap=num_bootstrap)
  held = analysis.analyze(
    [part_dir], os.path.join(out, "claim1_holdout"), loss="val/rf_loss", holdout="largest", num_bootstrap=num_bootstrap
  )
  frontier = full["frontier"]
  r2 = frontier["fit"]["r2_log"] if frontier["fit"] else None
  predictions = []
  for h in held["holdout"]:
    predictions.append(
      {
        "run": h["run"],
        "final_step": h["points"][-1]["step"],
        "measured": h["points"][-1]["measured"],
        "frontier_rel_error": h["frontier_final_rel_error"] if h["frontier_law_trusted"] else None,
        "parametric_rel_error": h["parametric_final_rel_error"] if h["parametric_law_trusted"] else None,
        # what an untrusted law predicted: kept for the account of why the claim failed, never a result
        "untrusted_frontier_rel_error": None if h["frontier_law_trusted"] else h["frontier_final_rel_error"],
        "untrusted_parametric_rel_error": None if h["parametric_law_trusted"] else h["parametric_final_rel_error"],
      }
    )
  predictions.sort(key=lambda p: p["final_step"])
  within = {
    law: sum(1 for p in predictions if p[f"{law}_rel_error"] is not None and abs(p[f"{law}_rel_error"]) <= 0.05)
    for law in ("frontier", "parametric")
  }
  return {
    "frontier": {"fit": frontier["fit"], "trusted": frontier["trusted"], "why_not": laws.not_a_result(frontier)},
    "parametric": {
      "fit": full["parametric"]["fit"],
      "trusted": full["parametric"]["trusted"],
      "why_not": laws.not_a_result(full["parametric"]),
    },
    "holdout_fit": {k: laws.not_a_result(held[k]) or "trusted" for k in ("frontier", "parametric")},
    "r2_log": r2,
    "holdout": predictions,
    "lengths_within_5pct": within,
    "reproduced": bool(
      frontier["trusted"] and r2 is not None and r2 >= 0.97 and within["frontier"] >= 2 and within["parametric"] >= 2
    ),
  }


# Claim 2: formulations


def claim_formulations(runs: Sequence[dict]) -> dict[str, Any]:
  """Per formulation over seeds: the paper's rank (non-dominated sorting over sample accuracy and
  reading distance among the formulations of one seed, averaged over MANY and FEW steps), the
  two quality measures at both step counts and the yardstick loss, each with its interval."""
  by_seed: dict[Any, list[dict]] = {}
  for r in runs:
    by_seed.setdefault(r["config"].get("seed", 0), []).append(r)
  paper_rank: dict[str, list[float]] = {}
  pair = ranking.QUALITY_PAIRS[-1]
  for members in by_seed.values():
    for r, rank in zip(members, ranking.paper_average_rank(members, pair)):
      if rank is not None:
        paper_rank.setdefault(r["config"]["flow.formulation"], []).append(rank)
  names = sorted({r["config"]["flow.formulation"] for r in runs}, key=lambda n: PAPER_FORMULATION_RANK.get(n, 99))
  rows = []
  for name in names:
    members = [r for r in runs if r["config"]["flow.formulation"] == name]
    row = {
      "formulation": name,
      "seeds": sorted(r["config"].get("seed", 0) for r in members),
      "paper_rank": PAPER_FORMULATION_RANK.get(name),
      "rank": interval(paper_rank.get(name, [])),
      "rf_loss": interval([r["final_rf_loss"] for r in members]),
    }
    for n in (FEW, MANY):
      row[f"sample_accuracy@{n}"] = interval([quality(r, n) for r in members])
      row[f"reading_distance@{n}"] = interval([quality(r, n, "reading_distance") for r in members])
    rows.append(row)
  ours = [r["rank"]["mean"] for r in rows]
  theirs = [r["paper_rank"] for r in rows]
  ok = [i for i, (a, b) in enumerate(zip(ours, theirs)) if a is not None and b is not None]
  agreement = {"rho": None, "p_value": None}
  if len(ok) >= 3:
    agreement = ranking.rank_correlation([ours[i] for i in ok], [theirs[i] for i in ok])
  best = min((r for r in rows if r["rank"]["mean"] is not None), key=lambda r: r["rank"]["mean"], default=None)
  return {
    "rows": rows,
    "ranked_by": f"non-dominated sorting over ({pair[0]}, {pair[1]}) at {FEW} and {MANY} steps, per seed",
    "spearman_with_paper": agreement,
    "best": best and best["formulation"],
    "reproduced": bool(
      best and best["formulation"] == "rf/lognorm(0.00,1.00)" and agreement["rho"] is not None and agreement["rho"] > 0
    ),
  }


# Claim 3: backbones


def claim_backbones(runs: Sequence[dict]) -> dict[str, Any]:
  """Per backbone at each compute budget (a cooldown branch per budget): yardstick loss and
  quality; the paper's four observations judged from them."""
  rows = []
  for r in sorted(runs, key=lambda r: (backbone_of(r), r["points"][-1]["compute"])):
    rows.append(
      {
        "backbone": backbone_of(r),
        "run": r["name"],
        "params": r["params"]["total"],
        "steps": r["points"][-1]["step"],
        "compute": r["points"][-1]["compute"],
        "rf_loss": r["final_rf_loss"],
        f"sample_accuracy@{MANY}": quality(r, MANY),
        f"reading_distance@{MANY}": quality(r, MANY, "reading_distance"),
        f"sample_accuracy@{FEW}": quality(r, FEW),
      }
    )
  budgets = sorted({r["budget"] for r in runs if r.get("budget")})
  at = {b: {backbone_of(r): r for r in runs if r.get("budget") == b} for b in budgets}
  checks: dict[str, Any] = {}
  if budgets and len(at[budgets[-1]]) >= 2:
    last, first = at[budgets[-1]], at[budgets[0]]
    loss_last = {k: v["final_rf_loss"] for k, v in last.items()}
    acc_last = {k: quality(v, MANY) for k, v in last.items()}
    checks["lowest_loss_at_largest_budget"] = min(loss_last, key=loss_last.get)
    checks["highest_loss_at_largest_budget"] = max(loss_last, key=loss_last.get)
    scored = {k: a for k, a in acc_last.items() if a is not None}
    checks["best_accuracy_at_largest_budget"] = max(scored, key=scored.get) if scored else None
    distance = {k: quality(v, MANY, "reading_distance") for k, v in last.items()}
    distance = {k: d for k, d in distance.items() if d is not None}
    checks["best_distance_at_largest_budget"] = min(distance, key=distance.get) if distance else None
    loss_first = {k: v["final_rf_loss"] for k, v in first.items()}
    checks["lowest_loss_at_smallest_budget"] = min(loss_first, key=loss_first.get)
    if "mmdit" in loss_last and "mmdit3" in loss_last:
      checks["mmdit3_vs_mmdit_rel_loss"] = loss_last["mmdit3"] / loss_last["mmdit"] - 1.0
    checks["mmdit_best"] = checks["lowest_loss_at_largest_budget"] in ("mmdit", "mmdit3")
    checks["dit_worst"] = checks["highest_loss_at_largest_budget"] == "dit"
    checks["uvit_fastest_early"] = checks["lowest_loss_at_smallest_budget"] == "uvit"
  return {
    "rows": rows,
    "budgets": budgets,
    "checks": checks,
    "reproduced": bool(checks.get("mmdit_best") and checks.get("dit_worst")),
  }


# Claim 4: validation loss predicts quality


def claim_correlation(runs: Sequence[dict]) -> dict[str, Any]:
  """Spearman's rho between final yardstick loss and sample accuracy (at MANY steps) over every
  scored run of the study, with its p-value; also per part. Beside the verdict, over all runs: the
  reading distance (FID's part) and the accuracy over the run's own chance level (a model drawing
  blobs is read generously, so its raw accuracy can pass a better model's)."""

  def rho(members, quality=lambda r: quality(r, MANY)):
    pairs = [(r["final_rf_loss"], quality(r)) for r in members if quality(r) is not None]
    if len(pairs) < 3:
      return {"num_runs": len(pairs), "rho": None, "p_value": None}
    return {"num_runs": len(pairs), **ranking.rank_correlation(*zip(*pairs))}

  out = {"all": rho(runs)}
  for part in PARTS:
    members = [r for r in runs if r.get("part") == part]
    if members:
      out[part] = rho(members)
  out["reproduced"] = bool(out["all"]["rho"] is not None and out["all"]["rho"] <= -0.8)
  out["beside"] = {
    f"reading_distance@{MANY}": rho(runs, lambda r: quality(r, MANY, "reading_distance")),
    f"accuracy_over_chance@{MANY}": rho(runs, lambda r: quality(r, MANY) / chance_of(r) if chance_of(r) else None),
  }
  return out


# Claim 5: larger models need fewer steps


def _drop(many: float | None, few: float | None) -> float | None:
  return (many - few) / many if many and few is not None else None


def drop_interval(many: float | None, few: float | None, n: int | None, draws: int = 4000, seed: int = 0):
  """95% interval of (many - few) / many when each accuracy is a share of ``n`` samples: a
  parametric bootstrap drawing both counts as independent binomials. The two step counts sample
  the same prompts with the same noise, so their errors are positively correlated and the true
  interval is narrower: this one is conservative."""
  if not many or few is None or not n:
    return None
  rng = np.random.default_rng(seed)
  a = rng.binomial(n, many, draws) / n
  b = rng.binomial(n, few, draws) / n
  ok = a > 0
  drop = (a[ok] - b[ok]) / a[ok]
  return [float(np.percentile(drop, 2.5)), float(np.percentile(drop, 97.5))]


def claim_steps(runs: Sequence[dict]) -> dict[str, Any]:
  """Per depth (the longest run of each): the relative accuracy drop from MANY to FEW sampling
  steps, (q_many - q_few) / q_many, and the reading distance's rise; the paper's drop shrinks
  with depth."""
  longest: dict[int, dict] = {}
  for r in runs:
    if r["depth"] not in longest or r["points"][-1]["step"] > longest[r["depth"]]["points"][-1]["step"]:
      longest[r["depth"]] = r
  rows = []
  for depth, r in sorted(longest.items()):
    many, few = quality(r, MANY), quality(r, FEW)
    chance = chance_of(r)
    rows.append(
      {
        "depth": depth,
        "run": r["name"],
        f"sample_accuracy@{MANY}": many,
        f"sample_accuracy@{FEW}": few,
        "relative_drop": _drop(many, few),
        "relative_drop_interval": drop_interval(many, few, r.get("num_samples")),
        f"reading_distance@{MANY}": quality(r, MANY, "reading_distance"),
        f"reading_distance@{FEW}": quality(r, FEW, "reading_distance"),
        # reported beside the verdict: the mean over the checker's four parts is a finer measure
        "part_relative_drop": _drop(quality(r, MANY, "part_accuracy"), quality(r, FEW, "part_accuracy")),
        # below 2x chance the ratio measures noise, not the model
        "above_2x_chance": bool(many is not None and chance and many >= 2 * chance),
      }
    )
  usable = [row for row in rows if row["relative_drop"] is not None and row["above_2x_chance"]]
  trend = None
  if len(usable) >= 3:
    trend = ranking.rank_correlation([row["depth"] for row in usable], [row["relative_drop"] for row in usable])
  elif len(usable) == 2:
    trend = {"rho": 1.0 if usable[1]["relative_drop"] > usable[0]["relative_drop"] else -1.0, "p_value": None}
  return {
    "rows": rows,
    "usable_depths": [row["depth"] for row in usable],
    "depth_vs_drop": trend,
    "reproduced": bool(trend and trend["rho"] is not None and trend["rho"] < 0),
  }
