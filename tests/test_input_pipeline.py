"""Record format, shard files, sources and per-process checkpointable iterators (tiny sizes)."""

import json
import os
import shutil

import grain
import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.numpy
from array_record.python.array_record_module import ArrayRecordWriter

from sd3_jax.data import input_pipeline as ip
from sd3_jax.data import records, sources

SPEC = dict(latent_shape=(4, 2, 3), context_len=5, context_dim=6, pooled_dim=4)


def _synthetic(n, seed=0, dtype=np.float16):
  return sources.SyntheticSource(n, seed=seed, dtype=dtype, **SPEC)


def _write(directory, source, per_shard=4, **kwargs):
  with records.RecordWriter(directory, records_per_shard=per_shard, **kwargs) as w:
    for i in range(len(source)):
      ex = source[i]
      w.write(ex.latent, ex.context, ex.pooled, ex.metadata)
  return directory


def _row_index(source, dtype=np.float32):
  """pooled bytes (as cast to the batch dtype) -> record index, to identify the rows of a batch."""
  table = {source[i].pooled.astype(dtype).astype(np.float32).tobytes(): i for i in range(len(source))}
  assert len(table) == len(source)
  return lambda batch: [table[row.tobytes()] for row in np.asarray(batch["pooled"], np.float32)]


@pytest.mark.parametrize("latent_dtype", [np.float16, ml_dtypes.bfloat16, np.float32])
def test_round_trip_dtypes_and_metadata(tmp_path, latent_dtype):
  rng = np.random.default_rng(0)
  examples = [
    dict(
      latent=rng.normal(size=(4, 2, 16)).astype(latent_dtype),
      context=rng.normal(size=(7, 32)).astype(np.float16),
      pooled=rng.normal(size=(8,)).astype(np.float16),
      metadata={"id": f"img-{i}", "caption": f"ein Bild {i} ✓", "source": "test"},
    )
    for i in range(5)
  ]
  with records.RecordWriter(tmp_path, prefix="val", records_per_shard=2, metadata={"vae": "sd3"}) as w:
    for ex in examples:
      w.write(**ex)
  src = sources.RecordSource(
    tmp_path, expected_shapes={"latent": (None, None, 16), "context": (None, 32), "pooled": (8,)}
  )
  assert len(src) == 5
  assert src.element_spec == {
    "latent": ((4, 2, 16), np.dtype(latent_dtype)),
    "context": ((7, 32), np.dtype(np.float16)),
    "pooled": ((8,), np.dtype(np.float16)),
  }
  for i, ex in enumerate(examples):
    got = src[i]
    for k in ("latent", "context", "pooled"):
      assert got.__dict__[k].dtype == ex[k].dtype
      np.testing.assert_array_equal(got.__dict__[k], ex[k])
    assert got.metadata == ex["metadata"]
  info = json.loads((tmp_path / "dataset_info.json").read_text())
  assert info["num_records"] == 5 and info["metadata"] == {"vae": "sd3"}
  assert info["element_spec"]["latent"] == {"shape": [4, 2, 16], "dtype": np.dtype(latent_dtype).name}
  assert [s["num_records"] for s in info["shards"]] == [2, 2, 1]
  # The records are plain safetensors: the reference parser reads them (dtype names, shapes).
  raw = grain.sources.ArrayRecordDataSource([str(tmp_path / "val-00001-of-00003.array_record")])[1]
  parsed = dict(safetensors.deserialize(raw))
  assert parsed["context"]["dtype"] == "F16" and parsed["latent"]["shape"] == [4, 2, 16]
  if latent_dtype == np.float16:  # safetensors.numpy cannot load BF16; our decoder can
    np.testing.assert_array_equal(safetensors.numpy.load(raw)["latent"], examples[3]["latent"])


def test_shard_naming_and_atomic_writer(tmp_path):
  src = _synthetic(7)
  d = tmp_path / "ds"
  with records.RecordWriter(d, prefix="train", records_per_shard=3) as w:
    for i in range(7):
      ex = src[i]
      w.write(ex.latent, ex.context, ex.pooled, ex.metadata)
      # Until close nothing exists under a final name: only hidden temporaries.
      assert all(f.startswith(".") and f.endswith(".tmp") for f in os.listdir(d))
  shards = [f"train-{i:05d}-of-00003.array_record" for i in range(3)]
  assert sorted(os.listdir(d)) == ["dataset_info.json"] + shards
  assert [sources.RecordSource(d).locate(i)[1] for i in (0, 2, 3, 6)] == [0, 2, 0, 0]
  # A failure inside the block leaves the directory untouched (here: the finished dataset).
  before = sorted(os.listdir(d))
  with pytest.raises(RuntimeError, match="boom"):
    with records.RecordWriter(d, overwrite=True) as w:
      w.write(src[0].latent, src[0].context, src[0].pooled, src[0].metadata)
      raise RuntimeError("boom")
  assert sorted(os.listdir(d)) == before and len(sources.RecordSource(d)) == 7
  with pytest.raises(FileExistsError, match="overwrite=True"):
    records.RecordWriter(d)
  _write(d, _synthetic(2), overwrite=True, prefix="new")  # replaces the old shards and info
  assert sorted(os.listdir(d)) == ["dataset_info.json", "new-00000-of-00001.array_record"]
  assert len(sources.RecordSource(d)) == 2


def test_writer_rejects_bad_examples(tmp_path):
  ex = _synthetic(1)[0]
  w = records.RecordWriter(tmp_path)
  w.write(ex.latent, ex.context, ex.pooled, ex.metadata)
  with pytest.raises(ValueError, match="one shape/dtype per dataset"):
    w.write(ex.latent[:2], ex.context, ex.pooled, {"id": "b"})
  with pytest.raises(ValueError, match="non-finite"):
    w.write(ex.latent, np.full_like(ex.context, np.inf), ex.pooled, {"id": "c"})
  with pytest.raises(ValueError, match="'id'"):
    w.write(ex.latent, ex.context, ex.pooled, {"caption": "no id"})
  with pytest.raises(ValueError, match="dtype"):
    w.write(ex.latent.astype(np.float64), ex.context, ex.pooled, {"id": "d"})
  with pytest.raises(ValueError, match="rank"):
    w.write(ex.latent[0], ex.context, ex.pooled, {"id": "e"})
  w.abort()
  assert os.listdir(tmp_path) == []
  with pytest.raises(ValueError, match="no records"):
    records.RecordWriter(tmp_path / "empty").close()
  with pytest.raises(records.RecordError, match="not a safetensors record"):
    records.decode_record(b"\x01\x02")
  with pytest.raises(records.RecordError, match="record format"):
    records.decode_record(safetensors.numpy.save({"latent": np.zeros((1, 1, 1), np.float16)}))


def test_corrupt_record_raises_with_file_and_index(tmp_path):
  src = _synthetic(10)
  d = _write(tmp_path / "ds", src, per_shard=4, compression="uncompressed")
  # Flip bytes inside global record 5 = shard 1, record 1 (the chunk checksum catches it).
  shard = d / "data-00001-of-00003.array_record"
  blob = bytearray(shard.read_bytes())
  at = blob.find(src.record_bytes(5)[-48:])
  assert at > 0
  blob[at : at + 8] = bytes(b ^ 0xFF for b in blob[at : at + 8])
  shard.write_bytes(bytes(blob))
  rs = sources.RecordSource(d)
  np.testing.assert_array_equal(rs[4].latent, src[4].latent)  # neighbours still readable
  with pytest.raises(
    records.RecordError, match=r"data-00001-of-00003.array_record: record 1 \(global index 5\).*re-create"
  ):
    rs[5]
  # Training does not skip it: the iterator raises the same error.
  it = ip.make_train_iterator(
    rs, global_batch_size=2, seed=0, process_index=0, process_count=1, shuffle=False, num_epochs=1
  )
  with pytest.raises(records.RecordError, match="record 1 .global index 5"):
    for _ in it:
      pass
  # A well-formed ArrayRecord entry that is not a record: decoding names file and index too.
  w = ArrayRecordWriter(str(d / "data-00002-of-00003.array_record"), "group_size:1")
  w.write(src.record_bytes(8))
  w.write(b"garbage, not safetensors")
  w.close()
  with pytest.raises(
    records.RecordError, match=r"data-00002-of-00003.array_record: record 1 \(global index 9\).*not a safetensors"
  ):
    sources.RecordSource(d)[9]
  # A truncated shard is refused when the source opens it.
  blob = (d / "data-00000-of-00003.array_record").read_bytes()
  (d / "data-00000-of-00003.array_record").write_bytes(blob[: len(blob) // 2])
  with pytest.raises(records.RecordError, match="data-00000-of-00003.array_record: cannot open shard"):
    sources.RecordSource(d)


def test_record_source_directory_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    sources.RecordSource(tmp_path / "nope")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no dataset"):
    sources.RecordSource(tmp_path / "empty")
  d = _write(tmp_path / "ds", _synthetic(6), per_shard=2)
  with pytest.raises(records.RecordError, match="latent has shape .4, 2, 3., expected .None, None, 16."):
    sources.RecordSource(d, expected_shapes={"latent": (None, None, 16)})
  shutil.copy(d / "data-00000-of-00003.array_record", d / "data-00000-of-00004.array_record")
  with pytest.raises(records.RecordError, match="unlisted shards .'data-00000-of-00004.array_record'."):
    sources.RecordSource(d)
  os.remove(d / "data-00000-of-00004.array_record")
  os.remove(d / "data-00002-of-00003.array_record")
  with pytest.raises(records.RecordError, match="missing shards .'data-00002-of-00003.array_record'."):
    sources.RecordSource(d)
  d2 = _write(tmp_path / "ds2", _synthetic(6), per_shard=2)
  info = json.loads((d2 / "dataset_info.json").read_text())
  info["shards"][1]["num_records"] = 3
  info["num_records"] = 7
  (d2 / "dataset_info.json").write_text(json.dumps(info))
  with pytest.raises(records.RecordError, match="holds 2 records but dataset_info.json says 3"):
    sources.RecordSource(d2)
  info["format"] = "something_else"
  (d2 / "dataset_info.json").write_text(json.dumps(info))
  with pytest.raises(records.RecordError, match="not a sd3_jax.latent_records v1 dataset"):
    sources.RecordSource(d2)
  (d2 / "dataset_info.json").write_text("{not json")
  with pytest.raises(records.RecordError, match="cannot use .*dataset_info.json"):
    sources.RecordSource(d2)
  os.remove(d2 / "dataset_info.json")
  with pytest.raises(records.RecordError, match="no dataset_info.json"):
    sources.RecordSource(d2)


def test_synthetic_source_determinism_and_spec(tmp_path):
  a, b = _synthetic(6, seed=3), _synthetic(6, seed=3)
  assert len(a) == 6
  for k in ("latent", "context", "pooled"):
    np.testing.assert_array_equal(getattr(a[4], k), getattr(b[4], k))  # any access order
    assert not np.array_equal(getattr(a[4], k), getattr(a[5], k))
    assert not np.array_equal(getattr(a[4], k), getattr(_synthetic(6, seed=4)[4], k))
  assert (
    a[2].spec
    == a.element_spec
    == {
      "latent": ((4, 2, 3), np.dtype(np.float16)),
      "context": ((5, 6), np.dtype(np.float16)),
      "pooled": ((4,), np.dtype(np.float16)),
    }
  )
  big = sources.SyntheticSource(1, (16, 16, 16), 1, 1, 1, seed=0, dtype=np.float32)[0].latent
  assert abs(big.mean()) < 0.05 and abs(big.std() - 1) < 0.05
  decoded = records.decode_record(a.record_bytes(1))
  np.testing.assert_array_equal(decoded.context, a[1].context)
  assert decoded.metadata == a[1].metadata
  assert sources.RecordSource(_write(tmp_path, a)).element_spec == a.element_spec  # same spec on disk
  with pytest.raises(IndexError):
    a[6]


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_processes_read_disjoint_slices_covering_each_epoch():
  src = _synthetic(24)
  rows = _row_index(src)
  kw = dict(global_batch_size=8, seed=5, num_epochs=2, read_options=grain.ReadOptions(num_threads=1))
  per_proc = [list(ip.make_train_iterator(src, process_index=p, process_count=2, **kw)) for p in range(2)]
  assert [len(x) for x in per_proc] == [6, 6]  # 3 global batches per epoch, 2 epochs, then stop
  assert per_proc[0][0]["latent"].shape == (4, 4, 2, 3) and per_proc[0][0]["latent"].dtype == np.float32
  epochs = []
  for e in range(2):
    ids = [[i for batch in proc[3 * e : 3 * e + 3] for i in rows(batch)] for proc in per_proc]
    assert not set(ids[0]) & set(ids[1])
    assert sorted(ids[0] + ids[1]) == list(range(24))
    epochs.append(ids[0])
  assert epochs[0] != epochs[1]  # reshuffled each epoch
  # The global batch (processes concatenated in order) does not depend on the process count.
  for p_count in (1, 4):
    its = [ip.make_train_iterator(src, process_index=p, process_count=p_count, **kw) for p in range(p_count)]
    for j in range(6):
      glob = np.concatenate([next(it)["pooled"] for it in its])
      np.testing.assert_array_equal(glob, np.concatenate([per_proc[0][j]["pooled"], per_proc[1][j]["pooled"]]))
  # Without shuffling: records in order; 26 records give 3 whole global batches per epoch.
  it = ip.make_train_iterator(
    _synthetic(26), global_batch_size=8, seed=0, process_index=1, process_count=2, shuffle=False, dtype=None
  )
  batches = _take(it, 4)
  assert [rows(b) for b in batches] == [[4, 5, 6, 7], [12, 13, 14, 15], [20, 21, 22, 23], [4, 5, 6, 7]]
  assert batches[0]["context"].dtype == np.float16  # dtype=None keeps the stored dtype


def test_leftover_records_differ_per_epoch():
  src = _synthetic(10)
  rows = _row_index(src)
  it = ip.make_train_iterator(src, global_batch_size=4, seed=1, process_index=0, process_count=1, num_epochs=3)
  batches = [rows(b) for b in it]
  assert len(batches) == 6  # 2 global batches of 4 per epoch; 2 records left over each epoch
  epochs = [set(batches[2 * e][:] + batches[2 * e + 1]) for e in range(3)]
  assert all(len(e) == 8 for e in epochs)
  assert len({frozenset(set(range(10)) - e) for e in epochs}) > 1


def test_iterator_state_restores_the_exact_next_batch(tmp_path):
  import orbax.checkpoint as ocp

  src = _synthetic(20)
  make = lambda p=0, n=1: ip.make_train_iterator(src, global_batch_size=4, seed=2, process_index=p, process_count=n)
  it = make()
  _take(it, 7)  # crosses an epoch boundary (5 batches per epoch)
  state = it.get_state()
  expected = _take(it, 3)
  again = make()
  again.set_state(state)
  for want, got in zip(expected, _take(again, 3)):
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  # The state is the number of steps, so it also resumes on a different process count.
  halves = [make(p, 2) for p in range(2)]
  for h in halves:
    h.set_state(state)
  np.testing.assert_array_equal(np.concatenate([next(h)["latent"] for h in halves]), expected[0]["latent"])
  # Through orbax, as the trainer saves it next to the train state.
  fresh = make()
  _take(fresh, 7)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.save(7, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(fresh)))
    mngr.wait_until_finished()
  restored = make()
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.restore(mngr.latest_step(), args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
  np.testing.assert_array_equal(next(restored)["context"], expected[0]["context"])


def test_eval_iterator_covers_each_example_once_with_padding():
  src = _synthetic(10)
  rows = _row_index(src, ml_dtypes.bfloat16)
  seen = []
  for p in range(2):
    batches = list(
      ip.make_eval_iterator(src, global_batch_size=4, process_index=p, process_count=2, dtype=ml_dtypes.bfloat16)
    )
    assert len(batches) == 3  # ceil(10 / 4) on every process
    for b in batches:
      assert b["latent"].dtype == ml_dtypes.bfloat16 and b["example_id"].dtype == np.int64
      real = b["mask"]
      assert np.all(b["example_id"][~real] == -1) and np.all(b["latent"][~real] == 0)
      real_rows = {k: v[real] for k, v in b.items()}
      assert rows(real_rows) == list(real_rows["example_id"])  # id = record index
      seen += list(real_rows["example_id"])
  assert sorted(seen) == list(range(10))
  single = list(ip.make_eval_iterator(src, global_batch_size=4, process_index=0, process_count=1, max_examples=5))
  assert [list(b["example_id"]) for b in single] == [[0, 1, 2, 3], [4, -1, -1, -1]]


def test_bad_arguments():
  src = _synthetic(8)
  kw = dict(seed=0, process_index=0, process_count=3)
  with pytest.raises(ValueError, match="multiple of process_count 3"):
    ip.make_train_iterator(src, global_batch_size=8, **kw)
  with pytest.raises(ValueError, match="process_index"):
    ip.make_train_iterator(src, global_batch_size=8, seed=0, process_index=2, process_count=2)
  with pytest.raises(ValueError, match="fewer than one global batch"):
    ip.make_train_iterator(src, global_batch_size=16, seed=0, process_index=0, process_count=1)
  with pytest.raises(ValueError, match="num_epochs"):
    ip.make_train_iterator(src, global_batch_size=4, seed=0, process_index=0, process_count=1, num_epochs=0)
  with pytest.raises(ValueError, match="seed"):
    ip.make_train_iterator(src, global_batch_size=4, seed=-1, process_index=0, process_count=1)
  with pytest.raises(ValueError, match="batch dtype"):
    ip.make_train_iterator(src, global_batch_size=4, seed=0, process_index=0, process_count=1, dtype=np.int32)
  with pytest.raises(ValueError, match="multiple of process_count 2"):
    ip.make_eval_iterator(src, global_batch_size=3, process_index=0, process_count=2)
  with pytest.raises(ValueError, match="latent_shape"):
    sources.SyntheticSource(4, (4, 4), 1, 1, 1, seed=0)


def test_worker_processes_give_the_same_batches_and_restore():
  from absl import flags

  if not flags.FLAGS.is_parsed():  # grain workers read absl flags (main.py runs under absl.app.run)
    flags.FLAGS.mark_as_parsed()
  src = _synthetic(24)
  make = lambda w: ip.make_train_iterator(
    src, global_batch_size=4, seed=1, process_index=1, process_count=2, worker_count=w
  )
  ref = [b["pooled"] for b in _take(make(0), 6)]
  it = make(2)
  got = [b["pooled"] for b in _take(it, 3)]
  state = it.get_state()
  got += [b["pooled"] for b in _take(it, 3)]
  resumed = make(2)
  resumed.set_state(state)
  got += [b["pooled"] for b in _take(resumed, 3)]
  it.close()
  resumed.close()
  for want, have in zip(ref + ref[3:], got):
    np.testing.assert_array_equal(have, want)
