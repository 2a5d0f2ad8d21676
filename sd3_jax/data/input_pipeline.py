"""grain input pipelines: per-process, checkpointable batch iterators over a record source
(``sd3_jax.data.records``: ``RecordSource`` on disk or ``SyntheticSource``).

Iterators
---------
``make_train_iterator``: every epoch is a fresh global permutation (seed + epoch) cut into whole
global batches; host-local batch j of process p is rows [p*b, (p+1)*b) of global batch j, so
processes read disjoint records, their union is the epoch, and the concatenated global batch does
not depend on the process count. The iterator is a ``grain.DatasetIterator`` (get_state /
set_state, ``grain.checkpoint.CheckpointSave/Restore`` for orbax).
``make_eval_iterator``: the fixed validation examples once, in order, padded to whole global
batches (``mask`` False, ``example_id`` -1 on padding rows) so every process runs the same
number of steps and every example counts exactly once.
"""

from __future__ import annotations

import logging
import math
import os
import signal
from typing import Any

import grain
import numpy as np
from absl import flags

from sd3_jax.data.records import DTYPES_BY_NAME, TENSORS, ElementSpec, Example

# ----------------------------------------------------------------------------- iterators

DEFAULT_READ_OPTIONS = grain.ReadOptions(num_threads=8, prefetch_buffer_size=8)  # in batches


def _dtype(dtype: Any | None) -> np.dtype | None:
  if dtype is not None and np.dtype(dtype) not in DTYPES_BY_NAME.values():
    raise ValueError(f"batch dtype must be float16, bfloat16, float32 or None, got {dtype}")
  return None if dtype is None else np.dtype(dtype)


def _element_spec(source) -> ElementSpec:
  spec = getattr(source, "element_spec", None)
  return spec if spec is not None else source[0].spec


class _ToArrays(grain.transforms.Map):
  """Example -> {latent, context, pooled} cast to the batch dtype (None: keep the stored one)."""

  def __init__(self, dtype: np.dtype | None):
    self._dtype = dtype

  def map(self, example: Example) -> dict[str, np.ndarray]:
    return {k: np.asarray(getattr(example, k), self._dtype) for k in TENSORS}


class _EvalElement(grain.transforms.Map):
  """Global position -> example with id and mask, or a zero padding row past the end."""

  def __init__(self, source, num_examples: int, spec: ElementSpec, dtype: np.dtype | None):
    self._source, self._n, self._dtype, self._spec = source, num_examples, dtype, spec

  def map(self, position: int) -> dict[str, np.ndarray]:
    if position < self._n:
      out = _ToArrays(self._dtype).map(self._source[position])
      return {**out, "example_id": np.int64(position), "mask": np.bool_(True)}
    out = {k: np.zeros(shape, self._dtype or dt) for k, (shape, dt) in self._spec.items()}
    return {**out, "example_id": np.int64(-1), "mask": np.bool_(False)}


def _check_batching(global_batch_size: int, process_index: int, process_count: int) -> int:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"need 0 <= process_index < process_count, got {process_index}, {process_count}")
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(
      f"global_batch_size {global_batch_size} must be a positive multiple of "
      f"process_count {process_count}: every process feeds "
      f"global_batch_size // process_count examples per step"
    )
  return global_batch_size // process_count


def resolve_worker_count(requested: int, cpu_count: int | None = None, flags_parsed: bool | None = None) -> int:
  """grain worker processes for ``requested`` (-1 = auto: a quarter of the host's cores, at
  most 16, none below 8 cores). Worker processes need absl flags parsed (the sd3-train
  command runs under absl.app.run); without them auto falls back to reading in threads."""
  if requested >= 0:
    return requested
  if requested != -1:
    raise ValueError(f"data.worker_count must be >= 0 or -1 (auto), got {requested}")
  cores = cpu_count if cpu_count is not None else (os.cpu_count() or 1)
  n = 0 if cores < 8 else min(cores // 4, 16)
  parsed = flags.FLAGS.is_parsed() if flags_parsed is None else flags_parsed
  if n and not parsed:
    logging.getLogger(__name__).info(
      "data.worker_count=-1: absl flags are not parsed, so grain cannot start worker "
      "processes; reading in threads instead (run under absl.app.run for %d workers)",
      n,
    )
    return 0
  return n


def make_train_iterator(
  source,
  *,
  global_batch_size: int,
  seed: int,
  process_index: int,
  process_count: int,
  shuffle: bool = True,
  num_epochs: int | None = None,
  worker_count: int = 0,
  dtype: Any | None = np.float32,
  read_options: grain.ReadOptions | None = None,
) -> grain.DatasetIterator:
  """Host-local training batches {latent [b,h,w,C], context [b,L,D], pooled [b,P]}, b = G / P.

  Each epoch (len(source) // G global batches; the len(source) % G leftover records are a
  different random subset each epoch when shuffling) uses the permutation seeded by seed + epoch.
  Global batch j = permuted records [j G, (j+1) G); this process reads rows
  [process_index b, (process_index+1) b) of it, so processes are disjoint and the global batch
  does not depend on process_count. num_epochs None repeats forever.

  The result is checkpointable (get_state/set_state; grain.checkpoint.CheckpointSave/Restore
  under orbax). With worker_count = 0 the state is {'next_index': steps taken}, the same on
  every process, so a run may resume on a different process count; with worker_count > 0
  (grain worker processes; absl flags must be parsed, e.g. under absl.app.run) the state is
  per worker and needs the same worker_count to restore. read_options counts batches
  (default 8 threads, 8 batches prefetched). dtype None keeps the stored dtypes (float16 for
  the text: half the host work and host-to-device bytes of float32; cast on device instead).
  """
  b = _check_batching(global_batch_size, process_index, process_count)
  n = len(source)
  if n < global_batch_size:
    raise ValueError(f"{source!r} has {n} records, fewer than one global batch ({global_batch_size})")
  if not 0 <= seed < 2**32:
    raise ValueError(f"seed must be in [0, 2^32), got {seed}")
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"num_epochs must be None (forever) or >= 1, got {num_epochs}")
  ds = _train_order(
    grain.MapDataset.source(source),
    _ToArrays(_dtype(dtype)),
    global_batch_size,
    b,
    seed,
    shuffle,
    num_epochs,
    process_index,
    process_count,
  )
  it = ds.to_iter_dataset(read_options or DEFAULT_READ_OPTIONS)
  if worker_count > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count), worker_init_fn=ignore_ctrl_c)
  return iter(it)


def ignore_ctrl_c(worker_index: int, worker_count: int) -> None:
  """In each grain worker process: a terminal's Ctrl-C reaches the whole process group, and the
  trainer, not its workers, decides what to do (save the current step and stop; it shuts the
  workers down). A worker that died of it would print a traceback and starve the save."""
  signal.signal(signal.SIGINT, signal.SIG_IGN)


def _train_order(
  ds: grain.MapDataset,
  transform,
  global_batch_size: int,
  b: int,
  seed: int,
  shuffle: bool,
  num_epochs: int | None,
  process_index: int,
  process_count: int,
) -> grain.MapDataset:
  """The training order (``make_train_iterator``): shuffled epochs of whole global batches."""
  n = len(ds)
  if shuffle:
    ds = ds.shuffle(seed=seed)  # epoch e uses seed + e (grain reseeds per epoch)
  ds = ds[: (n // global_batch_size) * global_batch_size].repeat(num_epochs)
  if transform is not None:
    ds = ds.map(transform)
  ds = ds.batch(b, drop_remainder=True)  # host batch m: rows [m b, (m+1) b)
  return ds[process_index::process_count]  # global batch j = host batches j P .. j P + P - 1


def train_batch_indices(
  num_records: int,
  step: int,
  *,
  global_batch_size: int,
  seed: int,
  process_index: int,
  process_count: int,
  shuffle: bool = True,
) -> np.ndarray:
  """Source indices of this process's rows of the ``step``-th batch (0-based) that
  ``make_train_iterator`` yields with the same arguments: the records to re-read when that batch
  needs inspecting (e.g. after a non-finite loss)."""
  b = _check_batching(global_batch_size, process_index, process_count)
  ds = _train_order(
    grain.MapDataset.range(num_records), None, global_batch_size, b, seed, shuffle, None, process_index, process_count
  )
  return np.asarray(ds[step], np.int64)


def make_eval_iterator(
  source,
  *,
  global_batch_size: int,
  process_index: int,
  process_count: int,
  max_examples: int | None = None,
  dtype: Any | None = np.float32,
  read_options: grain.ReadOptions | None = None,
) -> grain.DatasetIterator:
  """One ordered pass over the first max_examples (default all) examples, for validation.

  Yields {latent, context, pooled, example_id int64 [b], mask bool [b]}; example_id is the record
  index in ``source`` (key for flow.levels.fixed_validation_noise), -1 with mask False on the zero
  padding that fills the last global batch. Every process yields ceil(N / G) batches.
  """
  b = _check_batching(global_batch_size, process_index, process_count)
  n = len(source) if max_examples is None else min(max_examples, len(source))
  if n < 1:
    raise ValueError(f"no validation examples ({source!r}, max_examples={max_examples})")
  total = math.ceil(n / global_batch_size) * global_batch_size
  ds = grain.MapDataset.range(total).map(_EvalElement(source, n, _element_spec(source), _dtype(dtype)))
  ds = ds.batch(b, drop_remainder=True)[process_index::process_count]
  return iter(ds.to_iter_dataset(read_options or DEFAULT_READ_OPTIONS))
