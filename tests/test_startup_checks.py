"""Start-up checks: config vs dataset_info.json, validation never on training records, batching
vs the mesh, the mesh fallback log line, and no implicit transfers in the steady-state loop."""

import logging

import jax
import numpy as np
import pytest

from configs import tiny
from sd3_jax.data import records, sources
from sd3_jax import sharding
from sd3_jax.training import startup_checks, state as state_lib, step as step_lib, train, train_data


def _config(**overrides):
  c = tiny.get_config()
  for k, v in overrides.items():
    node = c
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return c


def _write_records(directory, n, latent_hw, *, channels=4, context=(8, 32), pooled=32):
  src = sources.SyntheticSource(n, (*latent_hw, channels), context[0], context[1], pooled, seed=3)
  with records.RecordWriter(str(directory), records_per_shard=16) as w:
    for i in range(n):
      ex = src[i]
      w.write(ex.latent, ex.context, ex.pooled, {"id": f"r{i}"})
  return str(directory)


@pytest.fixture
def no_compile(monkeypatch):
  """Anything that would compile (state init, the train step) fails the test."""

  def boom(*a, **k):
    raise AssertionError("compiled before the start-up checks failed")

  monkeypatch.setattr(state_lib, "create_sharded_state", boom)
  monkeypatch.setattr(step_lib, "make_train_step", boom)


def test_record_shapes_that_differ_from_the_config_fail_before_compiling(tmp_path, no_compile):
  # Records of 6x6 latents under a config of 8x8 used to train to the end (the positional
  # table was cropped); now the run stops at start-up with the key, both values and the fix.
  data = _write_records(tmp_path / "train", 16, (6, 6))
  c = _config(**{"data.source": "records", "data.path": data, "val.every": 0})
  with pytest.raises(ValueError) as e:
    train.train_and_evaluate(c, str(tmp_path / "w"))
  msg = str(e.value)
  assert "config.data.latent_size gives latents 8x8 but the records hold 6x6" in msg
  assert "--config.data.latent_size=6" in msg and "dataset_info.json (train)" in msg


def test_validation_records_are_checked_too(tmp_path, no_compile):
  train_dir = _write_records(tmp_path / "train", 16, (8, 8))
  val_dir = _write_records(tmp_path / "val", 8, (8, 8), context=(10, 32), pooled=16)
  c = _config(**{"data.source": "records", "data.path": train_dir, "data.val_path": val_dir})
  with pytest.raises(ValueError) as e:
    train.train_and_evaluate(c, str(tmp_path / "w"))
  msg = str(e.value)
  assert "(val)" in msg
  assert "config.data.context_len=8 but the records hold 10 text tokens" in msg
  assert "config.data.pooled_dim=32 but the records' pooled vectors have 16" in msg


def test_model_and_data_widths_are_checked(tmp_path, no_compile):
  c = _config(**{"data.latent_channels": 16, "data.latent_size": 32, "val.every": 0})
  with pytest.raises(ValueError) as e:
    train.train_and_evaluate(c, str(tmp_path / "w"))
  msg = str(e.value)
  assert "config.data.latent_channels=16 but the model's in_channels is 4" in msg
  assert "needs a 16x16 positional grid but config.model.pos_embed_max_size is 8" in msg


def test_validation_never_falls_back_to_training_records(tmp_path, no_compile):
  data = _write_records(tmp_path / "train", 24, (8, 8))
  c = _config(**{"data.source": "records", "data.path": data})
  with pytest.raises(ValueError, match="validation needs records of its own.*val_holdout"):
    train.train_and_evaluate(c, str(tmp_path / "w"))
  both = _config(**{"data.source": "records", "data.path": data, "data.val_path": data, "data.val_holdout": 4})
  with pytest.raises(ValueError, match="not both"):
    train_data.make_source(both, "val")


def test_held_out_slice_is_excluded_from_training(tmp_path):
  data = _write_records(tmp_path / "train", 24, (8, 8))
  c = _config(**{"data.source": "records", "data.path": data, "data.val_holdout": 8})
  tr, va = train_data.make_source(c, "train"), train_data.make_source(c, "val")
  assert (len(tr), len(va)) == (16, 8)
  train_ids = {tr[i].metadata["id"] for i in range(len(tr))}
  val_ids = {va[i].metadata["id"] for i in range(len(va))}
  assert not train_ids & val_ids and len(train_ids | val_ids) == 24
  with pytest.raises(ValueError, match="leaves no training records"):
    train_data.make_source(_config(**{"data.source": "records", "data.path": data, "data.val_holdout": 24}))


@pytest.mark.parametrize(
  "kwargs,message",
  [
    (
      dict(global_batch_size=12, grad_accum_steps=1, batch_shards=8, process_count=1),
      "global_batch_size=12 is not divisible by the mesh's batch shards data\\*fsdp=8",
    ),
    (
      dict(global_batch_size=16, grad_accum_steps=4, batch_shards=8, process_count=1),
      "the microbatch global_batch_size/grad_accum_steps=4 is not divisible by the batch shards",
    ),
    (
      dict(global_batch_size=16, grad_accum_steps=3, batch_shards=1, process_count=1),
      "not divisible by grad_accum_steps=3",
    ),
    (
      dict(global_batch_size=6, grad_accum_steps=1, batch_shards=2, process_count=4),
      "not divisible by the process count 4",
    ),
  ],
)
def test_batching_is_checked_together(kwargs, message):
  with pytest.raises(ValueError, match=message):
    startup_checks.check_batching(**kwargs)


def test_good_batching_returns_the_microbatch():
  assert startup_checks.check_batching(global_batch_size=64, grad_accum_steps=4, batch_shards=8, process_count=2) == 16


def test_mesh_fallback_to_list_order_is_logged(monkeypatch, caplog):
  def refuse(*a, **k):
    raise NotImplementedError("no assignment for this topology")

  monkeypatch.setattr(sharding.mesh_utils, "create_device_mesh", refuse)
  with caplog.at_level(logging.WARNING, logger="sd3_jax.sharding"):
    mesh = sharding.make_mesh(2, 4, 1)
  assert mesh.devices.ravel().tolist() == jax.devices()
  assert "cannot follow the physical topology" in caplog.text and "device list order" in caplog.text


_STEADY = {"total_steps": 6, "log_every": 3, "checkpoint_every": 6, "val.every": 0, "transfer_guard": "disallow"}


def test_steady_state_loop_makes_no_implicit_transfers(tmp_path):
  """Steps other than the first, logging, checkpoint, validation and sample steps run under
  jax.transfer_guard('disallow'): any implicit host<->device transfer would raise."""
  last = train.train_and_evaluate(_config(**_STEADY), str(tmp_path / "w"))
  assert last["step"] == 6 and np.isfinite(last["loss"])


def test_transfer_guard_catches_an_implicit_transfer(tmp_path, monkeypatch):
  """The control: feed the step host numpy batches (an implicit transfer per step) -> refused."""
  monkeypatch.setattr(sharding, "make_global_batch", lambda local, mesh: dict(local))
  with pytest.raises(Exception, match="[Dd]isallowed host-to-device transfer"):
    train.train_and_evaluate(_config(**_STEADY), str(tmp_path / "w"))


def test_record_paths_given_as_urls_name_the_mount_fix(tmp_path, no_compile):
  c = _config(**{"data.source": "records", "data.path": "gs://bucket/latents", "data.val_path": "/local/val"})
  with pytest.raises(ValueError) as e:
    train.train_and_evaluate(c, str(tmp_path / "w"))
  msg = str(e.value)
  assert "config.data.path='gs://bucket/latents' is a URL" in msg and "gcsfuse" in msg
  assert "val_path" not in msg
  assert not (tmp_path / "w").exists()  # refused before anything was written


def test_gs_workdir_without_the_gcs_packages_names_the_extra(monkeypatch, tmp_path, no_compile):
  assert startup_checks._importable("json") and not startup_checks._importable("google.no_such_module")
  monkeypatch.setattr(startup_checks, "_importable", lambda module: module != "google.cloud.storage")
  with pytest.raises(ValueError, match=r"google-cloud-storage is not installed \(pip install 'sd3_jax\[gcs\]'\)"):
    train.train_and_evaluate(_config(), "gs://bucket/run")
  # Local workdirs need neither package.
  startup_checks.check_storage(workdir=str(tmp_path / "w"), record_paths={"data.path": str(tmp_path)})
