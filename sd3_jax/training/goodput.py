"""Goodput: the fraction of wall time a run spends on productive training steps, and where the
rest went, over every restart of a workdir (the definition maxtext reports).

The trainer tells a ``GoodputRecorder`` what it is doing (``recorder.phase('checkpoint')``,
``recorder.steps_done(last)``); the recorder accrues wall time to one category at a
time and rewrites WORKDIR/goodput/<attempt>.json (one small file per process start, written
whole: object stores cannot append) at every logged step and at exit. ``summarize(workdir)``
reads every attempt and splits the time from the first start to the last record into:

  productive   steps whose result survived (goodput = productive / total)
  startup      process start to the first step: imports, jax.distributed, mesh, data pipeline
  compile      the first step of each attempt and of each new bucket shape
  restore      reading the checkpoint to resume (damaged ones skipped included)
  checkpoint   the loop blocked on a save (async saves stall only while the state is copied)
  evaluation   validation loss, sample grids, periodic evaluation
  redone       steps a later attempt had to run again (after the checkpoint it resumed from)
  other        everything not recorded: time between attempts (restart, rescheduling) and what
               a killed attempt did after its last record

Only the primary process records; every figure is wall time in seconds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from typing import Any, Callable, Optional

from etils import epath

log = logging.getLogger(__name__)

SUBDIR = "goodput"
RECORDED = ("startup", "compile", "restore", "step", "checkpoint", "evaluation")
BADPUT = ("startup", "compile", "restore", "checkpoint", "evaluation", "redone", "other")


def process_start_time() -> Optional[float]:
  """Unix time at which this process started (Linux /proc; None elsewhere), so that start-up
  includes the interpreter and imports before the recorder existed."""
  try:
    with open("/proc/self/stat") as f:
      ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime, in clock ticks
    with open("/proc/stat") as f:
      boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
    return boot + ticks / os.sysconf("SC_CLK_TCK")
  except (OSError, ValueError, IndexError, StopIteration):
    return None


class GoodputRecorder:
  """Accrues this attempt's wall time to one category at a time (``phase``/``switch``) and
  records productive step windows (``steps_done``). ``enabled=False`` (non-primary processes)
  records nothing to disk."""

  def __init__(
    self,
    workdir: str,
    *,
    enabled: bool = True,
    start_time: Optional[float] = None,
    clock: Callable[[], float] = time.time,
  ):
    self._clock = clock
    now = clock()
    self.start = min(start_time, now) if start_time is not None else now  # sd3-train: the process start
    self.enabled = enabled
    self._dir = epath.Path(str(workdir)) / SUBDIR
    self._path = self._dir / f"{int(self.start * 1000):015d}-{os.getpid()}.json"
    self.totals = {k: 0.0 for k in RECORDED}
    self.totals["startup"] = now - self.start
    self.windows: list[list[float]] = []  # [first step, last step, seconds]
    self.resume_step: Optional[int] = None
    self._last_step = 0
    self.end: Optional[str] = None
    self._current, self._since = "startup", now
    self._pending_step_time = 0.0
    self._previous = self._read_others() if enabled else []

  # -- recording

  def switch(self, category: str) -> None:
    """From now on, wall time counts as ``category`` (one of RECORDED)."""
    if category not in self.totals:
      raise ValueError(f"unknown goodput category {category!r}; known: {RECORDED}")
    now = self._clock()
    spent = now - self._since
    self.totals[self._current] += spent
    if self._current == "step":
      self._pending_step_time += spent
    self._current, self._since = category, now

  @contextlib.contextmanager
  def phase(self, category: str):
    """``with recorder.phase('checkpoint'):`` counts the block as ``category``, then goes back."""
    previous = self._current
    self.switch(category)
    try:
      yield
    finally:
      self.switch(previous)

  def resumed(self, step: int) -> None:
    """The attempt restored the checkpoint of ``step``: steps after it are to run again."""
    self.resume_step = self._last_step = int(step)

  def steps_done(self, last: int) -> None:
    """Steps up to ``last`` (1-based) finished: the step time since the previous call (device
    work included: call once the step's results are ready) belongs to the steps since then."""
    self.switch(self._current)  # close the running interval
    if last > self._last_step:
      self.windows.append([self._last_step + 1, int(last), self._pending_step_time])
      self._last_step = int(last)
    self._pending_step_time = 0.0

  def record(self, end: Optional[str] = None) -> None:
    """Rewrites this attempt's file (at logged steps and at exit; ``end`` says how it ended)."""
    self.switch(self._current)
    if end is not None:
      self.end = end
    if not self.enabled:
      return
    try:
      self._dir.mkdir(parents=True, exist_ok=True)
      self._path.write_text(json.dumps(self._as_dict()))
    except OSError as e:  # goodput must never stop training
      log.warning("could not write %s: %s", self._path, e)

  def summary(self) -> dict[str, Any]:
    """The workdir's summary (``summarize``) with this attempt as it is now."""
    self.switch(self._current)
    return summarize_attempts(self._previous + [self._as_dict()])

  def _as_dict(self) -> dict[str, Any]:
    return {
      "start": self.start,
      "last": self._clock(),
      "totals": dict(self.totals),
      "windows": self.windows,
      "resume_step": self.resume_step,
      "end": self.end,
    }

  def _read_others(self) -> list[dict]:
    return [a for a in read_attempts(self._dir.parent) if a["start"] != self.start]


def read_attempts(workdir: str) -> list[dict]:
  """Every attempt recorded in WORKDIR/goodput, oldest first (unreadable files skipped)."""
  d = epath.Path(str(workdir)) / SUBDIR
  if not d.exists():
    return []
  out = []
  for p in sorted(d.glob("*.json")):
    try:
      out.append(json.loads(p.read_text()))
    except (OSError, ValueError) as e:
      log.warning("skipping unreadable goodput record %s: %s", p, e)
  return sorted(out, key=lambda a: a["start"])


def summarize_attempts(attempts: list[dict]) -> dict[str, Any]:
  """Seconds per category (module docstring), ``total_s``, ``goodput`` and ``attempts``.

  A step window of attempt i survives up to the lowest step any later attempt resumed from
  (a later attempt starting below it ran those steps again); the rest of it is ``redone``,
  split by step count when a window straddles that step."""
  if not attempts:
    return {}
  attempts = sorted(attempts, key=lambda a: a["start"])
  secs = {k: 0.0 for k in ("productive",) + BADPUT}
  for i, a in enumerate(attempts):
    for k in ("startup", "compile", "restore", "checkpoint", "evaluation"):
      secs[k] += a["totals"].get(k, 0.0)
    later = [b["resume_step"] or 0 for b in attempts[i + 1 :]]
    keep_to = min(later) if later else float("inf")
    step_time = a["totals"].get("step", 0.0)
    in_windows = 0.0
    for first, last, seconds in a["windows"]:
      in_windows += seconds
      kept = max(0.0, min(last, keep_to) - first + 1) / (last - first + 1)
      secs["productive"] += seconds * kept
      secs["redone"] += seconds * (1 - kept)
    # Step time not yet closed by a window (a killed attempt's last steps): never confirmed.
    secs["redone"] += max(0.0, step_time - in_windows) if i < len(attempts) - 1 else 0.0
    secs["productive"] += max(0.0, step_time - in_windows) if i == len(attempts) - 1 else 0.0
  total = max(a["last"] for a in attempts) - attempts[0]["start"]
  secs["other"] = max(0.0, total - sum(v for k, v in secs.items() if k != "other"))
  return dict(
    {f"{k}_s": v for k, v in secs.items()},
    total_s=total,
    goodput=secs["productive"] / total if total > 0 else 0.0,
    attempts=len(attempts),
  )


def summarize(workdir: str) -> dict[str, Any]:
  """The goodput summary of every attempt recorded in ``workdir``."""
  return summarize_attempts(read_attempts(workdir))


def format_summary(s: dict[str, Any]) -> str:
  """A few lines: goodput, then each category's seconds and share of the total."""
  if not s:
    return "no goodput records (WORKDIR/goodput/*.json): was the run started by this version of sd3-train?"
  total = s["total_s"]
  share = lambda v: f"{100 * v / total:5.1f}%" if total > 0 else "  -  "  # noqa: E731
  lines = [f"goodput {100 * s['goodput']:.1f}% of {total:.1f} s wall time over {s['attempts']} attempt(s)"]
  for k in ("productive",) + BADPUT:
    lines.append(f"  {k:11s} {s[f'{k}_s']:10.1f} s {share(s[f'{k}_s'])}")
  return "\n".join(lines)


def metrics(s: dict[str, Any]) -> dict[str, float]:
  """The summary as metrics.jsonl scalars (goodput/...)."""
  out = {"goodput/fraction": s.get("goodput", 0.0), "goodput/total_s": s.get("total_s", 0.0)}
  out.update({f"goodput/{k}_s": s.get(f"{k}_s", 0.0) for k in ("productive",) + BADPUT})
  return out
