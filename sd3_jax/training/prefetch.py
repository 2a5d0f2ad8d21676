"""Run the input pipeline ahead of the train step: a small queue of global batches already on
the devices, filled by a background thread.

``Prefetcher(iterator, to_device, depth)`` pulls host batches from a (grain) iterator, turns
each into global device arrays with ``to_device`` (``sharding.make_global_batch``: the
host-to-device transfer starts at once) and keeps up to ``depth`` of them queued, so the step
never waits for reading, decoding or the transfer while the pipeline keeps up.

Exact resume: ``get_state()`` is the iterator position after the last batch *handed out*, not
after the batches still queued, so a checkpoint written between steps resumes at exactly the
next batch (grain's checkpoint handler calls ``get_state`` / ``set_state``). An error in the
pipeline (a corrupt record) is raised by the ``next()`` that would have returned that batch.
"""

from __future__ import annotations

import copy
import json
import queue
import threading
from typing import Any, Callable, Iterator

_DONE = object()


class Prefetcher:
  """Iterator of ``to_device(next(iterator))`` computed up to ``depth`` batches ahead."""

  def __init__(self, iterator: Iterator, to_device: Callable[[Any], Any], depth: int = 2):
    if depth < 1:
      raise ValueError(f"prefetch depth must be >= 1, got {depth} (use the iterator directly for 0)")
    self._it, self._to_device = iterator, to_device
    self._state = copy.deepcopy(iterator.get_state())
    self._queue: queue.Queue = queue.Queue(maxsize=depth)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._fill, name="sd3_jax-prefetch", daemon=True)
    self._thread.start()

  def _put(self, item) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def _fill(self) -> None:
    try:
      while not self._stop.is_set():
        try:
          host = next(self._it)
        except StopIteration:
          self._put((_DONE, None))
          return
        state = copy.deepcopy(self._it.get_state())
        if not self._put((self._to_device(host), state)):
          return
    except BaseException as e:  # handed to the consumer, raised there
      self._put((e, None))

  def __iter__(self) -> "Prefetcher":
    return self

  def __next__(self):
    item, state = self._queue.get()
    if item is _DONE:
      self._queue.put((_DONE, None))  # keep raising StopIteration
      raise StopIteration
    if isinstance(item, BaseException):
      self._queue.put((item, None))
      raise item
    self._state = state
    return item

  def get_state(self) -> bytes:
    """Position after the last batch returned by ``next()`` (what a checkpoint must save), as
    the JSON bytes grain's checkpoint handler writes for a non-grain iterator (the same text it
    writes for the grain iterator itself, so the underlying iterator restores it)."""
    if isinstance(self._state, bytes):  # a non-grain iterator's own bytes (buckets.BucketedIterator)
      return self._state
    return json.dumps(self._state, indent=4).encode()

  def set_state(self, state) -> None:
    raise RuntimeError("restore the data position into the underlying iterator before wrapping it in a Prefetcher")

  def close(self) -> None:
    """Stop the background thread (batches still queued are dropped)."""
    self._stop.set()
    self._thread.join(timeout=10)
