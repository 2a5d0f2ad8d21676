"""Running a sweep on this machine: one run after another, each a normal training workdir.

``SWEEP_DIR/<run name>/`` is exactly what ``python -m sd3_jax.main --workdir`` writes
(checkpoints, metrics.jsonl), plus ``scaling_run.json`` (the run's place in the sweep and its
compute). A run whose final step is committed is skipped; an unfinished one resumes from its
last checkpoint (the trainer's exact resume), so rerunning a killed sweep continues it.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Sequence

import ml_collections

from sd3_jax.storage import checkpoint, fileutil
from sd3_jax.scaling import sweep as sweep_lib

log = logging.getLogger(__name__)

RUN_FILE = "scaling_run.json"
SWEEP_FILE = "sweep.json"


def is_finished(workdir: str, steps: int) -> bool:
  """True when the run's checkpoint at its final step is committed."""
  return steps in checkpoint.committed_steps(os.path.join(os.path.abspath(workdir), "checkpoints"))


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


def run_sweep(sweep: ml_collections.ConfigDict, sweep_dir: str, *, only: Sequence[str] = ()) -> list[str]:
  """Trains every planned run (or those named in ``only``) in order; returns the names trained
  now (finished runs are skipped). Runs in this process with ``train.train_and_evaluate``."""
  from sd3_jax.training import train  # jax starts here, not when the sweep is only planned or printed

  runs = sweep_lib.plan(sweep)
  unknown = set(only) - {r.name for r in runs}
  if unknown:
    raise ValueError(f"--only names unknown runs {sorted(unknown)}; the sweep has {[r.name for r in runs]}")
  write_plan(sweep, runs, sweep_dir)
  trained = []
  for i, run in enumerate(runs):
    if only and run.name not in only:
      continue
    workdir = os.path.join(os.path.abspath(sweep_dir), run.name)
    if is_finished(workdir, run.steps):
      log.info("[%d/%d] %s: finished, skipped", i + 1, len(runs), run.name)
      continue
    os.makedirs(workdir, exist_ok=True)
    fileutil.atomic_json(os.path.join(workdir, RUN_FILE), dict(run.to_dict(), sweep=sweep.name), indent=1)
    log.info(
      "[%d/%d] %s: %d steps, %.3g FLOPs, %s parameters",
      i + 1,
      len(runs),
      run.name,
      run.steps,
      run.compute.flops,
      f"{run.params['total']:,}",
    )
    t0 = time.time()
    train.train_and_evaluate(sweep_lib.run_config(sweep, run), workdir)
    log.info("%s: done in %.0f s", run.name, time.time() - t0)
    trained.append(run.name)
  return trained
