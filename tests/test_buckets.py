"""Mixed aspect ratios in one run: one bucket per global batch, drawn in proportion to size from
the seed, exact resume of every bucket's position, one compiled step per bucket, validation
per bucket and overall, FLOPs of the buckets that ran, and the AOT check of every bucket."""

import json
import os
import subprocess
import sys

import pytest

from configs import tiny
from sd3_jax.data import buckets, records, sources
from sd3_jax.training import metrics, step as step_lib, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = ((8, 8), (4, 16))  # equal area (64 latent pixels), patch 2, grid 8


def test_bucket_draws_are_deterministic_and_proportional():
  sizes = [30, 10]
  draws = [buckets.bucket_of_step(sizes, 5, k) for k in range(4000)]
  assert draws == [buckets.bucket_of_step(sizes, 5, k) for k in range(4000)]
  assert draws != [buckets.bucket_of_step(sizes, 6, k) for k in range(4000)]
  share = draws.count(0) / len(draws)
  assert abs(share - 0.75) < 0.03, share  # binomial std at n=4000 is 0.007
  with pytest.raises(ValueError, match="positive"):
    buckets.bucket_of_step([3, 0], 0, 0)


def test_step_timer_uses_the_flops_that_ran():
  t = iter([0.0, 2.0])
  timer = metrics.StepTimer(flops_per_step=1e12, images_per_step=8, num_devices=2, clock=lambda: next(t))
  timer.tick(0)
  r = timer.tick(2, flops=3e12)  # e.g. one small and one large bucket step
  assert r["tflops_per_sec"] == pytest.approx(1.5) and r["tflops_per_sec_per_device"] == pytest.approx(0.75)


def test_step_timer_leaves_out_a_compiling_step():
  t = iter([0.0, 1.0, 101.0, 102.0])  # the step in between compiles a new bucket shape: 100 s
  timer = metrics.StepTimer(flops_per_step=1e12, images_per_step=8, num_devices=1, clock=lambda: next(t))
  timer.tick(0)
  with timer.paused(steps=1):
    pass
  r = timer.tick(3, flops=2e12)  # two timed steps in 102 - 100 = 2 s
  assert r["step_time"] == pytest.approx(1.0) and r["tflops_per_sec"] == pytest.approx(1.0)


def _write_buckets(root, counts):
  for (h, w), n in zip(SHAPES, counts):
    src = sources.SyntheticSource(n, (h, w, 4), 8, 32, 32, seed=h)
    with records.RecordWriter(os.path.join(root, buckets.bucket_dir((h, w))), records_per_shard=16) as wr:
      for i in range(n):
        ex = src[i]
        wr.write(ex.latent, ex.context, ex.pooled, {"id": f"{h}x{w}-{i}"})


def _config(data, total_steps):
  c = tiny.get_config()
  c.total_steps, c.log_every, c.checkpoint_every = total_steps, 1, 3
  c.data.update(dict(source="records", path=data, buckets=SHAPES, bucket_pixels_per_latent=1, val_holdout=4))
  c.val.update(dict(every=6, num_examples=4, batch_size=8))
  return c


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_mixed_aspect_run_resumes_exactly_with_one_compile_per_bucket(tmp_path, monkeypatch):
  data = str(tmp_path / "data")
  _write_buckets(data, (36, 20))  # 32 and 16 training records after the held-out 4 of each
  steps = []
  real = step_lib.make_train_step

  def spy(*a, **k):
    fn = real(*a, **k)
    steps.append(fn)
    return fn

  monkeypatch.setattr(step_lib, "make_train_step", spy)
  full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
  train.train_and_evaluate(_config(data, 6), full)
  assert steps[-1]._cache_size() == 2  # one executable per bucket shape, each compiled once
  train.train_and_evaluate(_config(data, 3), cut)
  train.train_and_evaluate(_config(data, 6), cut)  # resumes from step 3
  a = {r["step"]: r["loss"] for r in _rows(full) if "loss" in r}
  b = {r["step"]: r["loss"] for r in _rows(cut) if "loss" in r}
  assert sorted(a) == list(range(1, 7)) and a == b
  # The buckets the steps drew: proportional sampling from the seed, counted per logged step.
  want = [buckets.bucket_of_step([32, 16], 0, k) for k in range(6)]
  got = [[r[f"bucket_steps/{n}"] for n in ("8x8", "4x16")].index(1) for r in _rows(full) if "loss" in r]
  assert got == want and len(set(want)) == 2, want
  val = [r for r in _rows(full) if "val/loss" in r][-1]
  assert {"val/8x8/loss", "val/4x16/loss"} <= set(val)
  # Overall = example-weighted mean of the buckets (4 examples each here).
  assert val["val/loss"] == pytest.approx((val["val/8x8/loss"] + val["val/4x16/loss"]) / 2, rel=1e-6)


def test_aot_compile_checks_every_bucket():
  cmd = [
    sys.executable,
    "-m",
    "tools.aot_compile",
    "--config",
    os.path.join(REPO, "configs/tiny.py"),
    "--json",
    "--topology=v5p:2x2x1",
    f"--config.data.buckets={SHAPES}",
  ]
  p = subprocess.run(
    cmd, cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=600
  )
  assert p.returncode == 0, p.stderr[-4000:]
  r = json.loads(p.stdout.strip().splitlines()[-1])
  assert sorted(r["buckets"]) == ["4x16", "8x8"] and r["fits"] is True
  for name, b in r["buckets"].items():
    assert b["peak_bytes_per_device"] > 0 and b["model_flops_per_step"] > 0, name
  assert r["peak_bytes_per_device"] == max(b["peak_bytes_per_device"] for b in r["buckets"].values())
