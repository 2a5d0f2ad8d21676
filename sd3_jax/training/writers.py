"""Where training metrics go: ``MetricWriter``, the host-0 writer of ``metrics.jsonl`` and, when
the ``tensorboard`` package is installed, TensorBoard event files (pure python, no TensorFlow).
A resumed run drops what a killed run logged after its checkpoint (it is logged again)."""

import json
import math
import os
import shutil
import tempfile
import time
from typing import Any, Mapping, Optional

import jax
import numpy as np
from etils import epath


def _scalar(value: Any) -> Any:
  """A python scalar (int, float, bool, str or None) from python/numpy/jax scalars."""
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  arr = np.asarray(value)
  if arr.size != 1:
    raise ValueError(f"metric values must be scalars, got shape {arr.shape}")
  return arr.reshape(()).item()


def _json_safe(value: Any) -> Any:
  if isinstance(value, float) and not math.isfinite(value):
    return None  # NaN/inf -> null: valid JSON, numeric columns stay numeric
  return value


def is_local(path) -> bool:
  """Whether ``path`` is on the local file system (not a URL such as gs://bucket/run)."""
  return "://" not in str(path)


class MetricWriter:
  """Writes scalars to ``workdir/metrics.jsonl`` and, if tensorboard is installed, to
  TensorBoard event files in ``workdir/tensorboard``. Only the primary process writes.

  ``workdir`` is a local path or a URL that etils.epath opens (gs://bucket/run, s3://...).
  Each ``write_scalars(step, scalars)`` adds one JSON object ``{"step", "wall_time",
  **scalars}``; non-finite floats are written as ``null``. On a local file system the line is
  appended and flushed. Object stores cannot append, so there the whole file is rewritten
  (one object upload, atomic) on every write: a few MB over a long run at the usual
  log_every, and always a complete, readable file. Resuming continues the same file.
  ``resume_step``: drop lines with step > resume_step (logged by a preempted run after its
  last checkpoint; they will be logged again) and tell TensorBoard to purge them. A torn last
  line (process killed mid-write) is dropped at start-up.
  """

  def __init__(
    self, workdir, *, is_primary: Optional[bool] = None, tensorboard: bool = True, resume_step: Optional[int] = None
  ):
    self.is_primary = jax.process_index() == 0 if is_primary is None else bool(is_primary)
    workdir = epath.Path(workdir)
    self.path = workdir / "metrics.jsonl"
    self._append = is_local(workdir)
    self._file = self._tb = self._lines = None
    if not self.is_primary:
      return
    workdir.mkdir(parents=True, exist_ok=True)
    self._lines = self._repair(resume_step)
    if self._append:
      self._file = self.path.open("a", encoding="utf-8")
    if tensorboard:
      self._tb = _TensorBoardWriter.create(str(workdir / "tensorboard"), resume_step)

  def _repair(self, resume_step: Optional[int]) -> list[str]:
    if not self.path.exists():
      return []
    old = self.path.read_text(encoding="utf-8")
    keep = []
    for line in old.split("\n"):
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue  # empty or torn line
      if not isinstance(record, dict):
        continue
      if resume_step is None or record.get("step", -1) <= resume_step:
        keep.append(line)
    new = "".join(line + "\n" for line in keep)
    if new != old:
      if self._append:  # write aside and rename: never a moment without the file
        tmp = self.path.parent / (self.path.name + ".tmp")
        tmp.write_text(new, encoding="utf-8")
        tmp.replace(self.path)
      else:  # an object upload replaces the object atomically
        self.path.write_text(new, encoding="utf-8")
    return keep

  @property
  def tensorboard_enabled(self) -> bool:
    return self._tb is not None

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    if not self.is_primary:
      return
    if self._lines is None:
      raise RuntimeError("MetricWriter is closed")
    values = {str(k): _scalar(v) for k, v in scalars.items()}
    if "step" in values or "wall_time" in values:
      raise ValueError("'step' and 'wall_time' are reserved metric names")
    record = {"step": int(step), "wall_time": time.time(), **values}
    line = json.dumps({k: _json_safe(v) for k, v in record.items()}, allow_nan=False)
    self._lines.append(line)
    if self._file is not None:
      self._file.write(line + "\n")
      self._file.flush()
    else:
      self.path.write_text("".join(x + "\n" for x in self._lines), encoding="utf-8")
    if self._tb is not None:
      numeric = {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
      self._tb.write(int(step), record["wall_time"], numeric)

  def flush(self):
    if self._file is not None:
      self._file.flush()
    if self._tb is not None:
      self._tb.flush()

  def close(self):
    if self._file is not None:
      self._file.close()
      self._file = None
    self._lines = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _after_existing_event_files(logdir: epath.Path) -> None:
  """TensorBoard reads a directory's event files in name order, and a name starts with the
  creation time in whole seconds (then host, pid, a per-process counter). A resumed run's START
  event only purges the old run's later steps if its file sorts after theirs, so this waits
  until the clock is past every existing file's second (at most a second, and only when a
  resume follows within the same second, e.g. in one process)."""
  stamps = []
  if logdir.exists():
    for p in logdir.iterdir():
      parts = p.name.split(".")
      if p.name.startswith("events.out.tfevents.") and len(parts) > 3 and parts[3].isdigit():
        stamps.append(int(parts[3]))
  if stamps:
    wait = max(stamps) + 1 - time.time()
    if wait > 0:
      time.sleep(wait)


class _TensorBoardWriter:
  """Scalar summaries through tensorboard's own EventFileWriter and protos (no TensorFlow).

  A URL logdir (an object store: no appends) is staged in a local temporary directory whose
  event files are uploaded whole after every write, like metrics.jsonl."""

  def __init__(self, logdir: str, resume_step: Optional[int]):
    # Imported here: tensorboard is an optional extra (ImportError -> JSONL only).
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
    self._remote = None if is_local(logdir) else epath.Path(logdir)
    self._local = logdir if self._remote is None else tempfile.mkdtemp(prefix="sd3_jax_tensorboard_")
    if resume_step is not None:
      _after_existing_event_files(self._remote or epath.Path(logdir))
    self._writer = EventFileWriter(self._local)
    if resume_step is not None:  # a START at step s makes TensorBoard drop earlier events >= s
      self._writer.add_event(
        event_pb2.Event(
          wall_time=time.time(),
          step=int(resume_step) + 1,
          session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START),
        )
      )

  @classmethod
  def create(cls, logdir: str, resume_step: Optional[int]) -> Optional["_TensorBoardWriter"]:
    try:
      return cls(logdir, resume_step)
    except ImportError:
      return None  # the optional `tensorboard` extra is not installed: JSONL only

  def _upload(self):
    if self._remote is None:
      return
    self._remote.mkdir(parents=True, exist_ok=True)
    for name in os.listdir(self._local):
      with open(os.path.join(self._local, name), "rb") as f:  # the local staging copy
        (self._remote / name).write_bytes(f.read())

  def write(self, step: int, wall_time: float, scalars: Mapping[str, float]):
    values = [self._summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in scalars.items()]
    self._writer.add_event(
      self._event_pb2.Event(wall_time=wall_time, step=step, summary=self._summary_pb2.Summary(value=values))
    )
    self.flush()

  def flush(self):
    self._writer.flush()
    self._upload()

  def close(self):
    self._writer.close()
    self._upload()
    if self._remote is not None:
      shutil.rmtree(self._local, ignore_errors=True)
