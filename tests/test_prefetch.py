"""The input path: host batches stay float16, the prefetch queue keeps order and the exact
resume position, pipeline errors surface at the step that needed the batch, worker defaults."""

import json

import numpy as np
import pytest

from sd3_jax.data import input_pipeline, sources
from sd3_jax.training import prefetch


def _source(n=32):
  return sources.SyntheticSource(
    num_records=n, latent_shape=(4, 4, 4), context_len=3, context_dim=8, pooled_dim=8, seed=0
  )


def _iter(source, **kw):
  return input_pipeline.make_train_iterator(
    source, global_batch_size=4, seed=1, process_index=0, process_count=1, dtype=None, **kw
  )


def test_host_batches_keep_the_stored_float16():
  batch = next(_iter(_source()))
  assert {k: v.dtype for k, v in batch.items()} == {k: np.dtype(np.float16) for k in batch}


def test_prefetcher_keeps_order_and_the_consumed_position():
  src = _source()
  expected = [b["latent"].copy() for b, _ in zip(_iter(src), range(6))]
  it = _iter(src)
  pf = prefetch.Prefetcher(it, lambda b: b["latent"] * 1, depth=3)
  got = [next(pf) for _ in range(2)]
  # The thread has read ahead, but the saved position is after the two batches handed out.
  assert json.loads(pf.get_state())["next_index"] == 2
  resumed = _iter(src)
  resumed.set_state(json.loads(pf.get_state()))
  got += [next(resumed)["latent"] for _ in range(4)]
  pf.close()
  for a, b in zip(got, expected):
    np.testing.assert_array_equal(a, b)


def test_prefetcher_raises_pipeline_errors_in_order():
  class Failing:
    def __init__(self):
      self.i = 0

    def get_state(self):
      return {"i": self.i}

    def __next__(self):
      self.i += 1
      if self.i == 3:
        raise ValueError("corrupt record in shard-00001 at index 7")
      return self.i

  pf = prefetch.Prefetcher(Failing(), lambda x: x * 10, depth=2)
  assert [next(pf), next(pf)] == [10, 20]
  with pytest.raises(ValueError, match="corrupt record"):
    next(pf)
  assert json.loads(pf.get_state()) == {"i": 2}
  with pytest.raises(RuntimeError, match="before wrapping"):
    pf.set_state({"i": 0})
  pf.close()


def test_prefetcher_stops_at_the_end_of_a_finite_iterator():
  src = _source(8)
  pf = prefetch.Prefetcher(_iter(src, num_epochs=1), lambda b: b, depth=4)
  assert len(list(pf)) == 2
  with pytest.raises(StopIteration):
    next(pf)
  pf.close()


def test_worker_count_default():
  assert input_pipeline.resolve_worker_count(3) == 3
  assert input_pipeline.resolve_worker_count(-1, cpu_count=2, flags_parsed=True) == 0
  assert input_pipeline.resolve_worker_count(-1, cpu_count=64, flags_parsed=True) == 16
  assert input_pipeline.resolve_worker_count(-1, cpu_count=32, flags_parsed=True) == 8
  # Without parsed absl flags grain cannot start workers: auto falls back to threads.
  assert input_pipeline.resolve_worker_count(-1, cpu_count=64, flags_parsed=False) == 0
  with pytest.raises(ValueError, match="-1 \\(auto\\)"):
    input_pipeline.resolve_worker_count(-2)
