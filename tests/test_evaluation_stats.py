"""Evaluation statistics: the Frechet distance against closed forms, float64 feature statistics
in batches and across 2 processes equal to one shot."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import portpicker
import pytest
import scipy.linalg

from sd3_jax.evaluation import preprocess as pp, stats
from sd3_jax.models import clip_vision as cv

from text_encoder_helpers import TINY_CLIP

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---------------------------------------------------------------------------------------------
# Frechet distance and statistics


def test_frechet_distance_of_known_gaussians():
  rng = np.random.default_rng(0)
  mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
  a, b = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
  # Commuting (diagonal) covariances: ||mu1 - mu2||^2 + sum (sqrt(a) - sqrt(b))^2
  want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  assert stats.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-12)
  # Same covariance up to a rotation of both: the distance is rotation invariant.
  q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
  got = stats.frechet_distance(q @ mu1, q @ np.diag(a) @ q.T, q @ mu2, q @ np.diag(b) @ q.T)
  assert got == pytest.approx(want, rel=1e-10)
  # General covariances: the textbook formula with scipy's sqrtm (what clean-fid computes).
  s1 = np.cov(rng.standard_normal((40, 6)) @ rng.standard_normal((6, 6)), rowvar=False)
  s2 = np.cov(rng.standard_normal((40, 6)) @ rng.standard_normal((6, 6)), rowvar=False)
  ref = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2).real)
  assert stats.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-9)
  assert abs(stats.frechet_distance(mu1, s1, mu1, s1)) < 1e-9
  # Singular covariances (fewer samples than dimensions) stay real and non-negative.
  low = np.cov(rng.standard_normal((3, 6)), rowvar=False)
  assert stats.frechet_distance(mu1, low, mu2, s1) > 0
  with pytest.raises(ValueError, match="same feature extractor"):
    stats.frechet_distance(mu1, s1, mu2[:5], s2[:5, :5])


def test_statistics_in_batches_equal_one_shot(tmp_path):
  rng = np.random.default_rng(1)
  feats = (rng.standard_normal((203, 7)) * rng.uniform(0.01, 5, 7) + 1e3).astype(np.float32)  # a large mean
  s = stats.FeatureStats(7)
  for a, b in ((0, 1), (1, 8), (8, 8), (8, 150), (150, 203)):
    s.update(feats[a:b])
  x = feats.astype(np.float64)
  np.testing.assert_allclose(s.mean, x.mean(0), rtol=1e-14)
  np.testing.assert_allclose(s.cov, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-12)
  other = stats.FeatureStats(7).update(feats[:100]).merge(stats.FeatureStats(7).update(feats[100:]))
  np.testing.assert_allclose(other.cov, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-12)
  assert s.all_reduce().count == 203  # one process: itself
  stats.save_stats(str(tmp_path / "r.npz"), s, {"name": "test"})
  back = stats.load_stats(str(tmp_path / "r.npz"))
  np.testing.assert_array_equal(back["mu"], s.mean)
  assert back["count"] == 203 and back["feature_extractor"] == {"name": "test"}
  with pytest.raises(ValueError, match=r"features must be \[B, 7\]"):
    s.update(feats[:, :3])
  with pytest.raises(FileNotFoundError, match="sd3_jax.evaluation.reference_stats"):
    stats.load_stats(str(tmp_path / "missing.npz"))


MP_SCRIPT = """
import sys, numpy as np, jax
pid, port, out, cfg = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_num_cpu_devices", 2)
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid,
                           initialization_timeout=120)
import json
from sd3_jax import sharding
from sd3_jax.evaluation import clip_metrics, preprocess as pp, stats
from sd3_jax.models import clip_vision as cv
feats = np.random.default_rng(0).standard_normal((37, 5)) * 3 + 50
mine = feats[pid::2]
st = stats.FeatureStats(5).update(mine[:4]).update(mine[4:]).all_reduce()
total = stats.all_reduce_sum(np.array([mine.sum(), len(mine)]))
model = cv.CLIPModel(cv.CLIPConfig.from_dict(json.loads(cfg)))
params = cv.init_params(model, jax.random.key(0))
images = np.random.default_rng(1).integers(0, 256, (10, 40, 48, 3), dtype=np.uint8)
clip = clip_metrics.CLIPFeatures(model, params, mesh=sharding.make_mesh(1, -1, 1), batch_size=4)
assert clip.mesh.size == 4
rows = clip.image_features(images)
cs = stats.FeatureStats(24).update(rows.values).all_reduce()
np.savez(out, mean=st.mean, cov=st.cov, count=st.count, total=total, idx=rows.index, cmean=cs.mean,
         ccov=cs.cov, ccount=cs.count)
jax.distributed.shutdown()
"""


def test_statistics_across_two_processes_equal_one_shot(tmp_path):
  script = tmp_path / "mp.py"
  script.write_text(MP_SCRIPT)
  port = portpicker.pick_unused_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, XLA_FLAGS="")
  procs = [
    subprocess.Popen(
      [sys.executable, str(script), str(pid), str(port), str(tmp_path / f"out{pid}.npz"), json.dumps(TINY_CLIP)],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for pid in range(2)
  ]
  for p in procs:
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out
  outs = [np.load(tmp_path / f"out{pid}.npz") for pid in range(2)]
  feats = np.random.default_rng(0).standard_normal((37, 5)) * 3 + 50
  for o in outs:  # every process holds the same merged statistics
    assert int(o["count"]) == 37
    np.testing.assert_allclose(o["mean"], feats.mean(0), rtol=1e-13)
    np.testing.assert_allclose(o["cov"], np.cov(feats, rowvar=False), rtol=1e-10)
    np.testing.assert_allclose(o["total"], [feats.sum(), 37], rtol=1e-13)
  np.testing.assert_array_equal(outs[0]["cmean"], outs[1]["cmean"])
  # The sharded CLIP features: each process computed disjoint rows, together all 10 ...
  idx = np.concatenate([o["idx"] for o in outs])
  assert sorted(idx.tolist()) == list(range(10)) and len(outs[0]["idx"]) and len(outs[1]["idx"])
  # ... and their statistics equal one unsharded pass.
  model = cv.CLIPModel(cv.CLIPConfig.from_dict(TINY_CLIP))
  params = cv.init_params(model, jax.random.key(0))
  images = np.random.default_rng(1).integers(0, 256, (10, 40, 48, 3), dtype=np.uint8)
  pixels = pp.preprocess(images, size=32, crop_size=32, crop_rounding="round")
  ref = np.asarray(model.apply({"params": params}, pixels, method=model.encode_image), np.float64)
  assert int(outs[0]["ccount"]) == 10
  np.testing.assert_allclose(outs[0]["cmean"], ref.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(outs[0]["ccov"], np.cov(ref, rowvar=False), rtol=1e-4, atol=1e-6)
