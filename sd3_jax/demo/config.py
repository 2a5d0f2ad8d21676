"""The embedded demo's trainer config (``bash launch/demo.sh``): a pixel-space MM-DiT on 32x32
coloured shapes.

``python -m sd3_jax.demo`` builds the records this config reads (WORKDIR/data/{train,val}) and the small
random CLIP-L / CLIP-G / T5 encoders whose outputs they hold; run the demo rather than this
config directly. The model sees the [-1, 1] image as a 32x32x3 "latent" (patch 4: 64 image
tokens) and a 24-token context (12 CLIP tokens + 12 T5 tokens, 64 wide), small enough to train
to well above chance on 2 CPU cores in minutes.
"""

from sd3_jax.config import base_config, model_config

IMAGE_SIZE = 32
CLIP_TOKENS = 12  # BOS + the longest caption (8 words) + EOS fits; SD3 uses 77
T5_TOKENS = 12
CLIP_L_DIM, CLIP_G_DIM, T5_DIM = 32, 32, 64


def get_config():
  c = base_config()
  c.model = model_config(
    "d4",
    hidden_size=128,
    num_heads=4,
    patch_size=4,
    in_channels=3,
    out_channels=3,
    pooled_dim=CLIP_L_DIM + CLIP_G_DIM,
    context_dim=T5_DIM,
    pos_embed_max_size=IMAGE_SIZE // 4,
    qk_norm=True,
  )
  c.dtype = "float32"
  c.remat = "none"
  c.scan_layers = False
  c.total_steps = 1200
  c.global_batch_size = 64
  c.log_every = 25
  c.checkpoint_every = 300
  c.keep_checkpoints = 2
  c.optimizer.update(dict(learning_rate=3e-3, warmup_steps=50, schedule="cosine", end_lr_ratio=0.05))
  c.ema.update(dict(decay=0.995, every=1))
  c.flow.text_dropout = 0.1
  c.text.update(dict(clip_l_dim=CLIP_L_DIM, clip_g_dim=CLIP_G_DIM, clip_tokens=CLIP_TOKENS))
  c.data.update(
    dict(
      source="records",
      latent_size=IMAGE_SIZE,
      latent_channels=3,
      context_len=CLIP_TOKENS + T5_TOKENS,
      context_dim=T5_DIM,
      pooled_dim=CLIP_L_DIM + CLIP_G_DIM,
    )
  )
  c.val.update(dict(every=300, num_examples=256, batch_size=64))
  return c
