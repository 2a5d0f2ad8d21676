"""tools.aot_compile: the real train step compiled for a TPU topology on this CPU machine."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _aot(*flags):
  cmd = [sys.executable, "-m", "tools.aot_compile", "--config", os.path.join(REPO, "configs/tiny.py"), "--json", *flags]
  p = subprocess.run(
    cmd, cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=600
  )
  assert p.returncode == 0, p.stderr[-4000:]
  return json.loads(p.stdout.strip().splitlines()[-1])


def test_tiny_config_fits_v5p_topology():
  r = _aot("--topology=v5p:2x2x2", "--config.mesh.fsdp=4", "--config.mesh.tensor=2")
  assert r["num_devices"] == 8 and r["device_kind"].startswith("TPU v5")
  assert r["mesh"] == {"data": 1, "fsdp": 4, "tensor": 2}
  assert r["hbm_bytes_per_device"] == 95 * 1024**3  # v5p: 95 GiB HBM per chip (Google Cloud's v5p page)
  assert 0 < r["peak_bytes_per_device"] < r["hbm_bytes_per_device"] and r["fits"] is True
  assert r["compiled_flops_per_device"] > 0


def test_too_large_batch_does_not_fit_v5e():
  # 16 GiB of HBM per v5e chip: 4M latent examples of 8x8x4 (plus context) cannot fit on 4 chips.
  r = _aot("--topology=v5e:2x2", "--config.global_batch_size=2097152")
  assert r["fits"] is False and r["peak_bytes_per_device"] > r["hbm_bytes_per_device"]


def test_remat_policies_report_memory_and_recomputation_and_pick():
  r = _aot("--topology=v5p:2x2x1", "--config.mesh.fsdp=4", "--remat_policies=none,full", "--pick_remat")
  rows = {row["remat"]: row for row in r["policies"]}
  assert set(rows) == {"none", "full"}
  assert all(row["attention_impl"] == "splash" and row["fits"] for row in rows.values())
  assert all(row["kernel_calls_per_step"] > 0 for row in rows.values())  # the Pallas kernel ran
  # Without remat the compiled matmuls are the model's (loops counted per layer); full remat
  # reruns every block's forward matmuls in the backward pass: about 4/3 of them.
  assert 0.9 < rows["none"]["recompute_ratio"] < 1.1
  assert 1.2 < rows["full"]["recompute_ratio"] < 1.4
  assert r["picked_remat"] == "none"


def test_two_slices_data_parallel_sends_each_chips_gradient_share_across_slices():
  """2 x v5p:2x2x1, pure data parallelism (data 4 per slice x 2 slices): the compiler reduces
  the float32 gradient inside each slice and each chip sends its quarter across DCN, once per
  step. Hand count: 4 bytes x trainable parameters / 4 chips per slice. Widths are multiples
  of 128 so that TPU tiles add almost no padding; the loss and metric scalars add the rest."""
  from sd3_jax.models import mmdit
  from sd3_jax.scaling import family
  from configs import tiny

  widths = dict(hidden_size=256, num_heads=2, context_dim=128, pooled_dim=128, in_channels=32, out_channels=32)
  r = _aot(
    "--topology=v5p:2x2x1",
    "--num_slices=2",
    "--config.mesh.data=-1",
    "--config.mesh.fsdp=1",
    *[f"--config.model.{k}={v}" for k, v in widths.items()],
    "--config.data.context_dim=128",
    "--config.data.pooled_dim=128",
    "--config.data.latent_channels=32",
    "--config.text.clip_l_dim=64",
    "--config.text.clip_g_dim=64",
  )
  assert r["num_slices"] == 2 and r["num_devices"] == 8
  assert r["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
  c = tiny.get_config()
  c.model.update(widths)
  trainable = family.param_counts(mmdit.config_from_preset(**c.model))["total"]  # without the fixed pos_embed
  hand = 4 * trainable / 4
  assert hand <= r["dcn_bytes_per_step"] <= 1.01 * hand, (r["dcn_bytes_per_step"], hand)
  # Inside a slice the whole gradient is reduce-scattered and the update all-gathered.
  assert r["ici_bytes_per_step"] >= 2 * 4 * trainable
