"""A workdir given as a gs:// URL, through a stand-in object store (tests/gcs_emulator.py): an
fsspec file system registered for gs:// (what etils.epath and TensorBoard use) that keeps objects
under a local directory and, like GCS, refuses to append, and an HTTP server speaking the GCS API
over the same directory for tensorstore (orbax's array writes). A whole training run, resume and
export included, goes through both."""

import json
import os

import numpy as np
import pytest

import gcs_emulator
from sd3_jax.storage import checkpoint
from sd3_jax.inference import generation
from sd3_jax.training import writers
from sd3_jax.convert import runs


@pytest.fixture
def gcs(tmp_path, monkeypatch):
  root = str(tmp_path / "store")
  with gcs_emulator.fake_gcs(root, monkeypatch):
    yield lambda key: os.path.join(root, key)


def test_the_stand_in_is_not_the_local_file_system(gcs):
  from etils import epath

  p = epath.Path("gs://bucket/x.txt")
  p.write_text("hi")
  assert open(gcs("bucket/x.txt")).read() == "hi" and not os.path.exists("gs:")
  with pytest.raises(OSError, match="cannot append"):
    with p.open("a") as f:
      f.write("more")


def test_metrics_jsonl_and_tensorboard_on_an_object_store(gcs):
  w = writers.MetricWriter("gs://bucket/run", is_primary=True)
  assert w.tensorboard_enabled  # the test extra installs tensorboard
  for step in (1, 2, 3):
    w.write_scalars(step, {"loss": 1.0 / step})
  # Complete after every write, without appending.
  rows = [json.loads(line) for line in open(gcs("bucket/run/metrics.jsonl"))]
  assert [r["step"] for r in rows] == [1, 2, 3]
  w.close()
  # A run resumed from step 2 drops step 3 and continues the same object.
  w = writers.MetricWriter("gs://bucket/run", is_primary=True, resume_step=2)
  w.write_scalars(3, {"loss": 0.25})
  w.close()
  rows = [json.loads(line) for line in open(gcs("bucket/run/metrics.jsonl"))]
  assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 0.5), (3, 0.25)]
  tb = gcs("bucket/run/tensorboard")
  files = os.listdir(tb)
  assert files and all(f.startswith("events.out.tfevents") for f in files)
  from tensorboard.backend.event_processing import event_accumulator

  acc = event_accumulator.EventAccumulator(tb)  # the resumed run's step 3 replaces the old one
  acc.Reload()
  assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 1.0), (2, 0.5), (3, 0.25)]


def test_sample_grid_on_an_object_store(gcs):
  from PIL import Image

  import jax
  from configs import tiny
  from sd3_jax.models import mmdit

  c = tiny.get_config()
  c.model.in_channels = c.model.out_channels = 3  # pixel space: the model's output is the image
  model = mmdit.MMDiT(mmdit.config_from_preset(**c.model))
  params = mmdit.init_params(model, jax.random.key(0))

  def conditioner(prompts):
    return np.zeros((len(prompts), 8, 32), np.float32), np.zeros((len(prompts), 32), np.float32)

  grid = generation.write_sample_grid(
    model,
    params,
    generation.encode_once(conditioner, ["a", "b"]),
    ["a", "b"],
    "gs://bucket/run/samples/step_00000001.png",
    latent_shape=(8, 8, 3),
    num_steps=2,
    cfg_scale=1.0,
  )
  img = np.asarray(Image.open(gcs("bucket/run/samples/step_00000001.png")))
  np.testing.assert_array_equal(img, grid)


def test_checkpoint_listing_and_run_export_paths_on_an_object_store(gcs):
  for step, committed in ((4, True), (8, True), (12, False)):
    d = gcs(f"bucket/run/checkpoints/{step}")
    os.makedirs(d)
    if committed:
      open(os.path.join(d, checkpoint.COMMIT_FILE), "w").close()
  assert checkpoint.committed_steps("gs://bucket/run/checkpoints") == [4, 8]
  assert runs.run_location("gs://bucket/run") == ("gs://bucket/run", None)
  assert runs.run_location("gs://bucket/run/checkpoints/8") == ("gs://bucket/run", 8)
  with pytest.raises(FileNotFoundError, match="no committed checkpoint for step 12"):
    checkpoint.load_workdir("gs://bucket/run", 12)


def _tiny(total_steps):
  from configs import tiny

  c = tiny.get_config()
  c.total_steps, c.log_every, c.checkpoint_every, c.keep_checkpoints = total_steps, 1, 2, 2
  c.val.every, c.val.num_examples, c.val.batch_size = 2, 8, 8
  c.mesh.fsdp, c.mesh.data = 4, 2
  return c


def _losses(rows):
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_training_on_a_gs_workdir_resumes_exactly_and_exports(gcs, tmp_path):
  """Everything a run writes lands in the object store (no local 'gs:' directory), a rerun of
  the same command resumes from the stored checkpoint with the losses of an uninterrupted local
  run, and the run exports to diffusers straight from the URL."""
  from sd3_jax.training import train
  from sd3_jax.convert import cli as convert_cli

  local = str(tmp_path / "local")
  train.train_and_evaluate(_tiny(6), local)
  want = _losses(json.loads(line) for line in open(os.path.join(local, "metrics.jsonl")))

  train.train_and_evaluate(_tiny(4), "gs://bucket/run")  # "preempted" after step 4
  assert checkpoint.committed_steps("gs://bucket/run/checkpoints") == [2, 4]
  # The arrays went through tensorstore's GCS driver, i.e. to the HTTP side of the store.
  assert any(f for _, _, f in os.walk(gcs("bucket/run/checkpoints/4/state")))
  train.train_and_evaluate(_tiny(6), "gs://bucket/run")
  assert not os.path.exists("gs:") and not os.path.exists(os.path.join(os.getcwd(), "gs:"))
  rows = [json.loads(line) for line in open(gcs("bucket/run/metrics.jsonl"))]
  got = _losses(rows)
  assert sorted(got) == list(range(1, 7)) and got == want  # exact resume
  val = {r["step"]: r["val/loss"] for r in rows if "val/loss" in r}
  want_val = {
    r["step"]: r["val/loss"] for r in map(json.loads, open(os.path.join(local, "metrics.jsonl"))) if "val/loss" in r
  }
  assert sorted(val) == [2, 4, 6] and val == want_val
  assert checkpoint.committed_steps("gs://bucket/run/checkpoints") == [4, 6]  # keep 2
  assert os.listdir(gcs("bucket/run/tensorboard"))
  assert os.path.isfile(gcs("bucket/run/checkpoints/6/config/metadata")) or os.listdir(
    gcs("bucket/run/checkpoints/6/config")
  )

  out = str(tmp_path / "export")
  convert_cli.main(["--src", "gs://bucket/run", "--dst", out, "--to", "jax"])
  model, params, _, step = checkpoint.load_workdir("gs://bucket/run", use_ema=True)
  assert step == 6
  from sd3_jax.storage import pretrained
  from sd3_jax.storage import trees

  _, exported = pretrained.load_pretrained(out)
  flat_run = trees.flatten(params)
  flat_out = trees.flatten(exported)
  assert sorted(flat_run) == sorted(flat_out)
  for k in flat_run:
    np.testing.assert_array_equal(np.asarray(flat_out[k]), np.asarray(flat_run[k]), err_msg=k)


def test_a_converted_checkpoint_loads_from_the_object_store(gcs, tmp_path):
  """config.init_from=gs://... reads a converted checkpoint (metadata through epath, arrays
  through tensorstore's GCS driver) with the same checks and values as from local disk."""
  import shutil

  import jax
  from sd3_jax.storage import pretrained, trees
  from sd3_jax.models import mmdit

  cfg = mmdit.config_from_preset(
    "d2",
    hidden_size=64,
    num_heads=4,
    in_channels=4,
    out_channels=4,
    pooled_dim=32,
    context_dim=32,
    pos_embed_max_size=8,
  )
  params = mmdit.init_params(mmdit.MMDiT(cfg), jax.random.key(3))
  pretrained.save_pretrained(str(tmp_path / "ckpt"), params, cfg)
  shutil.copytree(tmp_path / "ckpt", gcs("bucket/models/ckpt"))
  assert pretrained.is_checkpoint("gs://bucket/models/ckpt")
  assert pretrained.read_config("gs://bucket/models/ckpt") == cfg
  _, got = pretrained.load_pretrained("gs://bucket/models/ckpt")
  _, want = pretrained.load_pretrained(str(tmp_path / "ckpt"))
  flat_got, flat_want = trees.flatten(got), trees.flatten(want)
  assert sorted(flat_got) == sorted(flat_want)
  for k in flat_want:
    np.testing.assert_array_equal(np.asarray(flat_got[k]), np.asarray(flat_want[k]), err_msg=k)
  with pytest.raises(FileNotFoundError, match="no such checkpoint directory: gs://bucket/models/none"):
    pretrained.load_pretrained("gs://bucket/models/none")
