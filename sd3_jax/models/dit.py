"""DiT for text-to-image (``backbone`` 'dit'): the text tokens and the image tokens form one sequence
that passes through blocks with ONE set of weights (the SD3 paper's "DiT" baseline, section
5.2.3). It is the MM-DiT with its two streams' weights tied, which holds by construction: a
block is the MM-DiT's stream block applied to the joint sequence (tests/test_backbones.py).

``DiT(config).apply({'params': params}, x, t, pooled, context)`` -> velocity of x's shape, float32.

Parameter tree (unscanned; kernels are [in..., out...]):
  pos_embed, x_embedder/proj, t_embedder, y_embedder, context_embedder   as the MM-DiT's
  blocks_{i}/adaLN_modulation [h, 6h], attn/qkv, attn/ln_q, ln_k, attn/proj, mlp/fc1, mlp/fc2
  final_layer/adaLN_modulation, final_layer/linear
The last block computes attention over the whole sequence but its attention projection and MLP
on the image tokens only (the text outputs would be discarded); scanned, blocks 0..d-2 stack
under ``scan_blocks_0_{d-1}``.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from sd3_jax.models import attention as A
from sd3_jax.models import layers as L
from sd3_jax.models import mmdit as M
from sd3_jax.models import remat as R
from sd3_jax.models.mmdit_config import MMDiTConfig, scan_segments

Dtype = Any


class DiTBlock(M.StreamBlock):
  """adaLN-Zero transformer block over one sequence [B, S, h]. ``out_from`` > 0 (the last block):
  attention projection and MLP only for tokens [out_from:], which are all it returns."""

  out_from: int = 0

  def __call__(self, seq_BxSxD, c_BxD):
    (q, k, v), (x, x_norm, mods) = self.pre_attention(seq_BxSxD, c_BxD)
    a = R.tag(A.attention(q, k, v, self.attention_impl, self.attention_blocks, self.attention_scale), R.ATTN_OUT)
    n = self.out_from
    return self.post_attention(a[:, n:], (x[:, n:], x_norm[:, n:], mods)), None


def block_kwargs(module: nn.Module, cfg: MMDiTConfig, out_from: int = 0) -> dict:
  """The DiTBlock attributes of a backbone module (dtype, attention options) and config."""
  return dict(M.block_attributes(module, cfg), out_from=out_from)


def joint_transformer(module: nn.Module, cfg: MMDiTConfig, ctx_BxLxD, x_BxNxD, c_BxD, skip_layers=()):
  """The DiT's d blocks over [text; image] created in ``module`` (``blocks_{i}`` / scanned runs):
  returns the image tokens [B, N, h]. Also the transformer of the UViT."""
  seq = nn.with_logical_constraint(jnp.concatenate([ctx_BxLxD, x_BxNxD], 1), (L.ACT_BATCH, L.ACT_LENGTH, L.ACT_EMBED))
  run = dict(prefix="blocks_", remat=module.remat, skip=skip_layers, initializing=module.is_initializing())
  seq = R.run_blocks(
    DiTBlock,
    lambda _: block_kwargs(module, cfg),
    scan_segments(cfg)[1],
    seq,
    c_BxD,
    scan_layers=module.scan_layers,
    **run,
  )
  last = cfg.depth - 1
  out_from = ctx_BxLxD.shape[1]
  return R.run_blocks(
    DiTBlock,
    lambda _: block_kwargs(module, cfg, out_from),
    [(last, last + 1)],
    seq,
    c_BxD,
    scan_layers=False,
    prevent_cse=not module.scan_layers,
    **run,
  )


class DiT(M.Backbone):
  """DiT over the concatenated text and image tokens. Runtime options as ``mmdit.MMDiT``'s."""

  @nn.compact
  def __call__(self, x, t, pooled, context, *, skip_layers: tuple[int, ...] = ()):
    """Velocity v(x, t); ``skip_layers`` (unscanned only) bypasses those blocks."""
    cfg = self.config
    x_tok, c, ctx, (hp, wp) = M.embed_inputs(self, x, t, pooled, context)
    x_tok = joint_transformer(self, cfg, ctx, x_tok, c, skip_layers)
    return M.decode_image(cfg, x_tok, c, hp, wp, self.dtype)
