"""Tiny CPU twin of the real configs: a 2-block, 64-wide MM-DiT on synthetic 8x8x4 latents.

Run (seconds per step on a laptop CPU):
  python -m sd3_jax.main --config configs/tiny.py --workdir /tmp/sd3_tiny
Synthetic latents and text are independent random draws, so there is nothing to learn: the
loss stays near 2 (the variance of eps - x0); this config checks the plumbing (sharded step,
a checkpoint every 20 steps, validation at steps 50 and 100, metrics in
/tmp/sd3_tiny/metrics.jsonl), in about a minute including compilation. Point it at records with
  --config.data.source=records --config.data.path=DIR
Another backbone of the paper's study (docs/backbones.md): configs/tiny.py:dit (or :mmdit3,
:crossdit, :uvit), the same as --config.model.backbone=dit.
"""

from sd3_jax.config import base_config, model_config


def get_config(backbone: str = "mmdit"):
  c = base_config()
  c.model = model_config(
    "d2",
    backbone=backbone,
    hidden_size=64,
    num_heads=4,
    in_channels=4,
    out_channels=4,
    pooled_dim=32,
    context_dim=32,
    pos_embed_max_size=8,
    clip_tokens=4,  # = text.clip_tokens below ('mmdit3' splits the context there)
  )
  c.dtype = "float32"
  c.remat = "none"
  c.scan_layers = False
  c.total_steps = 100
  c.global_batch_size = 8
  c.log_every = 10
  c.checkpoint_every = 20
  c.keep_checkpoints = 2
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 10
  c.ema.every = 1
  c.ema.decay = 0.99
  c.text.update(dict(clip_l_dim=16, clip_g_dim=16, clip_tokens=4))  # pooled 32 = 16 + 16
  c.data.update(dict(latent_size=8, latent_channels=4, context_len=8, context_dim=32, pooled_dim=32, num_synthetic=512))
  c.val.update(dict(every=50, num_examples=16, batch_size=8))
  return c
