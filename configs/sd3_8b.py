"""The paper's largest scaling-study model: d=38 (8.06B, SD3.5-large shape) with QK-norm.

256^2 pretraining shape (32x32x16 latents, 154 text tokens), global batch 4096, bf16 compute,
float32 master weights and Adam state sharded with FSDP over 128 chips (data parallel
across groups of 128; needs a slice of at least 128 chips), no remat (it fits on v5p; see
below), scanned blocks. QK RMSNorm keeps attention logits bounded in mixed precision (the paper, section 5.3.2).

Check the fit before spending pod time (compile-only TPU topology, runs on a CPU machine):
  python -m tools.aot_compile --config configs/sd3_8b.py --topology v5p:8x8x8
Launch on the pod (every host):
  python -m sd3_jax.main --config configs/sd3_8b.py --workdir gs://BUCKET/sd3_8b --multihost \
      --config.data.source=records --config.data.path=/data/sd3_records
Expect ~6.8 TFLOP per image per step (model FLOPs); docs/performance.md has per-chip memory figures.
"""

from sd3_jax.config import base_config, model_config


def get_config():
  c = base_config()
  c.model = model_config("sd3.5-large")  # d=38, qk_norm=True
  c.total_steps = 500_000
  c.global_batch_size = 4096
  # hidden 2432 = 19 * 128: FSDP over 128 chips, data parallel over the rest (a 256- or
  # 512-chip slice cannot shard 2432 evenly 256 or 512 ways).
  c.mesh.fsdp = 128
  c.mesh.data = -1
  # No remat: `tools.aot_compile --remat_policies=none,full` for v5p:8x8x8 at 8 images per chip
  # (splash attention) peaks at 44.10 GiB of 95 GiB with no recomputation (1.000x); full remat
  # peaks at 4.36 GiB and recomputes 1.328x the model's matmul FLOPs (docs/performance.md).
  # On 32 GiB chips (v6e) or larger per-chip batches, no remat does not fit: pass
  # --config.remat=full, or let `tools.aot_compile --pick_remat` choose.
  c.remat = "none"
  return c
