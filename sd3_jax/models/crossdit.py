"""CrossDiT (``backbone`` 'crossdit'): a DiT over the image tokens only, which reads the text through
cross-attention in every block (the SD3 paper's "CrossDiT" baseline, section 5.2.3, after
PixArt-alpha): self-attention, then cross-attention to the text tokens, then the MLP.

Conditioning as the other backbones: adaLN-Zero per block from the timestep and pooled-text
vector (6 modulations: shift/scale/gate of the self-attention and of the MLP). The
cross-attention reads the LayerNorm of the image tokens (no modulation, no gate) and its output
projection starts at zero, as PixArt-alpha's, so a fresh block ignores the text. The text tokens
are embedded once (``context_embedder``) and are not updated by the blocks.

Parameter tree (unscanned; kernels are [in..., out...]):
  pos_embed, x_embedder/proj, t_embedder, y_embedder, context_embedder   as the MM-DiT's
  blocks_{i}/adaLN_modulation [h, 6h]
             attn/qkv, attn/ln_q, ln_k, attn/proj                      self-attention
             cross_attn/q [h, H, Dh], cross_attn/kv [h, 2, H, Dh], cross_attn/ln_q, ln_k, cross_attn/proj
             mlp/fc1, mlp/fc2
  final_layer/adaLN_modulation, final_layer/linear
Every block is the same: scanned, all d stack under ``scan_blocks_0_{d}``.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from sd3_jax.models import attention as A
from sd3_jax.models import layers as L
from sd3_jax.models import mmdit as M
from sd3_jax.models import remat as R
from sd3_jax.models.mmdit_config import scan_segments

Dtype = Any


class CrossDiTBlock(nn.Module):
  """Called as ``(ctx, x), _ = block((ctx, x), c)``; ctx passes through unchanged."""

  hidden: int
  heads: int
  mlp_ratio: int = 4
  qk_norm: bool = False
  dtype: Dtype = jnp.float32
  attention_impl: str = "xla"
  attention_blocks: A.SplashBlocks = A.SplashBlocks()
  attention_scale: float | None = None  # None: 1/sqrt(head dim); muP's sqrt(d_base)/d (models/mup.py)

  @nn.compact
  def __call__(self, carry, c_BxD):
    ctx, x = carry
    impl, blocks, scale = self.attention_impl, self.attention_blocks, self.attention_scale
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = L.ada_modulation(c_BxD, 6, self.hidden, self.dtype)
    attn = A.AttentionProjections(self.hidden, self.heads, self.qk_norm, dtype=self.dtype, name="attn")
    q, k, v = attn.qkv_heads(L.modulate(L.layer_norm(x), shift_msa, scale_msa))
    x = x + gate_msa[:, None] * attn.out(R.tag(A.attention(q, k, v, impl, blocks, scale), R.ATTN_OUT))
    cross = A.CrossAttentionProjections(self.hidden, self.heads, self.qk_norm, dtype=self.dtype, name="cross_attn")
    q, k, v = cross.heads_of(L.layer_norm(x), ctx)
    x = x + cross.out(R.tag(A.attention(q, k, v, impl, blocks, scale), R.ATTN_OUT))
    mlp_in = R.tag(L.modulate(L.layer_norm(x), shift_mlp, scale_mlp), R.MLP_IN)
    x = x + gate_mlp[:, None] * L.Mlp(self.hidden, self.mlp_ratio * self.hidden, dtype=self.dtype, name="mlp")(mlp_in)
    return (ctx, nn.with_logical_constraint(x, (L.ACT_BATCH, L.ACT_LENGTH, L.ACT_EMBED))), None


class CrossDiT(M.Backbone):
  """CrossDiT. Runtime options as ``mmdit.MMDiT``'s."""

  @nn.compact
  def __call__(self, x, t, pooled, context, *, skip_layers: tuple[int, ...] = ()):
    """Velocity v(x, t); ``skip_layers`` (unscanned only) bypasses those blocks."""
    cfg = self.config
    x_tok, c, ctx, (hp, wp) = M.embed_inputs(self, x, t, pooled, context)
    kw = M.block_attributes(self, cfg)
    _, x_tok = R.run_blocks(
      CrossDiTBlock,
      lambda _: kw,
      scan_segments(cfg)[1],
      (ctx, x_tok),
      c,
      prefix="blocks_",
      scan_layers=self.scan_layers,
      remat=self.remat,
      skip=skip_layers,
      initializing=self.is_initializing(),
    )
    return M.decode_image(cfg, x_tok, c, hp, wp, self.dtype)
