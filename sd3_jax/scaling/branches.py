"""Cooldown branches: a sweep's lengths from one warmup-stable-decay run per model.

Hägele et al. 2024 (arXiv 2405.18392): a constant learning rate with a short final cooldown
matches cosine, so the runs of one model that differ only in length share everything up to their
cooldowns. With ``cooldown_branches=True`` a sweep groups its runs by everything but the length;
in each group of two or more lengths, the longest is the *stable run*, an ordinary WSD run; every
shorter length L is a *branch*: it starts from the stable run's checkpoint at step
s0(L) = L - round(f L) (f = optimizer.decay_fraction) and trains only its cooldown, steps s0(L)..L.

That a branch equals a WSD run of length L from scratch follows from three facts, each tested:
the warm-up is a number of steps (optimizer.warmup_steps), not a fraction of total_steps, and the
stable phase is constant, so the stable run's schedule (total_steps = the longest length) and the
branch's are the same function of the step before s0(L); the data order and the per-step noise
depend on the seed and the step only; and the checkpoint carries the optimizer state and the data
position. The stable run writes a checkpoint at every branch step and keeps it whatever
keep_checkpoints says (config.keep_checkpoint_steps) until the branches have run.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from typing import Mapping, Sequence

import ml_collections

from sd3_jax.training.optimizer import decay_window

# Keys that differ between the runs of one model that differ only in length.
LENGTH_KEYS = ("total_steps", "val.every", "checkpoint_every", "keep_checkpoint_steps", "branch_from")


def _group_key(overrides: Mapping) -> str:
  return repr(sorted((k, repr(v)) for k, v in overrides.items() if k not in LENGTH_KEYS))


def attach(runs: Sequence, configs: Mapping[str, ml_collections.ConfigDict]) -> list:
  """The runs with every shorter length of a group turned into a branch of its longest (the
  stable run keeps checkpoints at the branch steps); stable runs precede their branches.

  ``configs`` maps run names to their experiment configs. Raises ValueError, naming the run and
  the fix, when a group does not use the WSD schedule or a branch has no cooldown step or would
  start inside the warm-up."""
  groups: dict[str, list] = collections.defaultdict(list)
  for r in runs:
    groups[_group_key(r.overrides)].append(r)
  replaced: dict[str, object] = {}
  branches_of: dict[str, list] = collections.defaultdict(list)
  for members in groups.values():
    if len({m.steps for m in members}) < 2:
      continue
    stable = max(members, key=lambda m: m.steps)  # the first of equal longest ones
    opt = configs[stable.name].optimizer
    if opt.schedule != "wsd":
      raise ValueError(
        f"cooldown_branches needs optimizer.schedule='wsd', but run {stable.name} has {opt.schedule!r}: "
        "set 'optimizer.schedule': 'wsd' in the sweep's base_overrides"
      )
    steps = set()
    for m in members:
      if m is stable:
        continue
      s0, n = decay_window(m.steps, opt.decay_fraction)
      if n < 1:
        raise ValueError(
          f"run {m.name}: decay_fraction {opt.decay_fraction} x {m.steps} steps rounds to no cooldown step; "
          "a cooldown branch needs at least one (raise optimizer.decay_fraction or the length)"
        )
      if s0 < max(1, opt.warmup_steps):
        raise ValueError(
          f"run {m.name}: its cooldown would start at step {s0}, inside the warm-up ({opt.warmup_steps} steps); "
          "lower optimizer.warmup_steps or decay_fraction, or drop this length"
        )
      replaced[m.name] = dataclasses.replace(m, branch_of=stable.name, branch_step=s0)
      branches_of[stable.name].append(replaced[m.name])
      steps.add(s0)
    overrides = dict(stable.overrides, keep_checkpoint_steps=tuple(sorted(steps)))
    replaced[stable.name] = dataclasses.replace(stable, overrides=overrides)
  out = []
  for r in runs:
    if r.name in replaced and replaced[r.name].branch_of:
      continue  # placed after its stable run
    out.append(replaced.get(r.name, r))
    out += sorted(branches_of.get(r.name, []), key=lambda b: (b.steps, b.name))
  return out


def branch_point(sweep_dir: str, run) -> str:
  """The checkpoint a branch starts from: SWEEP_DIR/<stable run>/checkpoints/<step>."""
  parts = (run.branch_of, "checkpoints", str(run.branch_step))
  if "://" in sweep_dir:
    return "/".join((sweep_dir.rstrip("/"), *parts))
  return os.path.join(os.path.abspath(sweep_dir), *parts)
