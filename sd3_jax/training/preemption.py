"""Stopping on request: when the machine is about to be taken away (SIGTERM) or the user presses
Ctrl-C (SIGINT), save at the current step and stop.

TPU maintenance events, spot/preemptible reclaim and SLURM's time limit all send SIGTERM some
seconds before they kill the process. The trainer asks ``PreemptionWatcher.should_stop(step)``
after every step; when it says yes, the trainer saves a checkpoint of that step, waits until it
is committed and raises ``watcher.stopped(step)``: ``Preempted`` (``sd3-train`` exits with
``PREEMPTED_EXIT_CODE``, 42: restart it) or, after a Ctrl-C, ``Interrupted`` (exit 130,
``command.EXIT_INTERRUPTED``: the user's stop, not to be restarted). Rerunning the same command
resumes from that checkpoint.

* One process: a SIGTERM handler sets a flag that the next step boundary sees.
* Several processes (``jax.distributed``): jax's preemption sync manager, started by
  ``jax.distributed.initialize``, catches SIGTERM itself, tells every process, and picks one
  step (the largest step any process has reached, plus one) at which
  ``multihost_utils.reached_preemption_sync_point`` (orbax ``reached_preemption``) is true on
  all of them, so they save the same step. A Python handler would replace jax's, so none is
  installed for SIGTERM then.
* Ctrl-C: the first one prints a line and sets the flag (with several processes it is passed on
  to jax's sync manager as a SIGTERM to this process, so every process saves the same step;
  the others exit 42, this one 130). A second Ctrl-C stops at once, without waiting for the
  save: the latest committed checkpoint is kept (saves are atomic), and says so.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Callable

import jax

from sd3_jax import command

log = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 42  # documented in sd3-train --help and docs/training.md
INTERRUPTED_EXIT_CODE = command.EXIT_INTERRUPTED  # 130, the same for every command


class Preempted(command.Stopped):
  """The run saved a checkpoint at ``step`` because it was told to stop (SIGTERM)."""

  exit_code = PREEMPTED_EXIT_CODE

  def __init__(self, step: int, reason: str = "preempted"):
    super().__init__(f"{reason}: saved and committed the checkpoint of step {step}; rerun the same command to resume")
    self.step = step


class Interrupted(Preempted):
  """The run saved a checkpoint at ``step`` because the user pressed Ctrl-C."""

  exit_code = INTERRUPTED_EXIT_CODE

  def __init__(self, step: int):
    super().__init__(step, "stopped by Ctrl-C")


def _say(text: str) -> None:
  os.write(2, f"\n{text}\n".encode())  # from a signal handler: no buffered stream


class PreemptionWatcher:
  """``should_stop(step)`` is true once SIGTERM or Ctrl-C arrived (one process) or, with several
  processes, at the step jax's preemption sync point chose. ``reached_sync_point`` is
  ``Checkpointer.reached_preemption``; it must be called at every step by every process."""

  def __init__(self, reached_sync_point: Callable[[int], bool], *, multi_process: bool | None = None):
    self._reached = reached_sync_point
    self._multi = jax.process_count() > 1 if multi_process is None else multi_process
    self._signalled = False
    self.interrupted = False  # Ctrl-C was pressed
    self._previous: dict = {}
    if threading.current_thread() is threading.main_thread():
      self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_sigint)
      if not self._multi:
        self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):
    self._signalled = True  # only a flag: the loop saves at its next step boundary

  def _on_sigint(self, signum, frame):
    if self.interrupted:
      _say(
        "second Ctrl-C: stopping at once without waiting for the save; the latest committed "
        "checkpoint is kept, rerun the same command to resume from it"
      )
      os._exit(INTERRUPTED_EXIT_CODE)
    self.interrupted = True
    _say("Ctrl-C: saving the checkpoint of the current step, then stopping (Ctrl-C again stops at once, unsaved)")
    if self._multi:  # jax's sync manager tells every process and picks the step they all save
      os.kill(os.getpid(), signal.SIGTERM)
    else:
      self._signalled = True

  def should_stop(self, step: int) -> bool:
    if self._reached(step):
      log.warning("preemption sync point reached at step %d", step)
      return True
    if self._signalled:
      log.warning("%s received: saving step %d and stopping", "Ctrl-C" if self.interrupted else "SIGTERM", step)
      return True
    return False

  def stopped(self, step: int) -> Preempted:
    """The error to raise once the checkpoint of ``step`` is committed."""
    return Interrupted(step) if self.interrupted else Preempted(step)

  def close(self) -> None:
    """Puts back the signal handlers that were there before."""
    for signum, previous in self._previous.items():
      signal.signal(signum, signal.SIG_DFL if previous is None else previous)  # None: set outside Python
    self._previous = {}

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
