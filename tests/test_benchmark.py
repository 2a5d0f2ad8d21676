"""tools.benchmark: compile once, time the real step on synthetic data, report MFU and memory."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_benchmark_tiny_on_cpu():
  cmd = [
    sys.executable,
    "-m",
    "tools.benchmark",
    "--config",
    os.path.join(REPO, "configs/tiny.py"),
    "--steps",
    "2",
    "--matmul_size",
    "256",
    "--json",
    "--config.global_batch_size=4",
  ]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")  # one CPU device
  p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert p.returncode == 0, p.stderr[-4000:]
  r = json.loads(p.stdout.strip().splitlines()[-1])
  assert r["platform"] == "cpu" and r["num_devices"] == 1 and r["attention_impl"] == "xla"
  assert r["steps"] == 2 and r["step_time_s"] > 0 and r["global_batch_size"] == 4
  assert abs(r["images_per_sec"] * r["step_time_s"] - 4) < 1e-6
  per_dev = r["model_flops_per_step"] / r["step_time_s"] / 1e12
  assert abs(r["model_tflops_per_sec_per_device"] - per_dev) < 1e-9
  assert r["mfu_vs_datasheet"] is None  # no datasheet peak for a CPU
  assert r["measured_matmul_tflops_per_device"] > 0
  assert abs(r["mfu_vs_measured_matmul"] - per_dev / r["measured_matmul_tflops_per_device"]) < 1e-9
  assert r["peak_memory_bytes_per_device"] > 0
  assert r["final_loss"] > 0
