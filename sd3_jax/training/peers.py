"""When one process of a multi-process run dies, the others stop within a bounded time, with one
line naming the lost process and an exit code the launchers restart on.

Without this, a survivor either waits in its next collective (TPU) or fails it at once (CPU,
gloo), and jax's coordination service ends it with a fatal error (SIGABRT) only after its
heartbeat timeout (100 s by default), with a long log that names no process.

``PeerWatch`` runs a thread in every process: every ``interval`` seconds it writes a counter to
jax's coordination key-value store and reads everyone's. A counter that has not changed for
``timeout`` seconds means that process is gone: the watching process prints

    sd3-train: error: lost process 1 of 8 (no heartbeat for 61 s) ...

and exits at once with ``LOST_PEER_EXIT_CODE`` (75). Every survivor sees the same counters, so
all stop within ``timeout + interval`` of the loss; process 0 waits two more intervals, because
its exit takes the coordination service down and ends the others by jax's fatal error. The
bound: 1.3 x timeout for all survivors (``main``'s --peer_timeout_s, default 60 s). jax's own
heartbeat is set twice as long, as a backstop.

A process that leaves on purpose writes its exit code: 0 (done) and 42 (preempted) are the
others' own outcome too and are ignored; after any other code the survivors stop as for a lost
process (exit 2 and 3, which no restart can fix, are passed on; others become 75).

The loss of process 0 itself, which hosts the coordination service, ends the others at once
by jax's fatal error (SIGABRT, exit 134): nothing in Python runs before it. The launchers
restart on 134 and say what it means (launch/restart_policy.sh).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Callable, Optional

log = logging.getLogger(__name__)

LOST_PEER_EXIT_CODE = 75  # EX_TEMPFAIL: try again
_KEY = "sd3_jax/peer_watch/"
_QUIET_CODES = (0, 42)  # a peer that finished or was preempted: we do the same
_STATUS_PREFIXES = ("UNKNOWN:", "INTERNAL:", "UNAVAILABLE:", "ABORTED:", "CANCELLED:", "DEADLINE_EXCEEDED:")


def coordination_client():
  """jax's distributed runtime client (after jax.distributed.initialize), or None."""
  from jax._src import distributed

  return getattr(distributed.global_state, "client", None)


def is_runtime_failure(error: BaseException) -> bool:
  """An error from the runtime (a collective that failed, a lost connection), not from our
  own checks: one that a peer's death can cause."""
  import jax

  if isinstance(error, jax.errors.JaxRuntimeError):
    return True
  return str(error).lstrip().startswith(_STATUS_PREFIXES)


def _default_stop(message: str, code: int) -> None:
  print(f"sd3-train: error: {message}", file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(code)


class PeerWatch:
  """Heartbeats through ``client`` (jax's coordination key-value store) and stops this process
  when another one stops beating. ``stop(message, code)`` ends the process (default: one line
  on stderr and os._exit); ``clock`` and ``sleep`` are for tests."""

  def __init__(
    self,
    client,
    process_id: int,
    num_processes: int,
    *,
    timeout_s: float = 60.0,
    interval_s: Optional[float] = None,
    stop: Callable[[str, int], None] = _default_stop,
    clock: Callable[[], float] = time.monotonic,
  ):
    self._client = client
    self.process_id, self.num_processes = int(process_id), int(num_processes)
    self.timeout_s = float(timeout_s)
    self.interval_s = float(interval_s) if interval_s else max(0.5, self.timeout_s / 10)
    self._stop_fn, self._clock = stop, clock
    self._beat = 0
    now = clock()
    self._last_value: dict[int, str] = {}
    self._last_change = {p: now for p in range(self.num_processes) if p != self.process_id}
    self._departed: dict[int, tuple[int, float]] = {}
    self._unreachable_since: Optional[float] = None
    self._verdict = threading.Event()
    self._closed = threading.Event()
    self._thread: Optional[threading.Thread] = None

  # -- one round (the thread calls it every interval; tests call it directly)

  def check(self) -> Optional[tuple[str, int]]:
    """Beats once and looks at the others: (message, exit code) when this process must stop."""
    now = self._clock()
    try:
      self._beat += 1
      self._client.key_value_set(f"{_KEY}{self.process_id}", str(self._beat), allow_overwrite=True)
      values = dict(self._client.key_value_dir_get(_KEY))
      self._unreachable_since = None
    except Exception as e:  # the coordination service (process 0) cannot be reached
      self._unreachable_since = self._unreachable_since or now
      if now - self._unreachable_since >= self.timeout_s:
        return (
          f"lost the coordination service on process 0 of {self.num_processes} "
          f"({type(e).__name__}: {' '.join(str(e).split())[:200]})",
          LOST_PEER_EXIT_CODE,
        )
      return None
    for p in self._last_change:
      value = values.get(f"{_KEY}{p}")
      if value is not None and value.startswith("exit "):
        code = int(value.split()[1])
        if code not in _QUIET_CODES:
          first = self._departed.setdefault(p, (code, now))[1]
          if now - first >= self.timeout_s:
            return (
              f"process {p} of {self.num_processes} stopped with exit code {code} (see its log)",
              code if code in (2, 3) else LOST_PEER_EXIT_CODE,
            )
        continue
      if value != self._last_value.get(p):
        self._last_value[p], self._last_change[p] = value, now
      elif now - self._last_change[p] >= self.timeout_s:
        return (
          f"lost process {p} of {self.num_processes} (no heartbeat for {now - self._last_change[p]:.0f} s)",
          LOST_PEER_EXIT_CODE,
        )
    return None

  # -- the thread

  def start(self) -> "PeerWatch":
    self._thread = threading.Thread(target=self._run, name="sd3-peer-watch", daemon=True)
    self._thread.start()
    return self

  def _run(self) -> None:
    while not self._closed.wait(self.interval_s):
      verdict = self.check()
      if verdict is None or self._closed.is_set():
        continue
      message, code = verdict
      self._verdict.set()
      if self.process_id == 0:  # let the others see it too before the service goes down
        time.sleep(2 * self.interval_s)
      self._stop_fn(
        f"{message}; stopping process {self.process_id} with exit code {code}"
        + (" so that the launcher restarts the run" if code == LOST_PEER_EXIT_CODE else ""),
        code,
      )
      return

  def wait_for_verdict(self, seconds: Optional[float] = None) -> bool:
    """Blocks until the watch has decided to stop this process (True) or ``seconds`` passed
    (default: the detection bound) without a lost peer (False). For a runtime error in the
    training loop, which a peer's death can cause: the watch then ends the process itself."""
    bound = self.timeout_s + 3 * self.interval_s if seconds is None else seconds
    return self._verdict.wait(bound)

  def wait_for_exit(self) -> None:
    """After a verdict: blocks until the watch has ended the process (it never returns)."""
    while True:
      time.sleep(3600)

  def close(self, exit_code: int) -> None:
    """Stops watching and tells the others this process leaves with ``exit_code``."""
    self._closed.set()
    try:
      self._client.key_value_set(f"{_KEY}{self.process_id}", f"exit {int(exit_code)}", allow_overwrite=True)
    except Exception as e:  # the service may already be gone at the very end
      log.debug("could not announce exit %s: %s", exit_code, e)


def heartbeat_timeout_s(peer_timeout_s: float) -> int:
  """jax.distributed's own heartbeat timeout: a backstop behind PeerWatch."""
  return int(max(2 * peer_timeout_s, peer_timeout_s + 30))
