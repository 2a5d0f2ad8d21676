"""Crafted dataset-builder inputs, records and trainer configs: each is refused (or skipped and
counted) with a message naming the problem, and nothing already written changes.

Captions JSONL: malformed lines name file and line; duplicates name both lines; files resolving
outside --images (``..``, absolute paths, symlinks) are never opened, only skipped and counted.
Records: NaN/Inf written by anything is an error naming shard and index; RecordWriter refuses a
duplicate id. Trainer: config values that cannot run are start-up errors; a clean error (bad
config, a NaN record) exits 2 with one line and no second traceback from checkpointing threads
or pipeline workers; the NaN stop says whether the inputs or the training diverged.
"""

import json
import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from PIL import Image

from sd3_jax.data import builder, image_sources
from sd3_jax.training import divergence
from sd3_jax.data import records, sources
from sd3_jax.training.config_checks import check_runnable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECOND_TRACEBACKS = ("Traceback", "Event loop is closed", "cannot schedule new futures")


def _encoders():
  def text_encoder(prompts):
    return np.zeros((len(prompts), 3, 8), np.float32), np.zeros((len(prompts), 4), np.float32)

  def image_encoder(images, seeds):
    b, h, w, _ = images.shape
    return images.reshape(b, h // 2, 2, w // 2, 2, 3).mean((2, 4))

  return dict(
    image_encoder=image_encoder,
    text_encoder=text_encoder,
    resolution=8,
    batch_size=2,
    chunk_size=4,
    records_per_shard=4,
  )


def _folder(tmp_path, lines):
  img = tmp_path / "imgs"
  img.mkdir()
  for name in ("a.png", "b.png", "c.png"):
    Image.fromarray(np.full((12, 12, 3), 100, np.uint8)).save(img / name)
  (tmp_path / "secret.png").write_bytes((img / "a.png").read_bytes())  # a real image, outside
  caps = tmp_path / "caps.jsonl"
  caps.write_text("\n".join(lines) + "\n")
  return str(img), str(caps)


def _row(file, caption="x", **kw):
  return json.dumps({"file": file, "caption": caption, **kw})


# ----------------------------------------------------------------------------- captions JSONL

BAD_CAPTIONS = {  # name -> (lines, message regex)
  "malformed_json": (
    [_row("a.png"), _row("b.png"), '{"file": "c.png", "caption": '],
    r"caps.jsonl:3: not a JSON object",
  ),
  "line_is_list": ([_row("a.png"), '["b.png", "x"]'], r"caps.jsonl:2: expected a JSON object, got list"),
  "caption_not_string": ([_row("a.png", caption=5)], r"caps.jsonl:1: need string 'file' and 'caption'"),
  "caption2_not_string": ([_row("a.png", caption2=["x"])], r"caps.jsonl:1: 'caption2' must be a string"),
  "duplicate_file": (
    [_row("a.png"), _row("b.png"), _row("a.png")],
    r"caps.jsonl:3: duplicate file 'a.png' \(first on line 1\)",
  ),
  "duplicate_id": (
    [_row("a.png", id="k"), _row("b.png", id="k")],
    r"caps.jsonl:2: duplicate id 'k' \(first on line 1\)",
  ),
}


@pytest.mark.parametrize("name", sorted(BAD_CAPTIONS))
def test_bad_captions_jsonl_names_file_and_line(tmp_path, name):
  lines, match = BAD_CAPTIONS[name]
  img, caps = _folder(tmp_path, lines)
  with pytest.raises(ValueError, match=match):
    image_sources.FolderSource(img, caps)


def test_files_outside_images_are_skipped_and_counted_never_opened(tmp_path, monkeypatch):
  img, caps = _folder(tmp_path, [])
  os.symlink(os.path.join(tmp_path, "secret.png"), os.path.join(img, "link_out.png"))
  os.symlink(os.path.join(img, "b.png"), os.path.join(img, "link_in.png"))  # inside: fine
  rows = [
    _row("a.png"),
    _row("../secret.png"),
    _row(str(tmp_path / "secret.png")),
    _row("link_out.png"),
    _row("link_in.png"),
    _row("c.png"),
    _row("sub/../../secret.png"),
  ]
  with open(caps, "w") as f:
    f.write("\n".join(rows) + "\n")
  with pytest.warns(UserWarning, match="4 file.s. resolve outside"):
    source = image_sources.FolderSource(img, caps)
  opened = []
  real_open = open
  monkeypatch.setattr("builtins.open", lambda p, *a, **k: (opened.append(str(p)), real_open(p, *a, **k))[1])
  out = tmp_path / "out"
  with pytest.warns(UserWarning, match="resolves outside the image folder"):
    result = builder.build(source, str(out), **_encoders())
  monkeypatch.undo()
  assert result["summary"]["num_records"] == 3 and result["summary"]["skipped_examples"] == 4
  assert not [p for p in opened if "secret" in p or "link_out" in p]
  ids = {sources.RecordSource(str(out))[i].metadata["id"] for i in range(3)}
  assert ids == {"a.png", "link_in.png", "c.png"}


# ----------------------------------------------------------------------------- records


def _raw_record(latent, context, pooled, rid):
  """Record bytes from a writer that does not check values (anything may write a dataset)."""
  return safetensors.numpy.save(
    {"latent": latent, "context": context, "pooled": pooled}, metadata={"format": records.RECORD_FORMAT, "id": rid}
  )


def _write_dataset(
  directory, n, bad=None, shape=(2, 2, 4), ctx=(3, 8), pooled=4, dtype=np.float16, per_shard=3, monkeypatch=None
):
  """n records through RecordWriter; record ``bad`` = (index, tensor, value) is poisoned with a
  value the writer would refuse (encode_record is swapped for an unchecked one for it)."""
  rng = np.random.default_rng(0)
  with records.RecordWriter(directory, records_per_shard=per_shard) as w:
    for i in range(n):
      arrays = {
        "latent": rng.standard_normal(shape).astype(dtype),
        "context": rng.standard_normal(ctx).astype(dtype),
        "pooled": rng.standard_normal(pooled).astype(dtype),
      }
      if bad is not None and bad[0] == i:
        arrays[bad[1]].reshape(-1)[1] = bad[2]
        monkeypatch.setattr(records, "encode_record", lambda l, c, p, m: _raw_record(l, c, p, m["id"]))
      w.write(arrays["latent"], arrays["context"], arrays["pooled"], {"id": f"ex{i}"})
      if bad is not None and bad[0] == i:
        monkeypatch.undo()
  return directory


NONFINITE_RECORDS = {  # name -> (bad index, tensor, value, dtype, shard, index in shard)
  "nan_latent_fp16": (4, "latent", np.nan, np.float16, "data-00001-of-00003", 1),
  "inf_pooled_bf16": (7, "pooled", np.inf, ml_dtypes.bfloat16, "data-00002-of-00003", 1),
  "neginf_context_f32": (0, "context", -np.inf, np.float32, "data-00000-of-00003", 0),
}


@pytest.mark.parametrize("name", sorted(NONFINITE_RECORDS))
def test_nonfinite_record_is_an_error_naming_shard_and_index(tmp_path, monkeypatch, name):
  i, tensor, value, dtype, shard, local = NONFINITE_RECORDS[name]
  d = _write_dataset(str(tmp_path / "ds"), 8, bad=(i, tensor, value), dtype=dtype, monkeypatch=monkeypatch)
  src = sources.RecordSource(d)
  src[(i + 1) % 8]  # neighbours read fine
  with pytest.raises(
    records.RecordError,
    match=rf"{shard}.array_record: record {local} \(global index {i}\).*{tensor} of record "
    rf"'ex{i}' holds 1 NaN/Inf",
  ):
    src[i]


def test_record_writer_refuses_duplicate_id(tmp_path):
  w = records.RecordWriter(str(tmp_path / "ds"))
  z = np.zeros((2, 2, 4), np.float16)
  w.write(z, np.zeros((3, 8), np.float16), np.zeros(4, np.float16), {"id": "same"})
  with pytest.raises(ValueError, match="duplicate record id 'same': record 0 of .* already has it"):
    w.write(z, np.zeros((3, 8), np.float16), np.zeros(4, np.float16), {"id": "same"})
  w.abort()
  assert not os.listdir(tmp_path / "ds")  # nothing left behind


def test_divergence_names_the_records_of_bad_batches(tmp_path, monkeypatch):
  d = _write_dataset(str(tmp_path / "ds"), 8, per_shard=8, monkeypatch=monkeypatch)
  good = sources.RecordSource(d)

  class Poisoned:  # a source that hands out a NaN example without checking (not RecordSource)
    def __len__(self):
      return len(good)

    def __getitem__(self, i):
      ex = good[i]
      if i == 6:
        ex = records.Example(
          latent=np.full_like(ex.latent, np.nan), context=ex.context, pooled=ex.pooled, metadata=ex.metadata
        )
      return ex

  kw = dict(global_batch_size=4, seed=0, process_index=0, process_count=1, shuffle=False)
  bad, text = divergence.explain(Poisoned(), range(0, 2), **kw)
  assert bad and "the INPUTS diverged: 1 of the 8 records" in text and "id 'ex6' (step 2): NaN/Inf in latent" in text
  bad, text = divergence.explain(Poisoned(), [0], **kw)
  assert not bad and "the TRAINING diverged: the 4 input records of the batches of step 1" in text


# ----------------------------------------------------------------------------- trainer config

BAD_TRAIN_CONFIG = {  # key -> (value, message)
  "total_steps": (-5, "config.total_steps must be >= 1, got -5"),
  "global_batch_size": (0, "config.global_batch_size must be >= 1"),
  "grad_accum_steps": (0, "config.grad_accum_steps must be >= 1"),
  "log_every": (0, "config.log_every must be >= 1"),
  "checkpoint_every": (-1, "config.checkpoint_every must be >= 1"),
  "keep_checkpoints": (0, "config.keep_checkpoints must be >= 1"),
  "seed": (-1, r"config.seed must be in \[0, 4294967295\]"),
  "optimizer.learning_rate": ("1e-4", "config.optimizer.learning_rate must be a finite number, got '1e-4'"),
  "optimizer.warmup_steps": (-10, "config.optimizer.warmup_steps must be >= 0"),
  "optimizer.b2": (1.5, r"config.optimizer.b2 must be in \[0.0, 1.0\]"),
  "ema.every": (0, "config.ema.every must be >= 1"),
  "ema.decay": (float("nan"), "config.ema.decay must be a finite number"),
  "val.every": (-1, "config.val.every must be >= 0"),
  "data.worker_count": (-2, "config.data.worker_count must be >= -1"),
  "data.latent_size": (0, "config.data.latent_size must be >= 1"),
  "mesh.fsdp": (0, "config.mesh.fsdp must be a positive integer or -1"),
  "async_checkpointing": ("yes", "config.async_checkpointing must be True or False"),
  "data.shuffle": (1, "config.data.shuffle must be True or False"),
}


@pytest.mark.parametrize("key", sorted(BAD_TRAIN_CONFIG))
def test_unrunnable_config_values_are_startup_errors(key):
  from configs import tiny

  c = tiny.get_config().to_dict()
  check_runnable(c)  # the shipped config passes
  node = c
  *parents, leaf = key.split(".")
  for p in parents:
    node = node[p]
  value, match = BAD_TRAIN_CONFIG[key]
  node[leaf] = value
  with pytest.raises(ValueError, match=match):
    check_runnable(c)


def _train(workdir, *flags):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  return subprocess.run(
    [
      sys.executable,
      "-m",
      "sd3_jax.main",
      "--config",
      os.path.join(REPO, "configs/tiny.py"),
      "--workdir",
      str(workdir),
      *flags,
    ],
    capture_output=True,
    text=True,
    env=env,
    timeout=600,
    cwd=REPO,
  )


def test_trainer_clean_errors_have_one_line_and_no_second_traceback(tmp_path, monkeypatch):
  p = _train(tmp_path / "w1", "--config.total_steps=-1")
  assert p.returncode == 2, p.stderr[-2000:]
  assert "sd3-train: error: config.total_steps must be >= 1, got -1" in p.stderr
  assert not any(s in p.stderr for s in SECOND_TRACEBACKS), p.stderr[-2000:]
  assert not os.path.exists(tmp_path / "w1" / "checkpoints")  # refused before anything was made
  # A dataset of the tiny config's spec with a NaN in record 12: the second batch reads it, while
  # the async save of step 1 may still be running (without the shutdown this printed a stream of
  # "Event loop is closed" tracebacks after the error line).
  d = _write_dataset(
    str(tmp_path / "ds"),
    16,
    bad=(12, "latent", np.nan),
    shape=(8, 8, 4),
    ctx=(8, 32),
    pooled=32,
    per_shard=8,
    monkeypatch=monkeypatch,
  )
  p = _train(
    tmp_path / "w2",
    "--config.data.source=records",
    f"--config.data.path={d}",
    "--config.data.shuffle=False",
    "--config.val.every=0",
    "--config.total_steps=4",
    "--config.checkpoint_every=1",
  )
  assert p.returncode == 2, p.stderr[-3000:]
  err = [ln for ln in p.stderr.splitlines() if "sd3-train: error:" in ln]
  assert len(err) == 1 and "data-00001-of-00002.array_record: record 4 (global index 12)" in err[0], p.stderr[-3000:]
  assert "latent of record 'ex12' holds 1 NaN/Inf" in err[0]
  assert not any(s in p.stderr for s in SECOND_TRACEBACKS), p.stderr[-3000:]
  assert os.listdir(tmp_path / "w2" / "checkpoints") == ["1"]  # the save in flight was finished
