"""What a training checkpoint directory does when something on disk goes wrong: the vocabulary
``storage.checkpoint.Checkpointer`` uses to resume from the newest intact step and to report a
failed save in one line.

- ``DamagedCheckpoint``: one step cannot be used (unreadable, truncated, checksum mismatch,
  missing metadata). The checkpointer names it in one warning, moves the step directory aside
  to ``<step>.damaged-<kind>`` (never deleted: a person may still want it) and tries the
  previous step.
- ``NoIntactCheckpointError``: every step was damaged (a ValueError: ``sd3-train`` exits 2
  with one line).
- ``CheckpointWriteError``: a save failed (disk full, permission, a lost mount): one line with
  the path, the free space there and the last intact step; older checkpoints are untouched.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from typing import Optional

from etils import epath

DAMAGED = ".damaged-"


class DamagedCheckpoint(Exception):
  """Step ``step`` of a checkpoint directory cannot be restored; ``kind`` is one of
  'unreadable', 'truncated', 'checksum', 'missing-metadata'."""

  def __init__(self, step: int, kind: str, detail: str):
    super().__init__(f"checkpoint step {step} is damaged ({kind.replace('-', ' ')}): {detail}")
    self.step, self.kind, self.detail = step, kind, detail


class NoIntactCheckpointError(ValueError):
  """Checkpoints exist, but none of them could be restored."""


class CheckpointWriteError(OSError):
  """A checkpoint could not be written; the message is the one line to show."""


def one_line(text: str, limit: int = 300) -> str:
  text = " ".join(str(text).split())
  return text if len(text) <= limit else text[: limit - 3] + "..."


_TRUNCATED = ("out_of_range", "not enough data", "unexpected end", "truncated", "past the end")


def classify(step: int, error: BaseException) -> DamagedCheckpoint:
  """A restore of ``step`` that raised ``error`` -> DamagedCheckpoint: 'truncated' when a file
  is shorter than its index says, 'unreadable' for anything else (a missing, garbled or
  inaccessible file). Missing metadata is found before reading (``Checkpointer``)."""
  if isinstance(error, DamagedCheckpoint):
    return error
  chain, e = [], error
  while e is not None and len(chain) < 5:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    chain.append(f"{type(e).__name__}: {first}")
    e = e.__cause__ or e.__context__
  # The innermost error says what is wrong with the file; the outer ones what was being read.
  text = " <- ".join(reversed(chain))
  kind = "truncated" if any(k in text.lower() for k in _TRUNCATED) else "unreadable"
  return DamagedCheckpoint(step, kind, one_line(text))


def move_aside(directory: epath.Path, step: int, kind: str) -> epath.Path:
  """Renames ``directory/<step>`` to ``directory/<step>.damaged-<kind>`` (-2, -3, ... when that
  name is taken) and returns the new path. orbax lists only all-digit names as steps, so the
  manager no longer sees it; nothing is deleted."""
  src = directory / str(step)
  dst = directory / f"{step}{DAMAGED}{kind}"
  n = 2
  while dst.exists():
    dst = directory / f"{step}{DAMAGED}{kind}-{n}"
    n += 1
  src.rename(dst)
  return dst


def free_space(path) -> str:
  """Free space on the file system of ``path`` (or its nearest existing parent), for messages."""
  p = str(path)
  if "://" in p:
    return "free space unknown (remote storage)"
  while p and not os.path.exists(p):
    p = os.path.dirname(p.rstrip("/"))
  try:
    free = shutil.disk_usage(p or "/").free
  except OSError as e:
    return f"free space unknown ({e.strerror})"
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if free < 1024 or unit == "TiB":
      return f"{free:.0f} {unit} free" if unit == "B" else f"{free:.1f} {unit} free"
    free /= 1024
  return ""


_WRITE_FAILURES = {
  errno.ENOSPC: "no space left on the device",
  errno.EDQUOT: "disk quota exceeded",
  errno.EROFS: "read-only file system",
  errno.EACCES: "permission denied",
  errno.EIO: "input/output error",
}
_WRITE_WORDS = (
  ("no space left", "no space left on the device"),
  ("quota", "disk quota exceeded"),
  ("read-only file system", "read-only file system"),
  ("permission denied", "permission denied"),
  ("resource_exhausted", "no space left on the device"),
)


def write_failure(error: BaseException) -> Optional[str]:
  """What went wrong, when ``error`` (or one it was raised from) is a failed write; else None."""
  e, seen = error, 0
  while e is not None and seen < 6:
    if isinstance(e, OSError) and e.errno in _WRITE_FAILURES:
      return _WRITE_FAILURES[e.errno]
    low = str(e).lower()
    for word, reason in _WRITE_WORDS:
      if word in low:
        return reason
    if "os_error_code=" in low or "error writing" in low or "failed writing" in low:
      return one_line(str(e), 160)
    e, seen = e.__cause__ or e.__context__, seen + 1
  return None


def write_error(step: Optional[int], directory, reason: str, last_intact: Optional[int]) -> CheckpointWriteError:
  what = f"checkpoint step {step}" if step is not None else "a checkpoint"
  kept = (
    f"the last intact checkpoint is step {last_intact}, kept with everything older"
    if last_intact is not None
    else "no checkpoint was written before"
  )
  return CheckpointWriteError(
    f"cannot write {what} to {directory}: {reason} ({free_space(directory)}); {kept}. "
    "Free space there (or give a workdir with room) and rerun the same command to resume"
  )


class QuietWriteFailures(logging.Filter):
  """Drops the error logs orbax and asyncio print about a failed write (several tracebacks
  from orbax's background threads, 'exception was never retrieved' for each write that failed
  after the first): the checkpointer reports the failure itself, in one line."""

  def filter(self, record: logging.LogRecord) -> bool:
    path = record.pathname or ""
    if record.levelno < logging.ERROR or not ("orbax" in path or os.path.join("asyncio", "") in path):
      return True
    text = record.getMessage()
    if record.exc_info and record.exc_info[1] is not None:
      return write_failure(record.exc_info[1]) is None and write_failure(Exception(text)) is None
    return write_failure(Exception(text)) is None


_FILTER = QuietWriteFailures()


def quiet_orbax_write_failures() -> None:
  """Installs the filter on the loggers orbax (absl's) and asyncio write through, once."""
  for name in ("absl", "asyncio"):
    logger = logging.getLogger(name)
    if _FILTER not in logger.filters:
      logger.addFilter(_FILTER)
