"""Running a sweep on this machine: one run after another, each a normal training workdir.

``SWEEP_DIR/<run name>/`` is exactly what ``python -m sd3_jax.main --workdir`` writes
(checkpoints, metrics.jsonl), plus ``scaling_run.json`` (the run's place in the sweep and its
compute). A run whose final step is committed is skipped; an unfinished one resumes from its
last checkpoint (the trainer's exact resume), so rerunning a killed sweep continues it.

Cooldown branches (scaling/branches.py) run after their stable run and start from its
checkpoint at the branch step; once every branch from a step has finished, the stable run's
checkpoint at that step is deleted (the final one stays). A run whose loss becomes NaN/Inf (a
learning-rate sweep's largest rates) gets ``diverged.json`` and the sweep goes on; a rerun skips
it (delete the file to retry).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Sequence

import ml_collections

from sd3_jax.storage import checkpoint, fileutil
from sd3_jax.scaling import branches
from sd3_jax.scaling import sweep as sweep_lib

log = logging.getLogger(__name__)

RUN_FILE = "scaling_run.json"
SWEEP_FILE = "sweep.json"
DIVERGED_FILE = "diverged.json"


def is_finished(workdir: str, steps: int) -> bool:
  """True when the run's checkpoint at its final step is committed."""
  return steps in checkpoint.committed_steps(os.path.join(os.path.abspath(workdir), "checkpoints"))


def is_diverged(workdir: str) -> bool:
  return os.path.isfile(os.path.join(workdir, DIVERGED_FILE))


def write_plan(sweep: ml_collections.ConfigDict, runs: Sequence[sweep_lib.Run], sweep_dir: str) -> str:
  """SWEEP_DIR/sweep.json: the sweep config and every planned run with its compute."""
  os.makedirs(sweep_dir, exist_ok=True)
  path = os.path.join(sweep_dir, SWEEP_FILE)
  fileutil.atomic_json(
    path,
    {"sweep": sweep.to_dict(), "runs": [r.to_dict() for r in runs], "total": sweep_lib.total_compute(runs)},
    indent=1,
  )
  return path


def release_branch_points(runs: Sequence[sweep_lib.Run], sweep_dir: str) -> list[str]:
  """Deletes each stable run's kept checkpoint once every branch starting there has finished or
  diverged (and the stable run has finished); returns the deleted paths."""

  def done(r) -> bool:
    workdir = os.path.join(sweep_dir, r.name)
    return is_finished(workdir, r.steps) or is_diverged(workdir)

  by_name = {r.name: r for r in runs}
  pending: dict[tuple[str, int], bool] = {}
  for r in runs:
    if r.branch_of:
      key = (r.branch_of, r.branch_step)
      pending[key] = pending.get(key, False) or not done(r)
  deleted = []
  for (stable, step), waiting in sorted(pending.items()):
    path = os.path.join(os.path.abspath(sweep_dir), stable, "checkpoints", str(step))
    if waiting or step == by_name[stable].steps or not done(by_name[stable]) or not os.path.isdir(path):
      continue
    shutil.rmtree(path)
    deleted.append(path)
    log.info("deleted %s: every branch from it has run", path)
  return deleted


def worker_share(runs: Sequence[sweep_lib.Run], worker: int, num_workers: int) -> set[str]:
  """The names of the runs worker ``worker`` of ``num_workers`` trains: whole groups (a stable run
  with its cooldown branches, or a run of its own) dealt round-robin in plan order, so a branch is
  always trained by the worker that trains its stable run."""
  if not 0 <= worker < num_workers:
    raise ValueError(f"worker {worker} of {num_workers}: give I/N with 0 <= I < N, e.g. --worker 0/2")
  groups: dict[str, int] = {}
  for r in runs:
    groups.setdefault(r.branch_of or r.name, len(groups))
  return {r.name for r in runs if groups[r.branch_of or r.name] % num_workers == worker}


def run_sweep(
  sweep: ml_collections.ConfigDict, sweep_dir: str, *, only: Sequence[str] = (), worker: tuple[int, int] | None = None
) -> list[str]:
  """Trains every planned run (or those named in ``only``; with ``worker`` (I, N), only worker I's
  share of N, ``worker_share``) in order; returns the names trained now (finished runs are
  skipped). Runs in this process with ``train.train_and_evaluate``."""
  from sd3_jax.training import divergence, train  # jax starts here, not when the sweep is only planned

  runs = sweep_lib.plan(sweep)
  unknown = set(only) - {r.name for r in runs}
  if unknown:
    raise ValueError(f"--only names unknown runs {sorted(unknown)}; the sweep has {[r.name for r in runs]}")
  share = worker_share(runs, *worker) if worker else None
  write_plan(sweep, runs, sweep_dir)
  trained = []
  for i, run in enumerate(runs):
    if (only and run.name not in only) or (share is not None and run.name not in share):
      continue
    workdir = os.path.join(os.path.abspath(sweep_dir), run.name)
    if is_finished(workdir, run.steps) or is_diverged(workdir):
      why = "diverged earlier" if is_diverged(workdir) else "finished"
      log.info("[%d/%d] %s: %s, skipped", i + 1, len(runs), run.name, why)
      continue
    if run.branch_of and not checkpoint.committed_steps(os.path.join(workdir, "checkpoints")):
      point = branches.branch_point(sweep_dir, run)
      if not os.path.isfile(os.path.join(point, checkpoint.COMMIT_FILE)):
        stable = os.path.join(os.path.abspath(sweep_dir), run.branch_of)
        if is_diverged(stable):
          log.warning(
            "[%d/%d] %s: %s diverged before step %d, skipped",
            i + 1,
            len(runs),
            run.name,
            run.branch_of,
            run.branch_step,
          )
          continue
        raise ValueError(
          f"run {run.name} branches from {run.branch_of} at step {run.branch_step}, which has no committed "
          f"checkpoint ({point}): train {run.branch_of} first"
        )
    os.makedirs(workdir, exist_ok=True)
    fileutil.atomic_json(os.path.join(workdir, RUN_FILE), dict(run.to_dict(), sweep=sweep.name), indent=1)
    log.info(
      "[%d/%d] %s: %d steps%s, %.3g FLOPs, %s parameters",
      i + 1,
      len(runs),
      run.name,
      run.steps,
      f" (a branch of {run.branch_of} from step {run.branch_step})" if run.branch_of else "",
      run.own_flops,
      f"{run.params['total']:,}",
    )
    t0 = time.time()
    try:
      train.train_and_evaluate(sweep_lib.run_config(sweep, run, sweep_dir), workdir)
    except divergence.TrainingDivergedError as e:
      fileutil.atomic_json(os.path.join(workdir, DIVERGED_FILE), {"error": str(e)}, indent=1)
      log.warning("%s diverged; the sweep goes on: %s", run.name, e)
      continue
    log.info("%s: done in %.0f s", run.name, time.time() - t0)
    trained.append(run.name)
    release_branch_points(runs, sweep_dir)
  return trained
