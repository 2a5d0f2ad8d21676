"""Preemption: when the machine is about to be taken away, save at the current step and stop.

TPU maintenance events, spot/preemptible reclaim and SLURM's time limit all send SIGTERM some
seconds before they kill the process. The trainer asks ``PreemptionWatcher.should_stop(step)``
after every step; when it says yes, the trainer saves a checkpoint of that step, waits until it
is committed and raises ``Preempted``; ``sd3-train`` then exits with ``PREEMPTED_EXIT_CODE``
(42). Rerunning the same command resumes from that checkpoint.

* One process: a SIGTERM handler sets a flag that the next step boundary sees.
* Several processes (``jax.distributed``): jax's preemption sync manager, started by
  ``jax.distributed.initialize``, catches SIGTERM itself, tells every process, and picks one
  step (the largest step any process has reached, plus one) at which
  ``multihost_utils.reached_preemption_sync_point`` (orbax ``reached_preemption``) is true on
  all of them, so they save the same step. A Python handler would replace jax's, so none is
  installed then.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Callable

import jax

log = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 42  # documented in sd3-train --help and docs/training.md


class Preempted(Exception):
  """The run saved a checkpoint at ``step`` because it was told to stop (SIGTERM)."""

  def __init__(self, step: int):
    super().__init__(f"preempted: saved and committed the checkpoint of step {step}; rerun the same command to resume")
    self.step = step


class PreemptionWatcher:
  """``should_stop(step)`` is true once SIGTERM arrived (one process) or, with several
  processes, at the step jax's preemption sync point chose. ``reached_sync_point`` is
  ``Checkpointer.reached_preemption``; it must be called at every step by every process."""

  def __init__(self, reached_sync_point: Callable[[int], bool], *, multi_process: bool | None = None):
    self._reached = reached_sync_point
    self._multi = jax.process_count() > 1 if multi_process is None else multi_process
    self._signalled = False
    self._previous = None
    if not self._multi and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):
    self._signalled = True  # only a flag: the loop saves at its next step boundary

  def should_stop(self, step: int) -> bool:
    if self._reached(step):
      log.warning("preemption sync point reached at step %d", step)
      return True
    if self._signalled:
      log.warning("SIGTERM received: saving step %d and stopping", step)
      return True
    return False

  def close(self) -> None:
    """Puts back the SIGTERM handler that was there before."""
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
