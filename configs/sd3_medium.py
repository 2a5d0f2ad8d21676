"""SD3-medium (d=24, 2.03B) pretraining at 256^2, the paper's scaling-study shape.

32x32x16 latents (256 px, f=8), 154 text tokens (77 CLIP + 77 T5) of width 4096, pooled 2048,
global batch 4096, AdamW lr 1e-4 with 1000 warm-up steps, bf16 compute with float32 master
weights, no remat (it fits; see below), scanned blocks, FSDP over all chips.

Launch on a TPU pod (every host runs the same command):
  python -m sd3_jax.main --config configs/sd3_medium.py --workdir gs://BUCKET/sd3_medium \
      --multihost --config.data.source=records --config.data.path=/data/sd3_records
Check it fits first (no TPU needed):
  python -m tools.aot_compile --config configs/sd3_medium.py --topology v5p:8x8x8
Expect ~1.74 TFLOP per image per step (model FLOPs); docs/performance.md has per-chip memory figures.
"""

from sd3_jax.config import base_config, model_config


def get_config():
  c = base_config()
  c.model = model_config("sd3-medium")
  c.total_steps = 500_000
  c.global_batch_size = 4096
  # No remat: the step compiled for v5p:8x8x8 at 8 images per chip peaks at 11.91 GiB of
  # 95 GiB per chip and recomputes nothing (full remat: 1.43 GiB; docs/performance.md).
  # On smaller-HBM chips or larger per-chip batches check with tools.aot_compile --pick_remat.
  c.remat = "none"
  return c
