"""The SD3 / SD3.5 MM-DiT (the paper, section 4; the sd3.5 reference code ``mmditx.py``), NHWC, parameter names mirroring the original.

``MMDiT(config).apply({'params': params}, x, t, pooled, context)`` with x [B,H,W,C] latents,
t [B] flow time in [0, 1] (scaled by 1000 inside, as the reference feeds sigma*1000), pooled
[B,P] and context [B,L,D] returns the velocity, shape of x, in float32.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from sd3_jax.models import attention as A
from sd3_jax.models import layers as L
from sd3_jax.models import mup

# The configuration API lives beside the model and is part of its namespace (mmdit.get_config).
from sd3_jax.models.mmdit_config import (  # noqa: F401
  BACKBONES,
  PRESETS,
  MMDiTConfig,
  block_segments,
  check_inputs,
  config_for_depth,
  config_from_preset,
  get_config,
  iter_blocks,
  scan_segments,
  uvit_widths,
)
from sd3_jax.models import remat as R

Dtype = Any
REMAT_POLICIES = R.POLICIES  # name -> jax.checkpoint policy (models/remat.py)
# Shared pieces, part of this module's namespace as before they moved to layers/attention.
AttentionProjections = A.AttentionProjections
Mlp, MlpEmbedder, PatchEmbed, FinalLayer = L.Mlp, L.MlpEmbedder, L.PatchEmbed, L.FinalLayer


# --------------------------------------------------------------------------------------------
# Blocks


class StreamBlock(nn.Module):
  """One stream of a joint block (the reference's DismantledBlock): adaLN, attention, MLP."""

  hidden: int
  heads: int
  mlp_ratio: int = 4
  qk_norm: bool = False
  pre_only: bool = False
  dual: bool = False
  dtype: Dtype = jnp.float32
  attention_impl: str = "xla"
  attention_blocks: A.SplashBlocks = A.SplashBlocks()
  attention_scale: float | None = None  # None: 1/sqrt(head dim); muP's sqrt(d_base)/d (models/mup.py)

  def setup(self):
    n_mods = 2 if self.pre_only else (9 if self.dual else 6)
    zeros = nn.initializers.zeros_init()
    self.adaLN_modulation = L.Dense(n_mods * self.hidden, ("embed", "mlp"), dtype=self.dtype, kernel_init=zeros)
    self.attn = A.AttentionProjections(
      self.hidden, self.heads, self.qk_norm, has_proj=not self.pre_only, dtype=self.dtype
    )
    if self.dual:
      self.attn2 = A.AttentionProjections(self.hidden, self.heads, self.qk_norm, dtype=self.dtype)
    if not self.pre_only:
      self.mlp = L.Mlp(self.hidden, self.mlp_ratio * self.hidden, dtype=self.dtype)

  def pre_attention(self, x_BxLxD, c_BxD):
    """Returns (q, k, v) for the joint attention and what post_attention needs."""
    n_mods = 2 if self.pre_only else (9 if self.dual else 6)
    mods = jnp.split(L.replicated_features(self.adaLN_modulation(nn.silu(c_BxD))), n_mods, axis=-1)
    x_norm = L.layer_norm(x_BxLxD)
    q, k, v = self.attn.qkv_heads(L.modulate(x_norm, mods[0], mods[1]))  # shift_msa, scale_msa
    return (q, k, v), (x_BxLxD, x_norm, mods)

  def post_attention(self, attn_BxLxHxDh, saved):
    x, x_norm, mods = saved
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:6]
    del shift_msa, scale_msa
    x = x + gate_msa[:, None] * self.attn.out(attn_BxLxHxDh)
    if self.dual:
      shift2, scale2, gate2 = mods[6:9]
      q2, k2, v2 = self.attn2.qkv_heads(L.modulate(x_norm, shift2, scale2))
      a2 = A.attention(q2, k2, v2, self.attention_impl, self.attention_blocks, self.attention_scale)
      a2 = R.tag(a2, R.ATTN_OUT)
      x = x + gate2[:, None] * self.attn2.out(a2)
    mlp_in = R.tag(L.modulate(L.layer_norm(x), shift_mlp, scale_mlp), R.MLP_IN)
    x = x + gate_mlp[:, None] * self.mlp(mlp_in)
    return nn.with_logical_constraint(x, (L.ACT_BATCH, L.ACT_LENGTH, L.ACT_EMBED))


class JointBlock(nn.Module):
  """Text streams and the image stream with joint attention over [text..., image] tokens.

  Called as ``(*texts, x), _ = block((*texts, x), c)`` so that it can be scanned; one text
  stream ``context_block`` for the MM-DiT, ``clip_block`` and ``t5_block`` for the MM-DiT with
  three weight sets. In the last block (``context_pre_only``) the text streams compute only
  q/k/v and return their tokens unchanged (their attention output is discarded).
  """

  hidden: int
  heads: int
  mlp_ratio: int = 4
  qk_norm: bool = False
  context_pre_only: bool = False
  dual: bool = False
  dtype: Dtype = jnp.float32
  attention_impl: str = "xla"
  attention_blocks: A.SplashBlocks = A.SplashBlocks()
  attention_scale: float | None = None
  text_streams: tuple[str, ...] = ("context_block",)

  @nn.compact
  def __call__(self, carry, c_BxD):
    *texts, x = carry
    kw = dict(
      hidden=self.hidden,
      heads=self.heads,
      mlp_ratio=self.mlp_ratio,
      qk_norm=self.qk_norm,
      dtype=self.dtype,
      attention_impl=self.attention_impl,
      attention_blocks=self.attention_blocks,
      attention_scale=self.attention_scale,
    )
    text_blocks = [StreamBlock(pre_only=self.context_pre_only, name=n, **kw) for n in self.text_streams]
    x_block = StreamBlock(dual=self.dual, name="x_block", **kw)
    pre = [blk.pre_attention(tok, c_BxD) for blk, tok in zip(text_blocks, texts)]
    (xq, xk, xv), x_saved = x_block.pre_attention(x, c_BxD)
    # Reference order: text tokens first, then image tokens.
    qkv = [jnp.concatenate([p[0][j] for p in pre] + [xkv], 1) for j, xkv in enumerate((xq, xk, xv))]
    a = R.tag(A.attention(*qkv, self.attention_impl, self.attention_blocks, self.attention_scale), R.ATTN_OUT)
    bounds = np.cumsum([0] + [tok.shape[1] for tok in texts])
    if not self.context_pre_only:
      texts = [
        blk.post_attention(a[:, lo:hi], p[1]) for blk, p, lo, hi in zip(text_blocks, pre, bounds[:-1], bounds[1:])
      ]
    x = x_block.post_attention(a[:, bounds[-1] :], x_saved)
    return (*texts, x), None


# --------------------------------------------------------------------------------------------
# The model


def embed_image(module: nn.Module, cfg: MMDiTConfig, x, dtype):
  """Patch tokens plus the positional table, [B, (H/p)(W/p), h] row-major, created in ``module``
  (``x_embedder``: the p x p stride-p patch conv as an einsum, kernel [p, p, C, h]; ``pos_embed``)."""
  b, hh, ww, _ = x.shape
  p, d = cfg.patch_size, cfg.hidden_size
  hp, wp = hh // p, ww // p
  init = cfg.mup_scaling.xavier_uniform(mup.INPUT, in_axis=(0, 1, 2), out_axis=3)  # None under SP
  x_emb = L.PatchEmbed(d, p, dtype=dtype, kernel_init=init, name="x_embedder")(x.astype(dtype))
  pos = L.pos_embed(module, d, cfg.pos_embed_max_size, cfg.pos_embed_base_size, cfg.pos_embed_scale, hp, wp)
  x_tok = x_emb.reshape(b, hp * wp, d) + pos.astype(dtype)  # row-major (h, w) tokens
  return nn.with_logical_constraint(x_tok, (L.ACT_BATCH, L.ACT_LENGTH, L.ACT_EMBED))


def embed_text(cfg: MMDiTConfig, context, dtype, name: str = "context_embedder"):
  """Text tokens [B, L, context_dim] -> [B, L, h] (a Dense created in the calling module)."""
  init = cfg.mup_scaling.xavier_uniform(mup.INPUT)  # None under SP
  ctx = L.Dense(cfg.hidden_size, ("cond", "embed"), dtype=dtype, kernel_init=init, name=name)(context.astype(dtype))
  return nn.with_logical_constraint(ctx, (L.ACT_BATCH, L.ACT_LENGTH, L.ACT_EMBED))


def block_attributes(module, cfg: MMDiTConfig) -> dict:
  """The attributes every backbone's transformer blocks share: widths and attention from ``cfg``,
  dtype and the attention implementation from ``module`` (a ``Backbone``)."""
  return dict(
    hidden=cfg.hidden_size,
    heads=cfg.num_heads,
    mlp_ratio=cfg.mlp_ratio,
    qk_norm=cfg.qk_norm,
    dtype=module.dtype,
    attention_impl=module.attention_impl,
    attention_blocks=module.attention_blocks,
    attention_scale=cfg.attention_scale,
  )


def embed_inputs(module, x, t, pooled, context):
  """The DiT's and CrossDiT's inputs, checked and embedded in ``module`` (a ``Backbone``): image
  tokens [B, N, h], the conditioning vector [B, h], one text stream [B, L, h] and the patch grid."""
  cfg, dtype = module.config, module.dtype
  check_inputs(cfg, x.shape, t.shape, pooled.shape, context.shape)
  grid = (x.shape[1] // cfg.patch_size, x.shape[2] // cfg.patch_size)
  x_tok = embed_image(module, cfg, x, dtype)
  c = L.conditioning(t, pooled, cfg.hidden_size, dtype, cfg.mup_scaling)
  return x_tok, c, embed_text(cfg, context, dtype), grid


def decode_image(cfg: MMDiTConfig, x_tok, c, hp: int, wp: int, dtype):
  """Image tokens -> velocity [B, H, W, C_out] float32 through ``final_layer`` (adaLN + a
  zero-initialised Dense to p*p*C_out) and unpatchify."""
  p = cfg.patch_size
  x_out = L.FinalLayer(cfg.hidden_size, p * p * cfg.out_channels, dtype=dtype, name="final_layer")(x_tok, c)
  return L.unpatchify(x_out, hp, wp, p).astype(jnp.float32)


class Backbone(nn.Module):
  """The fields every backbone takes: its config and the runtime options (not part of the
  checkpoint) described under ``MMDiT``."""

  config: MMDiTConfig
  dtype: Dtype = jnp.float32
  remat: str = "none"
  scan_layers: bool = False
  attention_impl: str = "xla"
  attention_blocks: A.SplashBlocks = A.SplashBlocks()


class MMDiT(Backbone):
  """The MM-DiT (``backbone`` 'mmdit'), or with three weight sets ('mmdit3': CLIP and T5 tokens in
  streams of their own, joint attention over all three). Runtime options (not part of the
  checkpoint):

  dtype: compute dtype (bfloat16 on accelerators); parameters stay float32.
  remat: a policy name of models/remat.py ('none', 'full', 'dots', 'save_attn', ...).
  scan_layers: scan over runs of identical blocks (faster compiles at large depth). The
    parameter layout changes (see below); results are identical.
  attention_impl: 'xla' (float32 softmax, any backend), 'splash' (TPU), 'splash_interpret',
    'cudnn' (GPU) or 'auto' (models/attention.py); attention_blocks: splash tile sizes.

  Parameter tree (unscanned layout; kernels are [in..., out...]):
    pos_embed [1, M*M, h]      fixed table (gradient stopped), centre-cropped per input
    x_embedder/proj            kernel [p, p, C, h]      (the 2x2 stride-2 patch conv)
    t_embedder/mlp_0, mlp_2    y_embedder/mlp_0, mlp_2
    context_embedder           ('mmdit3': clip_embedder for context rows < clip_tokens, t5_embedder)
    joint_blocks_{i}/{context_block,x_block}/       ('mmdit3': clip_block, t5_block, x_block)
        adaLN_modulation       kernel [h, n*h]  (n = 6; 2 for the last text blocks; 9 dual)
        attn/qkv               kernel [h, 3, H, 64]      attn/ln_q, ln_k (qk-norm)  attn/proj [H, 64, h]
        attn2/...              (MMDiT-X dual-attention layers, x_block only)
        mlp/fc1, mlp/fc2
    final_layer/adaLN_modulation, final_layer/linear
  With ``scan_layers`` runs of equal blocks are stacked under ``scan_blocks_{start}_{stop}``
  (leading 'layers' axis); ``stack_block_params`` / ``unstack_block_params`` convert.
  """

  def _block_kwargs(self, start: int, pre_only: bool = False) -> dict:
    cfg = self.config
    return dict(
      block_attributes(self, cfg),
      context_pre_only=pre_only,
      dual=start in cfg.dual_attention_layers,
      text_streams=cfg.text_streams,
    )

  @nn.compact
  def __call__(self, x, t, pooled, context, *, skip_layers: tuple[int, ...] = ()):
    """Velocity v(x, t). ``skip_layers`` (unscanned models only) bypasses those blocks,
    for skip-layer guidance."""
    cfg = self.config
    if cfg.backbone not in ("mmdit", "mmdit3"):
      raise ValueError(f"MMDiT builds backbones 'mmdit' and 'mmdit3', not {cfg.backbone!r}: use backbones.build")
    check_inputs(cfg, x.shape, t.shape, pooled.shape, context.shape)
    p = cfg.patch_size
    hp, wp = x.shape[1] // p, x.shape[2] // p
    x_tok = embed_image(self, cfg, x, self.dtype)
    c = L.conditioning(t, pooled, cfg.hidden_size, self.dtype, cfg.mup_scaling)
    if cfg.backbone == "mmdit":
      texts = (embed_text(cfg, context, self.dtype),)
    else:  # CLIP rows first, then T5 (flow.TextLayout), each with its own embedder
      n = cfg.clip_tokens
      texts = (
        embed_text(cfg, context[:, :n], self.dtype, "clip_embedder"),
        embed_text(cfg, context[:, n:], self.dtype, "t5_embedder"),
      )
    run = dict(prefix="joint_blocks_", remat=self.remat, skip=skip_layers, initializing=self.is_initializing())
    carry = R.run_blocks(
      JointBlock, self._block_kwargs, scan_segments(cfg)[1], (*texts, x_tok), c, scan_layers=self.scan_layers, **run
    )
    last = cfg.depth - 1
    carry = R.run_blocks(
      JointBlock,
      lambda i: self._block_kwargs(i, pre_only=True),
      [(last, last + 1)],
      carry,
      c,
      scan_layers=False,
      prevent_cse=not self.scan_layers,
      **run,
    )
    return decode_image(cfg, carry[-1], c, hp, wp, self.dtype)


# --------------------------------------------------------------------------------------------
# Helpers: dummy inputs, abstract init, parameter counts, scan layout conversion


def dummy_inputs(config: MMDiTConfig, batch: int = 1, latent_size: int = 8, context_len: int = 8):
  """Zero inputs of any backbone (the context gets at least one T5 row beyond 'mmdit3''s CLIP rows)."""
  if config.backbone == "mmdit3":
    context_len = max(context_len, config.clip_tokens + 1)
  x = jnp.zeros((batch, latent_size, latent_size, config.in_channels), jnp.float32)
  return (
    x,
    jnp.zeros((batch,), jnp.float32),
    jnp.zeros((batch, config.pooled_dim), jnp.float32),
    jnp.zeros((batch, context_len, config.context_dim), jnp.float32),
  )


def init_params(model: nn.Module, rng: jax.Array, boxed: bool = False):
  """Initialise the parameters of any backbone (float32). ``boxed`` keeps the nn.Partitioned
  logical-axis boxes."""
  variables = model.init(rng, *dummy_inputs(model.config, latent_size=2 * model.config.patch_size))
  params = variables["params"]
  return params if boxed else nn.unbox(params)


def abstract_params(model: nn.Module):
  """Shapes, dtypes and logical axes of any backbone's parameters without allocating them."""
  return jax.eval_shape(functools.partial(init_params, model, boxed=True), jax.random.key(0))


def count_params(config: MMDiTConfig, include_pos_embed: bool = False) -> int:
  """Parameters of an MM-DiT ('mmdit', 'mmdit3'; any backbone: ``backbones.count_params``)."""
  return count_tree(nn.unbox(abstract_params(MMDiT(config))), include_pos_embed)


def count_tree(shapes, include_pos_embed: bool = False) -> int:
  """Elements of a parameter tree (arrays or ShapeDtypeStructs), the fixed table left out unless asked."""
  total = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
    if not include_pos_embed and any(getattr(k, "key", None) == "pos_embed" for k in path):
      continue
    total += int(np.prod(leaf.shape))
  return total


def stack_block_params(params: dict, config: MMDiTConfig) -> dict:
  """Unscanned layout -> scanned layout (runs of blocks stacked on a leading axis), any backbone."""
  prefix, runs = scan_segments(config)
  stacked = {f"{prefix}{i}" for start, stop in runs for i in range(start, stop)}
  out = {k: v for k, v in params.items() if k not in stacked}
  for start, stop in runs:
    blocks = [params[f"{prefix}{i}"] for i in range(start, stop)]
    out[f"scan_blocks_{start}_{stop}"] = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
  return out


def unstack_block_params(params: dict, config: MMDiTConfig) -> dict:
  """Scanned layout -> unscanned layout, any backbone."""
  prefix, runs = scan_segments(config)
  out = {k: v for k, v in params.items() if not k.startswith("scan_blocks_")}
  for start, stop in runs:
    stacked = params[f"scan_blocks_{start}_{stop}"]
    for j, i in enumerate(range(start, stop)):
      out[f"{prefix}{i}"] = jax.tree.map(lambda a: a[j], stacked)
  return out
