"""Starting a run from another run's training checkpoint (``config.branch_from``): a cooldown branch
of a warmup-stable-decay run continues that run's state (parameters, EMA, Adam moments, step, data
position) under its own, shorter schedule (docs/mup_wsd.md, sd3_jax/scaling/branches.py).

A branch is only what it claims to be if it is the same run up to its branch point, so the start
is refused, in one line, unless the two configs agree on everything that shapes the training
trajectory and the two learning-rate schedules agree at every step before the branch point.
"""

from __future__ import annotations

import logging
from typing import Any

import ml_collections
import numpy as np

from sd3_jax.storage import checkpoint as ckpt_lib
from sd3_jax.training import optimizer

log = logging.getLogger(__name__)

# Config sections and keys that determine the training trajectory: a branch must share them with
# the run it starts from (the length, the checkpoint and validation cadence, the periodic samples,
# the writers and the mesh may differ; the schedule is compared by value).
TRAJECTORY = ("model", "optimizer", "flow", "ema", "text", "seed", "global_batch_size", "grad_accum_steps", "dtype")
DATA_FREE = ("worker_count", "prefetch")  # data keys that do not change what is read


def parse(branch_from: str) -> tuple[str, int]:
  """(checkpoint directory, step) of RUN/checkpoints/STEP."""
  directory, _, step = branch_from.rstrip("/").rpartition("/")
  if not step.isdigit() or not directory:
    raise ValueError(
      f"config.branch_from must name a checkpoint step directory RUN/checkpoints/STEP, got {branch_from!r}"
    )
  return directory, int(step)


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = tuple(v) if isinstance(v, list) else v
  return out


def _matters(key: str) -> bool:
  if key.startswith("data."):
    return key.split(".", 1)[1] not in DATA_FREE
  return any(key == t or key.startswith(t + ".") for t in TRAJECTORY)


def check(saved: dict, config: ml_collections.ConfigDict, step: int) -> None:
  """Raises ValueError unless ``config`` may continue the run whose config ``saved`` was saved
  with its checkpoint at ``step``."""
  where = f"config.branch_from (step {step})"
  if step >= config.total_steps:
    raise ValueError(f"{where}: the branch point is not before total_steps {config.total_steps}")
  mine, theirs = _flat(config.to_dict()), _flat(saved)
  differ = sorted(k for k in set(mine) | set(theirs) if _matters(k) and mine.get(k) != theirs.get(k))
  if differ:
    shown = ", ".join(f"{k} ({theirs.get(k)!r} there, {mine.get(k)!r} here)" for k in differ[:4])
    raise ValueError(
      f"{where}: this run's config differs from the run it branches from in {shown}"
      f"{' ...' if len(differ) > 4 else ''}; a branch continues the same run with another length"
    )
  steps = np.arange(step)
  schedule = optimizer.learning_rate_schedule
  there = np.asarray(schedule(ml_collections.ConfigDict(saved["optimizer"]), int(saved["total_steps"]))(steps))
  here = np.asarray(schedule(config.optimizer, config.total_steps)(steps))
  bad = np.flatnonzero(there != here)
  if bad.size:
    k = int(bad[0])
    raise ValueError(
      f"{where}: the learning rate before the branch point differs from that run's (first at step {k}: "
      f"{there[k]:.6g} there, {here[k]:.6g} here); branch a warmup-stable-decay run ('wsd') inside its stable "
      "phase, with the same warm-up"
    )


def start(config: ml_collections.ConfigDict, abstract_state: Any, data_iterator: Any):
  """The state at ``config.branch_from``, restored into ``abstract_state``'s shardings with the
  data iterator set to that step's position, after ``check``."""
  if config.init_from:
    raise ValueError(
      "config.branch_from and config.init_from are both set: branch_from continues another run (its whole "
      "training state), init_from starts a new one from converted weights; keep one"
    )
  directory, step = parse(config.branch_from)
  source = ckpt_lib.Checkpointer(directory, read_only=True)
  try:
    if step not in source.all_steps():
      raise ValueError(
        f"config.branch_from: no committed checkpoint at step {step} in {directory} "
        f"(committed: {source.all_steps() or 'none'}); train the run it branches from to that step first"
      )
    saved = source.saved_config(step)
    if saved is None:
      raise ValueError(f"config.branch_from: the checkpoint at step {step} in {directory} was saved without its config")
    check(saved, config, step)
    state, _ = source.restore(step, abstract_state=abstract_state, data_iterator=data_iterator)
  finally:
    source.close()
  log.info("branched from %s at step %d", directory, step)
  return state
