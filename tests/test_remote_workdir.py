"""A workdir given as a gs:// URL, through a stand-in object store: an fsspec file system
registered for gs:// (what etils.epath and TensorBoard use) that keeps objects under a local
directory and, like GCS, refuses to append."""
import json
import os
import sys

import fsspec
import numpy as np
import pytest
from etils.epath import backend as epath_backend
from fsspec.implementations.local import LocalFileSystem

from sd3_jax import checkpoint, generation, metrics
from sd3_jax.convert import runs

_ROOT = {"dir": None}


class FakeGCS(LocalFileSystem):
  """gs://bucket/key -> <root>/bucket/key; no append mode, as on an object store."""
  protocol = ("gs", "gcs")
  cachable = False

  def __init__(self, *args, finalize_on_close=None, **kwargs):
    super().__init__(auto_mkdir=True)

  @classmethod
  def _strip_protocol(cls, path):
    path = fsspec.utils.stringify_path(path)
    for prefix in ("gs://", "gcs://"):
      if path.startswith(prefix):
        return os.path.join(_ROOT["dir"], path[len(prefix):]).rstrip("/")
    return super()._strip_protocol(path)

  def _open(self, path, mode="rb", **kwargs):
    if "a" in mode:
      raise OSError(f"object stores cannot append ({path}, mode {mode!r})")
    return super()._open(path, mode, **kwargs)


@pytest.fixture
def gcs(tmp_path, monkeypatch):
  _ROOT["dir"] = str(tmp_path / "store")
  os.makedirs(_ROOT["dir"])
  for name in ("gs", "gcs"):
    monkeypatch.setitem(sys.modules["fsspec.registry"]._registry, name, FakeGCS)  # noqa: SLF001
  epath_backend.fsspec_backend._get_filesystem.cache_clear()  # noqa: SLF001
  yield lambda key: os.path.join(_ROOT["dir"], key)
  epath_backend.fsspec_backend._get_filesystem.cache_clear()  # noqa: SLF001


def test_the_stand_in_is_not_the_local_file_system(gcs):
  from etils import epath
  p = epath.Path("gs://bucket/x.txt")
  p.write_text("hi")
  assert open(gcs("bucket/x.txt")).read() == "hi" and not os.path.exists("gs:")
  with pytest.raises(OSError, match="cannot append"):
    with p.open("a") as f:
      f.write("more")


def test_metrics_jsonl_and_tensorboard_on_an_object_store(gcs):
  w = metrics.MetricWriter("gs://bucket/run", is_primary=True)
  assert w.tensorboard_enabled  # the test extra installs tensorboard
  for step in (1, 2, 3):
    w.write_scalars(step, {"loss": 1.0 / step})
  # Complete after every write, without appending.
  rows = [json.loads(line) for line in open(gcs("bucket/run/metrics.jsonl"))]
  assert [r["step"] for r in rows] == [1, 2, 3]
  w.close()
  # A run resumed from step 2 drops step 3 and continues the same object.
  w = metrics.MetricWriter("gs://bucket/run", is_primary=True, resume_step=2)
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
      model, params, generation.encode_once(conditioner, ["a", "b"]), ["a", "b"],
      "gs://bucket/run/samples/step_00000001.png", latent_shape=(8, 8, 3), num_steps=2,
      cfg_scale=1.0)
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
