"""From training workdirs to a scaling study: runs.csv, scaling.json and the fits.

Each run is read from its own files only (its saved experiment config and ``metrics.jsonl``),
so runs trained here, on a pod from ``--print_commands`` lines, or by hand all work. Parameters
and compute come from the config (``family``); every validation row of a run is one point
(step, images seen, compute, loss, the rf yardstick val/rf_loss). The last logged ``eval/``
metrics and ``RUN/sample_eval.json`` (``toy.score_run``) add the run's sample metrics at each
sampling step count. Runs that differ in one key are ranked by ``ranking`` (for formulations:
by the yardstick and every sample metric). The laws (``laws``: each marked trusted or not, with
its reasons) and the held-out prediction are described in docs/scaling.md.
A point's ``compute`` is what its model cost from scratch; a run's ``own_compute`` is what it added
to the study (a cooldown branch: its cooldown only). ``compare`` sums both ("compute") and reports
learning-rate transfer across width ("transfer").
"""

from __future__ import annotations

import collections
import csv
import json
import logging
import os
from typing import Any, Sequence

import numpy as np

from sd3_jax import config as config_lib
from sd3_jax import flow
from sd3_jax.storage import fileutil
from sd3_jax.training import branch
from sd3_jax.models import mmdit
from sd3_jax.scaling import compare, family, laws, ranking, sweep

log = logging.getLogger(__name__)

METRICS = "metrics.jsonl"
DIVERGED = "diverged.json"  # written by the sweep runner when a run's loss became NaN/Inf
# Config keys that place a run in the family or its length, not what a comparison varies: those
# a sweep sets for every run, and the logging cadence.
FAMILY_KEYS = sweep.RUN_KEYS + ("log_every",)


def find_runs(dirs: Sequence[str]) -> list[str]:
  """Run directories (holding metrics.jsonl) among ``dirs`` and their immediate subdirectories."""
  out = []
  for d in dirs:
    if not os.path.isdir(d):
      raise FileNotFoundError(f"no directory {d!r}: give run directories or a sweep directory")
    if os.path.isfile(os.path.join(d, METRICS)):
      out.append(os.path.abspath(d))
      continue
    subs = sorted(os.path.join(d, s) for s in os.listdir(d) if os.path.isfile(os.path.join(d, s, METRICS)))
    if not subs:
      raise FileNotFoundError(f"{d!r} holds no run: no {METRICS} in it or in its subdirectories")
    out += [os.path.abspath(s) for s in subs]
  return list(dict.fromkeys(out))


def read_config(run_dir: str) -> dict:
  """The experiment config a run saved with its latest committed checkpoint."""
  from sd3_jax.storage import checkpoint

  ckpt = os.path.join(run_dir, "checkpoints")
  for step in reversed(checkpoint.committed_steps(ckpt)):
    path = os.path.join(ckpt, str(step), checkpoint.CONFIG, "metadata")  # orbax's JSON item file
    if os.path.isfile(path):
      with open(path) as f:
        return json.load(f)
  raise FileNotFoundError(
    f"{run_dir} has no committed checkpoint with its config yet; analyze it after its first checkpoint"
  )


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten(v, key + "."))
    else:
      out[key] = tuple(v) if isinstance(v, list) else v
  return out


def _levels(row: dict) -> dict[float, float]:
  return {float(k[len("val/loss_t") :]): v for k, v in row.items() if k.startswith("val/loss_t") and v is not None}


def loss_of(row: dict, loss: str = "val/loss", levels: str | None = None) -> float | None:
  """The loss to fit from one validation row: ``loss`` as logged, or the mean of the logged t
  ``levels`` ('interior': every level with 0 < t < 1; or '0.143,0.286')."""
  if levels is None:
    value = row.get(loss)
    return None if value is None else float(value)
  logged = _levels(row)
  if levels == "interior":
    chosen = [v for t, v in logged.items() if 0.0 < t < 1.0]
  else:
    chosen = []
    for text in levels.split(","):
      t = float(text)
      match = [lv for lt, lv in logged.items() if abs(lt - t) < 5e-4]
      if not match:
        raise ValueError(f"no validation level t={t} was logged; logged levels: {sorted(logged)}")
      chosen.append(match[0])
  return float(np.mean(chosen)) if chosen else None


def read_run(run_dir: str, *, loss: str = "val/loss", levels: str | None = None) -> dict:
  """One run: its config, family member, compute and validation points."""
  cfg = read_config(run_dir)
  mcfg = mmdit.config_from_preset(**cfg["model"])
  d = cfg["data"]
  per_step = family.run_compute(
    mcfg, latent_size=d["latent_size"], context_len=d["context_len"], batch_size=cfg["global_batch_size"], steps=1
  )
  rows: dict[int, dict] = {}
  evals: dict[str, Any] = {}  # the last logged value of every eval/ key
  timed: list[dict] = []  # rows with the trainer's throughput
  with open(os.path.join(run_dir, METRICS)) as f:
    for line in f:
      if line.strip():
        try:
          r = json.loads(line)
        except json.JSONDecodeError:
          continue  # a torn last line of a run still writing
        if "val/loss" in r:
          rows[int(r["step"])] = r  # a resumed run logs a step again: keep the last
        evals.update({k: v for k, v in r.items() if k.startswith("eval/")})
        if r.get("step_time") is not None and r.get("tflops_per_sec") is not None:
          timed.append(r)
  points = []
  for step in sorted(rows):
    c = family.run_compute(
      mcfg, latent_size=d["latent_size"], context_len=d["context_len"], batch_size=cfg["global_batch_size"], steps=step
    )
    value = loss_of(rows[step], loss, levels)
    if value is None or not np.isfinite(value) or value <= 0:
      continue
    points.append(
      {
        "step": step,
        "images": c.images,
        "compute": c.flops,
        "compute_6nd": c.flops_6nd,
        "loss": value,
        "val_loss": rows[step].get("val/loss"),
        "rf_loss": rows[step].get("val/rf_loss"),
        "levels": {f"val/loss_t{t:.3f}": v for t, v in sorted(_levels(rows[step]).items())},
      }
    )
  extra = {}
  for name in ("scaling_run.json", "sample_eval.json", DIVERGED):
    path = os.path.join(run_dir, name)
    if os.path.isfile(path):
      with open(path) as f:
        extra[name] = json.load(f)
  sample = extra.get("sample_eval.json", {})
  origin = branch.parse(cfg["branch_from"])[1] if cfg.get("branch_from") else 0  # a cooldown branch's start
  last = points[-1]["step"] if points else origin
  return {
    "name": os.path.basename(run_dir),
    "dir": run_dir,
    "config": normalized_config(cfg),
    "sample_metrics": sample_metrics(evals, cfg, sample),
    "depth": mcfg.depth,
    "width": mcfg.hidden_size,
    "width_per_depth": mcfg.hidden_size / mcfg.depth,
    "branch_of": os.path.basename(os.path.dirname(os.path.dirname(cfg["branch_from"].rstrip("/")))) if origin else None,
    "branch_step": origin,
    "own_compute": per_step.flops_per_step * max(last - origin, 0),
    "diverged": extra.get(DIVERGED),
    "params": family.param_counts(mcfg),
    "flops_per_step": per_step.flops_per_step,
    "total_steps": cfg["total_steps"],
    "budget": extra.get("scaling_run.json", {}).get("budget"),
    "finished": bool(points) and points[-1]["step"] == cfg["total_steps"],
    "points": points,
    "sample_accuracy": sample.get("sample_accuracy"),
    "part_accuracy": sample.get("part_accuracy"),
    "sample_eval": sample,  # RUN/sample_eval.json as written ({} when the run was not scored)
    **throughput(timed),
  }


def throughput(rows: Sequence[dict]) -> dict[str, float | None]:
  """Median training throughput over logged metrics rows: ``step_time`` (s) and
  ``gflops_per_sec`` (all devices, from the exact FLOPs; the trainer's timer excludes compilation
  and checkpointing); None for both when no row has them."""
  rows = [r for r in rows if r.get("step_time") is not None and r.get("tflops_per_sec") is not None]
  if not rows:
    return {"step_time": None, "gflops_per_sec": None}
  return {
    "step_time": float(np.median([r["step_time"] for r in rows])),
    "gflops_per_sec": 1e3 * float(np.median([r["tflops_per_sec"] for r in rows])),
  }


def normalized_config(cfg: dict) -> dict[str, Any]:
  """The flattened config with ``flow.formulation`` in canonical form, also for runs trained
  before it existed (their retired flow.sampler keys say which rf density they trained)."""
  out = _flatten(cfg)
  for k in config_lib.RETIRED_FLOW_KEYS:
    out.pop(f"flow.{k}", None)
  out["flow.formulation"] = flow.canonical_name(config_lib.formulation_name(cfg))
  return out


def sample_metrics(eval_row: dict, cfg: dict, sample: dict) -> dict[str, float]:
  """{'<metric>@<sampling steps>': value} from the last logged ``eval/`` row (``eval/<metric>``
  at config eval.num_steps, or ``eval/steps<N>/<metric>``) and from sample_eval.json."""
  out = {}
  default = (cfg.get("eval") or {}).get("num_steps")
  for k, v in eval_row.items():
    parts = k.split("/")
    if parts[0] != "eval" or v is None or parts[-1] == "num_images":
      continue
    if len(parts) == 3 and parts[1].startswith("steps"):
      out[f"{parts[2]}@{parts[1][len('steps') :]}"] = float(v)
    elif len(parts) == 2 and isinstance(default, int):
      out[f"{parts[1]}@{default}"] = float(v)
  by_steps = dict(sample.get("by_steps") or {})
  if not by_steps and sample.get("sample_accuracy") is not None:
    by_steps = {str((sample.get("sampler") or {}).get("steps")): sample}
  for steps, values in by_steps.items():
    for name in ("sample_accuracy", "part_accuracy", "reading_distance"):
      if values.get(name) is not None:
        out[f"{name}@{steps}"] = float(values[name])
  return out


def varying_keys(runs: Sequence[dict]) -> list[str]:
  """Config keys whose value differs between the runs that have them, other than the family /
  length keys and paths. A key some runs lack (they were trained by a version of the code before
  it existed) does not vary on that account."""
  keys = sorted(set().union(*(r["config"] for r in runs)))
  out = []
  for k in keys:
    if k in FAMILY_KEYS or k.endswith("path"):
      continue
    if len({repr(r["config"][k]) for r in runs if k in r["config"]}) > 1:
      out.append(k)
  return out


def select(runs: Sequence[dict], where: dict[str, Any]) -> list[dict]:
  """The runs the fits use: those matching ``where``; without it, each varying key at its most
  common value (e.g. the default sampler, not the sampler comparison's alternatives; a tie goes
  to the value sorted first, so the choice never depends on the order runs are read in). Runs
  lacking a key are kept."""
  if where:
    for k in where:
      if not any(k in r["config"] for r in runs):
        raise ValueError(f"--where {k}: no run has that config key")
    if "flow.formulation" in where:  # 'rf/lognorm(0,1)' selects rf/lognorm(0.00,1.00)
      where = dict(where, **{"flow.formulation": flow.canonical_name(str(where["flow.formulation"]))})
    return [r for r in runs if all(str(r["config"].get(k)) == str(v) for k, v in where.items())]
  chosen = list(runs)
  for k in varying_keys(runs):
    counts = collections.Counter(repr(r["config"][k]) for r in chosen if k in r["config"])
    if not counts:
      continue
    common = min(counts, key=lambda v: (-counts[v], v))
    chosen = [r for r in chosen if k not in r["config"] or repr(r["config"][k]) == common]
  return chosen


def _holdout(runs: Sequence[dict], holdout: str | None) -> list[str]:
  if not holdout:
    return []
  if holdout == "largest":
    top = max(r["params"]["total"] for r in runs)
    return [r["name"] for r in runs if r["params"]["total"] == top]
  names = [n.strip() for n in holdout.split(",") if n.strip()]
  unknown = set(names) - {r["name"] for r in runs}
  if unknown:
    raise ValueError(f"--holdout names unknown runs {sorted(unknown)}; runs: {[r['name'] for r in runs]}")
  return names


def analyze(
  dirs: Sequence[str],
  out: str,
  *,
  loss: str = "val/loss",
  levels: str | None = None,
  holdout: str | None = None,
  where: dict[str, Any] | None = None,
  num_bootstrap: int = 200,
  seed: int = 0,
  param_count: str = "non_embedding",
  plots: bool = True,
  transfer_key: str = "optimizer.learning_rate",
) -> dict:
  """Reads the runs under ``dirs``, writes OUT/runs.csv and OUT/scaling.json (and plots)."""
  if param_count not in ("non_embedding", "total"):
    raise ValueError(f"param_count must be 'non_embedding' or 'total', got {param_count!r}")
  runs = []
  for run_dir in find_runs(dirs):
    try:
      run = read_run(run_dir, loss=loss, levels=levels)
    except FileNotFoundError as e:  # started but not checkpointed yet
      log.warning("skipping %s: %s", run_dir, e)
      continue
    if run["points"]:
      runs.append(run)
  if not runs:
    raise ValueError(f"no run under {list(dirs)} has logged a validation loss ({loss}) yet")
  os.makedirs(out, exist_ok=True)
  write_csv(runs, os.path.join(out, "runs.csv"))
  fit_runs = select(runs, where or {})
  held = _holdout(fit_runs if not holdout or holdout == "largest" else runs, holdout)
  train_runs = [r for r in fit_runs if r["name"] not in held]
  result: dict[str, Any] = {
    "loss": levels and f"mean of levels {levels}" or loss,
    "param_count": param_count,
    "runs": [
      {
        k: r[k]
        for k in (
          "name",
          "depth",
          "width",
          "width_per_depth",
          "params",
          "flops_per_step",
          "total_steps",
          "budget",
          "finished",
          "sample_accuracy",
          "part_accuracy",
          "branch_of",
          "branch_step",
          "own_compute",
          "diverged",
        )
      }
      | {
        "final_loss": r["points"][-1]["loss"],
        "final_rf_loss": r["points"][-1]["rf_loss"],
        "sample_metrics": r["sample_metrics"],
        "final_step": r["points"][-1]["step"],
        "compute": r["points"][-1]["compute"],
        "compute_6nd": r["points"][-1]["compute_6nd"],
        "compute_6nd_over_exact": r["points"][-1]["compute_6nd"] / r["points"][-1]["compute"],
        "axes": {k: r["config"].get(k) for k in varying_keys(runs)},
      }
      for r in runs
    ],
    "fit_runs": [r["name"] for r in train_runs],
    "holdout_runs": held,
  }
  laws_found, law, par = laws.fit_laws(train_runs, param_count=param_count, num_bootstrap=num_bootstrap, seed=seed)
  result.update(laws_found)
  result["holdout"] = [laws.predict(r, law, par, param_count, result) for r in runs if r["name"] in held]
  result["comparisons"] = ranking.comparisons(runs, varying_keys(runs))
  ranking.write_csv(result["comparisons"], os.path.join(out, "comparisons.csv"))
  result["spearman"] = ranking.spearman(runs)
  result["compute"] = compare.compute_totals(runs)
  result["transfer"] = compare.transfer(runs, varying_keys(runs), transfer_key)
  fileutil.atomic_json(os.path.join(out, "scaling.json"), result, indent=1)
  if plots:
    from sd3_jax.scaling import plots as plots_lib

    plots_lib.write_all(runs, result, out, law=law, param_count=param_count)
  return result


def write_csv(runs: Sequence[dict], path: str) -> None:
  """One row per validation point of every run."""
  axes = varying_keys(runs)
  level_keys = sorted({k for r in runs for p in r["points"] for k in p["levels"]})
  header = [
    "run",
    "depth",
    "width_per_depth",
    "params_total",
    "params_non_embedding",
    "step",
    "images_seen",
    "compute",
    "compute_6nd",
    "val_loss",
    "rf_loss",
    "fit_loss",
    *level_keys,
    *axes,
    "sample_accuracy",
    "part_accuracy",
  ]
  tmp = f"{path}.{os.getpid()}.tmp"
  with open(tmp, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(header)
    for r in runs:
      for i, p in enumerate(r["points"]):
        last = i == len(r["points"]) - 1
        w.writerow(
          [
            r["name"],
            r["depth"],
            r["width_per_depth"],
            r["params"]["total"],
            r["params"]["non_embedding"],
            p["step"],
            p["images"],
            p["compute"],
            p["compute_6nd"],
            p["val_loss"],
            p.get("rf_loss"),
            p["loss"],
            *[p["levels"].get(k) for k in level_keys],
            *[r["config"].get(k) for k in axes],
            r["sample_accuracy"] if last else "",
            r["part_accuracy"] if last else "",
          ]
        )
  os.replace(tmp, path)


def headline(result: dict) -> dict:
  """The numbers a user reads first; a law that cannot be trusted appears as 'not a result'."""
  out: dict[str, Any] = {
    "runs": len(result["runs"]),
    "fit_runs": len(result["fit_runs"]),
    "holdout_runs": result["holdout_runs"],
  }
  if result.get("compute", {}).get("branches"):
    out["compute"] = {k: result["compute"][k] for k in ("spent", "from_scratch", "saved_fraction")}
  for t in result.get("transfer", []):
    name = ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in t["fixed"].items()) or "all"
    out[f"transfer {t['key']} ({name})"] = {"best": t["best"], "shift_in_grid_steps": t["shift"]}
  out.update(laws.headline(result))
  if result.get("spearman"):
    out["spearman"] = result["spearman"]
  return out
