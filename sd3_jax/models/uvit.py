"""UViT (``backbone`` 'uvit'), after Hoogeboom et al. 2023 ("simple diffusion"): a U-Net whose
lowest resolution is a stack of transformer blocks. Convolutional stages go down to the
transformer's grid and back up, with skip connections from each down-stage activation to the
up-stage of the same resolution.

Stage layout (docs/backbones.md says why): one conv stage per factor 2 of ``patch_size``, so the
transformer sees as many tokens as the other backbones at the same patch size (patch 2: a 32x32
latent at 256^2 px becomes a 16x16 grid, 256 tokens, as the MM-DiT's). The stage beside the
transformer has hidden/4 channels (its map holds as many numbers as the token grid), halving at
each stage further up (``mmdit_config.uvit_widths``). Every stage has ``uvit_res_blocks``
residual conv blocks down and one more up, each conditioned by adaLN-Zero (shift, scale, gate
from the timestep and pooled-text vector). The transformer is the DiT's: the text tokens join
the image tokens' sequence (``dit.joint_transformer``), with the positional table on the
image tokens; ``depth`` counts these transformer blocks (hidden 64*d, d heads), and the conv
widths follow hidden.

Parameter tree (S stages, R res blocks; kernels are [in..., out...]):
  t_embedder, y_embedder, context_embedder, pos_embed       as the MM-DiT's
  conv_in [3, 3, C, c_0]
  down_{s}_{j}/{adaLN_modulation, conv1, conv2}              j < R, stage s at c_s channels
  downsample_{s}/proj [2, 2, c_s, c_{s+1} or h]              2x2 stride-2 patch conv
  blocks_{i}/...                                             DiT blocks (scanned as the DiT's)
  upsample_{s} [h or c_{s+1}, 2, 2, c_s]                     2x2 stride-2 transposed conv
  up_{s}_{j}/{adaLN_modulation, conv1, conv2, skip}           j <= R, input = [h, skip] channels
  final_layer/adaLN_modulation, final_layer/conv [3, 3, c_0, C_out] (zero-initialised)
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from sd3_jax.models import layers as L
from sd3_jax.models import mup
from sd3_jax.models import remat as R
from sd3_jax.models.dit import joint_transformer
from sd3_jax.models.mmdit import Backbone, embed_text
from sd3_jax.models.mmdit_config import check_inputs, uvit_widths

Dtype = Any
_MAP = (L.ACT_BATCH, None, None, L.ACT_EMBED)  # logical axes of a feature map [B, H, W, C]
# Conv-stage channels (hidden/4, /8, ...) are named 'conv_in' / 'conv_out', replicated by the
# default rules: they are a few percent of the parameters, and a width such as 384 (d=24) does
# not divide a 512-way FSDP axis.
CONV = ("conv_in", "conv_out")


def _modulate_map(x_BxHxWxC, shift_BxC, scale_BxC):
  return x_BxHxWxC * (1 + scale_BxC[:, None, None, :]) + shift_BxC[:, None, None, :]


class ResBlock(nn.Module):
  """x -> skip(x) + gate * conv2(SiLU(adaLN(LN(conv1(SiLU(LN(x))))))); LayerNorm over channels per
  pixel; ``skip`` is a 1x1 projection when the channel count changes (up blocks)."""

  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC, c_BxD):
    shift, scale, gate = L.ada_modulation(c_BxD, 3, self.features, self.dtype)
    h = L.Conv(self.features, CONV, dtype=self.dtype, name="conv1")(nn.silu(L.layer_norm(x_BxHxWxC)))
    h = nn.with_logical_constraint(h, _MAP)
    h = nn.silu(_modulate_map(L.layer_norm(h), shift, scale))
    h = L.Conv(self.features, CONV, dtype=self.dtype, name="conv2")(h)
    skip = x_BxHxWxC
    if x_BxHxWxC.shape[-1] != self.features:
      skip = L.Dense(self.features, CONV, dtype=self.dtype, name="skip")(x_BxHxWxC)
    return nn.with_logical_constraint(skip + gate[:, None, None, :] * h, _MAP)


class Upsample(nn.Module):
  """2x2 stride-2 transposed conv as a Dense to 2x2 patches: [B, H, W, Cin] -> [B, 2H, 2W, features]."""

  features: int
  dtype: Dtype = jnp.float32
  in_axis: str = "conv_in"  # 'embed' from the transformer's width

  @nn.compact
  def __call__(self, x_BxHxWxC):
    b, hh, ww, _ = x_BxHxWxC.shape
    axes = (self.in_axis, None, None, "conv_out")
    y = L.Dense((2, 2, self.features), axes, dtype=self.dtype, name="proj")(x_BxHxWxC)
    y = y.transpose(0, 1, 3, 2, 4, 5)  # [B, H, p, W, q, C]
    return nn.with_logical_constraint(y.reshape(b, 2 * hh, 2 * ww, self.features), _MAP)


class FinalConv(nn.Module):
  """adaLN (shift, scale; zero-initialised) on the LayerNorm of the map, then a zero-initialised
  3x3 conv to the output channels: a fresh model outputs exactly zero."""

  out_channels: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC, c_BxD):
    shift, scale = L.ada_modulation(c_BxD, 2, x_BxHxWxC.shape[-1], self.dtype)
    x = _modulate_map(L.layer_norm(x_BxHxWxC), shift, scale)
    zeros = nn.initializers.zeros_init()
    return L.Conv(self.out_channels, ("conv_in", None), dtype=self.dtype, kernel_init=zeros, name="conv")(x)


class UViT(Backbone):
  """UViT. Runtime options as ``mmdit.MMDiT``'s; remat applies to the conv blocks too."""

  @nn.compact
  def __call__(self, x, t, pooled, context, *, skip_layers: tuple[int, ...] = ()):
    """Velocity v(x, t); ``skip_layers`` (unscanned only) bypasses those transformer blocks."""
    cfg = self.config
    check_inputs(cfg, x.shape, t.shape, pooled.shape, context.shape)
    widths, hidden, n_res = uvit_widths(cfg), cfg.hidden_size, cfg.uvit_res_blocks
    res = R.wrap(ResBlock, self.remat)
    c = L.conditioning(t, pooled, hidden, self.dtype, cfg.mup_scaling)

    init = cfg.mup_scaling.xavier_uniform(mup.INPUT, in_axis=-2, out_axis=-1)  # None under SP
    h = L.Conv(widths[0], (None, "conv_out"), dtype=self.dtype, kernel_init=init, name="conv_in")(x.astype(self.dtype))
    skips = [h]
    for s, width in enumerate(widths):
      for j in range(n_res):
        h = res(width, dtype=self.dtype, name=f"down_{s}_{j}")(h, c)
        skips.append(h)
      wider = widths[s + 1] if s + 1 < len(widths) else hidden
      out_axis = "conv_out" if s + 1 < len(widths) else "embed"
      h = L.PatchEmbed(wider, 2, dtype=self.dtype, axes=(None, None, "conv_in", out_axis), name=f"downsample_{s}")(h)
      h = nn.with_logical_constraint(h, _MAP)
      if s + 1 < len(widths):
        skips.append(h)

    b, hp, wp, _ = h.shape  # the transformer's grid: the latent / patch_size
    pos = L.pos_embed(self, hidden, cfg.pos_embed_max_size, cfg.pos_embed_base_size, cfg.pos_embed_scale, hp, wp)
    tok = nn.with_logical_constraint(
      h.reshape(b, hp * wp, hidden) + pos.astype(self.dtype), (L.ACT_BATCH, L.ACT_LENGTH, L.ACT_EMBED)
    )
    ctx = embed_text(cfg, context, self.dtype)
    h = joint_transformer(self, cfg, ctx, tok, c, skip_layers).reshape(b, hp, wp, hidden)

    for s in reversed(range(len(widths))):
      in_axis = "embed" if s + 1 == len(widths) else "conv_in"
      h = Upsample(widths[s], dtype=self.dtype, in_axis=in_axis, name=f"upsample_{s}")(h)
      for j in range(n_res + 1):
        h = res(widths[s], dtype=self.dtype, name=f"up_{s}_{j}")(jnp.concatenate([h, skips.pop()], -1), c)
    out = FinalConv(cfg.out_channels, dtype=self.dtype, name="final_layer")(h, c)
    return out.astype(jnp.float32)
