"""metrics.py: peak FLOP/s table, clu metrics, metrics.jsonl / TensorBoard writers, timer."""

import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sd3_jax.training import metrics as Mt
from sd3_jax.training import writers


def test_peak_flops_table():
  # How device_kind strings (as jax reports them on each chip) map to the dense bf16 peaks of
  # the vendors' spec sheets: Google Cloud's TPU v4 / v5e / v5p / v6e system-architecture pages
  # (275 / 197 / 459 / 918 TFLOP/s) and NVIDIA's H100 SXM / PCIe, H200 and A100 datasheets
  # (989 / 756 / 989 / 312, the "with sparsity" figures halved).
  cases = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5": 459e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12,
  }
  for kind, peak in cases.items():
    assert Mt.peak_flops_per_device(kind) == peak, kind
  for kind in ("cpu", "TPU v4 lite", "TPU v3", "NVIDIA GeForce RTX 4090", ""):
    assert Mt.peak_flops_per_device(kind) is None, kind
  assert Mt.peak_flops_per_device(jax.devices()[0].device_kind) is None  # CPU here
  assert Mt.peak_flops_per_device("cpu", override=803e12) == 803e12
  with pytest.raises(ValueError):
    Mt.peak_flops_per_device("TPU v4", override=0)


def test_train_metrics_inside_jit_merge_and_compute():
  @jax.jit
  def step(loss, t, gn, lr):
    return Mt.TrainMetrics.single_from_model_output(per_example_loss=loss, t=t, grad_norm=gn, learning_rate=lr)

  l1, t1 = np.array([1.0, 2.0, 3.0, 4.0], np.float32), np.array([0.0, 0.05, 0.55, 1.0], np.float32)
  l2, t2 = np.array([5.0, 7.0, 9.0, 11.0], np.float32), np.array([0.09, 0.5, 0.99, 0.31], np.float32)
  m = step(l1, t1, 2.0, 1e-4).merge(step(l2, t2, 4.0, 2e-4))
  out = m.compute()
  assert all(isinstance(v, float) for v in out.values())
  assert out["loss"] == pytest.approx(np.mean(np.r_[l1, l2]))
  assert out["grad_norm"] == pytest.approx(3.0)
  assert out["learning_rate"] == pytest.approx(2e-4)  # last value
  # buckets: [0,.1): 1,2,5  [.3,.4): 11  [.5,.6): 3,7  [.9,1]: 4 (t=1), 9; others empty -> omitted
  assert {k: v for k, v in out.items() if k.startswith("loss_t/")} == pytest.approx(
    {"loss_t/0.0-0.1": 8 / 3, "loss_t/0.3-0.4": 11.0, "loss_t/0.5-0.6": 5.0, "loss_t/0.9-1.0": 6.5}
  )
  assert Mt.t_bucket_names()[0] == "loss_t/0.0-0.1" and len(Mt.t_bucket_names()) == 10
  # empty() is the identity of merge
  again = Mt.TrainMetrics.empty().merge(step(l1, t1, 2.0, 1e-4)).compute()
  assert again["loss"] == pytest.approx(2.5) and again["loss_t/0.0-0.1"] == pytest.approx(1.5)
  with pytest.raises(ValueError, match="must both be"):
    Mt.TrainMetrics.single_from_model_output(per_example_loss=l1, t=t1[:3], grad_norm=1.0, learning_rate=1.0)


def _read_jsonl(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]  # every line must be valid JSON


def test_metric_writer_jsonl_resume_and_non_primary(tmp_path, monkeypatch):
  # JSONL-only path, whatever is installed: block the package and any submodule an earlier test
  # imported (a cached "tensorboard.compat.proto" would otherwise import without its parent).
  for name in [m for m in sys.modules if m.startswith("tensorboard.")] + ["tensorboard"]:
    monkeypatch.setitem(sys.modules, name, None)
  work = str(tmp_path / "run")
  with writers.MetricWriter(work, is_primary=True) as w:
    assert not w.tensorboard_enabled
    for s in (1, 2, 3):
      w.write_scalars(
        s, {"loss": np.float32(0.5 * s), "mfu": None, "bad": float("nan"), "inf": jnp.array(np.inf), "n": 7}
      )
  rows = _read_jsonl(os.path.join(work, "metrics.jsonl"))
  assert [r["step"] for r in rows] == [1, 2, 3]
  assert rows[1]["loss"] == 1.0 and rows[1]["n"] == 7
  assert rows[0]["mfu"] is None and rows[0]["bad"] is None and rows[0]["inf"] is None
  assert isinstance(rows[0]["wall_time"], float)

  # A torn last line from a killed process is dropped; resume_step drops steps logged after it.
  with open(os.path.join(work, "metrics.jsonl"), "a", encoding="utf-8") as f:
    f.write('{"step": 4, "lo')
  with writers.MetricWriter(work, is_primary=True, resume_step=2) as w:
    w.write_scalars(3, {"loss": 30.0})
  rows = _read_jsonl(os.path.join(work, "metrics.jsonl"))
  assert [(r["step"], r["loss"]) for r in rows] == [(1, 0.5), (2, 1.0), (3, 30.0)]

  # Plain append on resume.
  with writers.MetricWriter(work, is_primary=True) as w:
    w.write_scalars(4, {"loss": 40.0})
    with pytest.raises(ValueError, match="reserved"):
      w.write_scalars(5, {"step": 1})
    with pytest.raises(ValueError, match="scalars"):
      w.write_scalars(5, {"v": np.ones(3)})
  assert [r["step"] for r in _read_jsonl(os.path.join(work, "metrics.jsonl"))] == [1, 2, 3, 4]

  other = str(tmp_path / "other")
  with writers.MetricWriter(other, is_primary=False) as w:
    w.write_scalars(1, {"loss": 1.0})
  assert not os.path.exists(other)


def test_metric_writer_tensorboard_events(tmp_path):
  pytest.importorskip("tensorboard")  # the optional `tensorboard` extra
  from tensorboard.backend.event_processing import event_accumulator, event_file_loader
  from tensorboard.compat.proto import event_pb2

  work = str(tmp_path)
  with writers.MetricWriter(work, is_primary=True) as w:
    assert w.tensorboard_enabled
    for s in (1, 2, 3):
      w.write_scalars(s, {"loss": 1.0 / s, "mfu": None, "note": "x"})
  assert "tensorflow" not in sys.modules
  files = os.listdir(os.path.join(work, "tensorboard"))
  assert len(files) == 1
  seen = {}
  for raw in event_file_loader.RawEventFileLoader(os.path.join(work, "tensorboard", files[0])).Load():
    ev = event_pb2.Event.FromString(raw)
    for v in ev.summary.value:
      seen[(v.tag, ev.step)] = v.simple_value
  assert seen == pytest.approx({("loss", 1): 1.0, ("loss", 2): 0.5, ("loss", 3): 1 / 3})

  # Resuming from step 2: TensorBoard drops the old run's step 3 and shows the new one.
  with writers.MetricWriter(work, is_primary=True, resume_step=2) as w:
    w.write_scalars(3, {"loss": 9.0})
  acc = event_accumulator.EventAccumulator(os.path.join(work, "tensorboard"))
  acc.Reload()
  assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3]
  assert [e.value for e in acc.Scalars("loss")] == pytest.approx([1.0, 0.5, 9.0])


def test_a_resumed_writer_file_sorts_after_the_old_run_s(tmp_path):
  # TensorBoard reads event files in name order (creation second, host, pid, counter): a resume
  # within the same second (one process, counter 9 -> 10) must still come after the old files.
  pytest.importorskip("tensorboard")
  tb = tmp_path / "tensorboard"
  tb.mkdir()
  old = tb / f"events.out.tfevents.{int(time.time()) + 1}.host.1.9"
  old.write_bytes(b"")
  with writers.MetricWriter(str(tmp_path), is_primary=True, resume_step=2) as w:
    w.write_scalars(3, {"loss": 1.0})
  names = sorted(os.listdir(tb))
  assert len(names) == 2 and names[0] == old.name


class _FakeClock:
  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


def test_step_timer_throughput_and_mfu():
  clock = _FakeClock()
  timer = Mt.StepTimer(flops_per_step=8e12, images_per_step=64, num_devices=4, peak_flops_per_device=1e12, clock=clock)
  assert timer.tick(10) == {}  # first tick starts the clock (compilation excluded)
  clock.now += 25.0
  with timer.paused():  # e.g. a checkpoint save
    clock.now += 5.0
  out = timer.tick(20)  # 10 steps in 25 s of training time
  assert out == pytest.approx(
    {"step_time": 2.5, "images_per_sec": 25.6, "tflops_per_sec": 3.2, "tflops_per_sec_per_device": 0.8, "mfu": 0.8}
  )
  clock.now += 4.0
  no_peak = Mt.StepTimer(flops_per_step=1.0, images_per_step=1, num_devices=1, clock=clock)
  no_peak.tick(0)
  clock.now += 1.0
  assert no_peak.tick(1)["mfu"] is None


def test_format_progress():
  line = Mt.format_progress(
    1200, 5000, {"loss": 0.43121, "learning_rate": 1e-4, "mfu": 0.4132, "step_time": 0.5, "grad_norm": None}
  )
  assert line == ("step 1200/5000 (24.0%) | loss 0.4312 | lr 1.00e-04 | step 0.5s | MFU 41.3% | ETA 31m40s")
  assert Mt.format_progress(5, 10, {}) == "step 5/10 (50.0%)"
  assert "nan" in Mt.format_progress(1, 10, {"loss": math.nan})


def test_format_progress_shows_flops_in_a_unit_that_shows_the_figure_and_validation_loss():
  """A 2-core CPU does tens of GFLOP/s: "TFLOP/s/dev 0.0" said nothing there."""
  assert "| TFLOP/s/dev 412.3 |" in Mt.format_progress(1, 10, {"tflops_per_sec_per_device": 412.3, "mfu": 0.4})
  assert Mt.format_progress(1, 10, {"tflops_per_sec_per_device": 0.0312}).endswith("| GFLOP/s/dev 31.2")
  assert Mt.format_progress(1, 10, {"tflops_per_sec_per_device": 2.5e-5}).endswith("| MFLOP/s/dev 25.0")
  assert Mt.format_progress(300, 1200, {"val/loss": 0.26904}) == "step 300/1200 (25.0%) | val_loss 0.2690"
