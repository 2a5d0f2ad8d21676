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
from sd3_jax.models.mmdit_config import (
  PRESETS,  # noqa: F401
  MMDiTConfig,
  block_segments,
  config_for_depth,  # noqa: F401
  config_from_preset,  # noqa: F401
  get_config,  # noqa: F401
  iter_blocks,  # noqa: F401
)
from sd3_jax.models import remat as R

Dtype = Any
REMAT_POLICIES = R.POLICIES  # name -> jax.checkpoint policy (models/remat.py)


# --------------------------------------------------------------------------------------------
# Blocks


def _replicated_features(mod_BxN):
  """Keep adaLN modulation vectors [B, n*h] split over the batch only.

  Without this constraint XLA's SPMD partitioner (jax 0.10.2, CPU, both Shardy and GSPMD)
  produced WRONG values on a (data 2, fsdp 2, tensor 2) mesh when the modulation (weights
  [embed->fsdp, mlp->tensor]) multiplies the MLP output (fc2 [mlp->tensor, embed->fsdp]):
  relative error ~1 against the unsharded result. The vectors are tiny, so replicating
  their feature axis costs nothing. tests/test_train.py checks a randomised model.
  """
  return nn.with_logical_constraint(mod_BxN, (L.ACT_BATCH, None))


class AttentionProjections(nn.Module):
  """qkv projection (+ optional QK RMSNorm) and output projection of one stream."""

  hidden: int
  heads: int
  qk_norm: bool
  has_proj: bool = True
  dtype: Dtype = jnp.float32

  def setup(self):
    hd = self.hidden // self.heads
    self.qkv = L.Dense((3, self.heads, hd), ("embed", "qkv", "heads", "kv"), dtype=self.dtype)
    if self.qk_norm:
      self.ln_q = L.RMSNorm()
      self.ln_k = L.RMSNorm()
    if self.has_proj:
      self.proj = L.Dense(self.hidden, ("heads", "kv", "embed"), n_in=2, dtype=self.dtype)

  def qkv_heads(self, x_BxLxD):
    qkv = self.qkv(x_BxLxD)  # [B, L, 3, H, Dh]
    qkv = nn.with_logical_constraint(qkv, (L.ACT_BATCH, L.ACT_LENGTH, None, L.ACT_HEADS, None))
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if self.qk_norm:
      q, k = self.ln_q(q), self.ln_k(k)
    return R.tag(q, R.QKV), R.tag(k, R.QKV), R.tag(v, R.QKV)

  def out(self, a_BxLxHxDh):
    return self.proj(a_BxLxHxDh)


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
  attention_scale: float | None = None

  def setup(self):
    n_mods = 2 if self.pre_only else (9 if self.dual else 6)
    zeros = nn.initializers.zeros_init()
    self.adaLN_modulation = L.Dense(n_mods * self.hidden, ("embed", "mlp"), dtype=self.dtype, kernel_init=zeros)
    self.attn = AttentionProjections(
      self.hidden, self.heads, self.qk_norm, has_proj=not self.pre_only, dtype=self.dtype
    )
    if self.dual:
      self.attn2 = AttentionProjections(self.hidden, self.heads, self.qk_norm, dtype=self.dtype)
    if not self.pre_only:
      self.mlp = Mlp(self.hidden, self.mlp_ratio * self.hidden, dtype=self.dtype)

  def pre_attention(self, x_BxLxD, c_BxD):
    """Returns (q, k, v) for the joint attention and what post_attention needs."""
    n_mods = 2 if self.pre_only else (9 if self.dual else 6)
    mods = jnp.split(_replicated_features(self.adaLN_modulation(nn.silu(c_BxD))), n_mods, axis=-1)
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


class Mlp(nn.Module):
  hidden: int
  mlp_hidden: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = L.Dense(self.mlp_hidden, ("embed", "mlp"), dtype=self.dtype, name="fc1")(x)
    h = nn.with_logical_constraint(h, (L.ACT_BATCH, L.ACT_LENGTH, L.ACT_MLP))
    h = jax.nn.gelu(h, approximate=True)
    return L.Dense(self.hidden, ("mlp", "embed"), dtype=self.dtype, name="fc2")(h)


class JointBlock(nn.Module):
  """Context and image streams with joint attention over [context, image] tokens.

  Called as ``(ctx, x), _ = block((ctx, x), c)`` so that it can be scanned; the last block
  (``context_pre_only``) returns ctx unchanged-by-MLP (its attention output is discarded).
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

  @nn.compact
  def __call__(self, carry, c_BxD):
    ctx, x = carry
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
    context_block = StreamBlock(pre_only=self.context_pre_only, name="context_block", **kw)
    x_block = StreamBlock(dual=self.dual, name="x_block", **kw)
    (cq, ck, cv), c_saved = context_block.pre_attention(ctx, c_BxD)
    (xq, xk, xv), x_saved = x_block.pre_attention(x, c_BxD)
    n_ctx = ctx.shape[1]
    # Reference order: context tokens first, then image tokens.
    a = A.attention(
      jnp.concatenate([cq, xq], 1),
      jnp.concatenate([ck, xk], 1),
      jnp.concatenate([cv, xv], 1),
      self.attention_impl,
      self.attention_blocks,
      self.attention_scale,
    )
    a = R.tag(a, R.ATTN_OUT)
    if not self.context_pre_only:
      ctx = context_block.post_attention(a[:, :n_ctx], c_saved)
    x = x_block.post_attention(a[:, n_ctx:], x_saved)
    return (ctx, x), None


class MlpEmbedder(nn.Module):
  """Linear -> SiLU -> Linear (the reference's TimestepEmbedder / VectorEmbedder mlp); the
  kernel initialisers default to the Dense's xavier-uniform."""

  hidden: int
  dtype: Dtype = jnp.float32
  init_0: mup.Initializer | None = None
  init_2: mup.Initializer | None = None

  @nn.compact
  def __call__(self, x):
    x = L.Dense(self.hidden, ("cond", "embed"), dtype=self.dtype, kernel_init=self.init_0, name="mlp_0")(x)
    return L.Dense(self.hidden, ("embed", "mlp"), dtype=self.dtype, kernel_init=self.init_2, name="mlp_2")(nn.silu(x))


# --------------------------------------------------------------------------------------------
# The model


class MMDiT(nn.Module):
  """The MM-DiT. Runtime options (not part of the checkpoint):

  dtype: compute dtype (bfloat16 on accelerators); parameters stay float32.
  remat: a policy name of models/remat.py ('none', 'full', 'dots', 'save_attn', ...).
  scan_layers: scan over runs of identical blocks (faster compiles at large depth). The
    parameter layout changes (see below); results are identical.
  attention_impl: 'xla' (float32 softmax, any backend), 'splash' (TPU), 'splash_interpret',
    'cudnn' (GPU) or 'auto' (models/attention.py); attention_blocks: splash tile sizes.

  Parameter tree (unscanned layout; kernels are [in..., out...]):
    pos_embed [1, M*M, h]      fixed table (gradient stopped), centre-cropped per input
    x_embedder/proj            kernel [p, p, C, h]      (the 2x2 stride-2 patch conv)
    t_embedder/mlp_0, mlp_2    y_embedder/mlp_0, mlp_2   context_embedder
    joint_blocks_{i}/{context_block,x_block}/
        adaLN_modulation       kernel [h, n*h]  (n = 6; 2 for the last context block; 9 dual)
        attn/qkv               kernel [h, 3, H, 64]      attn/ln_q, ln_k (qk-norm)  attn/proj [H, 64, h]
        attn2/...              (MMDiT-X dual-attention layers, x_block only)
        mlp/fc1, mlp/fc2
    final_layer/adaLN_modulation, final_layer/linear
  With ``scan_layers`` runs of equal blocks are stacked under ``scan_blocks_{start}_{stop}``
  (leading 'layers' axis); ``stack_block_params`` / ``unstack_block_params`` convert.
  """

  config: MMDiTConfig
  dtype: Dtype = jnp.float32
  remat: str = "none"
  scan_layers: bool = False
  attention_impl: str = "xla"
  attention_blocks: A.SplashBlocks = A.SplashBlocks()

  def _check_inputs(self, x, t, pooled, context):
    cfg = self.config
    if x.ndim != 4 or x.shape[-1] != cfg.in_channels:
      raise ValueError(f"x must be NHWC latents [B,H,W,{cfg.in_channels}], got shape {x.shape}")
    b, hh, ww, _ = x.shape
    p = cfg.patch_size
    if hh % p or ww % p:
      raise ValueError(f"latent height and width must be divisible by the patch size {p}, got {hh}x{ww}")
    if t.shape != (b,):
      raise ValueError(f"t must have shape [B]=({b},) of flow times in [0, 1], got {t.shape}")
    if pooled.shape != (b, cfg.pooled_dim):
      raise ValueError(f"pooled must have shape [B, {cfg.pooled_dim}] = ({b}, {cfg.pooled_dim}), got {pooled.shape}")
    if context.ndim != 3 or context.shape[0] != b or context.shape[-1] != cfg.context_dim:
      raise ValueError(f"context must have shape [B, L, {cfg.context_dim}] with B={b}, got {context.shape}")

  def _block(self, i: int, dual: bool, pre_only: bool, name: str):
    cfg = self.config
    cls, pol = JointBlock, R.policy(self.remat)
    if self.remat != "none":
      cls = nn.remat(cls, policy=pol, prevent_cse=not self.scan_layers)
    return cls, dict(
      hidden=cfg.hidden_size,
      heads=cfg.num_heads,
      mlp_ratio=cfg.mlp_ratio,
      qk_norm=cfg.qk_norm,
      context_pre_only=pre_only,
      dual=dual,
      dtype=self.dtype,
      attention_impl=self.attention_impl,
      attention_blocks=self.attention_blocks,
      attention_scale=cfg.attention_scale,
      name=name,
    )

  @nn.compact
  def __call__(self, x, t, pooled, context, *, skip_layers: tuple[int, ...] = ()):
    """Velocity v(x, t). ``skip_layers`` (unscanned models only) bypasses those blocks,
    for skip-layer guidance."""
    cfg = self.config
    self._check_inputs(x, t, pooled, context)
    b, hh, ww, _ = x.shape
    p, d = cfg.patch_size, cfg.hidden_size
    hp, wp = hh // p, ww // p

    mu = cfg.mup_scaling  # SP: every initialiser below is the standard one
    # Patch embedding: a p x p stride-p conv written as an einsum (kernel [p, p, C, h]).
    x_emb = PatchEmbed(
      d, p, dtype=self.dtype, kernel_init=mu.xavier_uniform(mup.INPUT, in_axis=(0, 1, 2), out_axis=3), name="x_embedder"
    )(x.astype(self.dtype))
    table = self.param(
      "pos_embed",
      nn.with_logical_partitioning(
        lambda *_: jnp.asarray(
          L.sincos_2d_table(d, cfg.pos_embed_max_size, cfg.pos_embed_base_size, cfg.pos_embed_scale)[None], jnp.float32
        ),
        (None, None, "embed"),
      ),
      (1, cfg.pos_embed_max_size**2, d),
      jnp.float32,
    )
    pos = L.crop_pos_embed(jax.lax.stop_gradient(table), cfg.pos_embed_max_size, hp, wp)
    x_tok = x_emb.reshape(b, hp * wp, d) + pos.astype(self.dtype)  # row-major (h, w) tokens
    x_tok = nn.with_logical_constraint(x_tok, (L.ACT_BATCH, L.ACT_LENGTH, L.ACT_EMBED))

    t_feat = L.timestep_embedding(t.astype(jnp.float32) * 1000.0)  # the network sees sigma*1000
    t_inits = dict(init_0=mu.normal(0.02, mup.INPUT), init_2=mu.normal(0.02, mup.HIDDEN))
    c = MlpEmbedder(d, dtype=self.dtype, **t_inits, name="t_embedder")(t_feat.astype(self.dtype))
    y_inits = dict(init_0=mu.xavier_uniform(mup.INPUT))
    c = c + MlpEmbedder(d, dtype=self.dtype, **y_inits, name="y_embedder")(pooled.astype(self.dtype))
    ctx = L.Dense(
      d, ("cond", "embed"), dtype=self.dtype, kernel_init=mu.xavier_uniform(mup.INPUT), name="context_embedder"
    )(context.astype(self.dtype))
    ctx = nn.with_logical_constraint(ctx, (L.ACT_BATCH, L.ACT_LENGTH, L.ACT_EMBED))

    carry = (ctx, x_tok)
    if self.scan_layers:
      if skip_layers:
        raise ValueError("skip_layers needs an unscanned model (scan_layers=False)")
      for start, stop, dual in block_segments(cfg):
        cls, kw = self._block(start, dual, False, f"scan_blocks_{start}_{stop}")
        scanned = nn.scan(
          cls,
          variable_axes={"params": 0},
          split_rngs={"params": True},
          in_axes=(nn.broadcast,),
          length=stop - start,
          metadata_params={nn.PARTITION_NAME: "layers"},
        )
        carry, _ = scanned(**kw)(carry, c)
    else:
      for i in range(cfg.depth - 1):
        cls, kw = self._block(i, i in cfg.dual_attention_layers, False, f"joint_blocks_{i}")
        if i in skip_layers and not self.is_initializing():
          continue
        carry, _ = cls(**kw)(carry, c)
    last = cfg.depth - 1
    cls, kw = self._block(last, last in cfg.dual_attention_layers, True, f"joint_blocks_{last}")
    if last not in skip_layers or self.is_initializing():
      carry, _ = cls(**kw)(carry, c)
    x_tok = carry[1]

    x_out = FinalLayer(d, p * p * cfg.out_channels, dtype=self.dtype, name="final_layer")(x_tok, c)
    # Unpatchify: channels ordered (p_row, q_col, c).
    x_out = x_out.reshape(b, hp, wp, p, p, cfg.out_channels).transpose(0, 1, 3, 2, 4, 5)
    return x_out.reshape(b, hh, ww, cfg.out_channels).astype(jnp.float32)


class PatchEmbed(nn.Module):
  hidden: int
  patch: int
  dtype: Dtype = jnp.float32
  kernel_init: mup.Initializer | None = None  # None: the Dense's xavier-uniform

  @nn.compact
  def __call__(self, x_BxHxWxC):
    b, hh, ww, ch = x_BxHxWxC.shape
    p = self.patch
    patches = x_BxHxWxC.reshape(b, hh // p, p, ww // p, p, ch).transpose(0, 1, 3, 2, 4, 5)  # [B,h,w,p,q,C]
    return L.Dense(
      self.hidden, (None, None, None, "embed"), n_in=3, dtype=self.dtype, kernel_init=self.kernel_init, name="proj"
    )(patches)


class FinalLayer(nn.Module):
  hidden: int
  out_features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, c):
    zeros = nn.initializers.zeros_init()
    mod = _replicated_features(
      L.Dense(2 * self.hidden, ("embed", "mlp"), dtype=self.dtype, kernel_init=zeros, name="adaLN_modulation")(
        nn.silu(c)
      )
    )
    shift, scale = jnp.split(mod, 2, axis=-1)  # original order: shift first
    x = L.modulate(L.layer_norm(x), shift, scale)
    return L.Dense(self.out_features, ("embed", None), dtype=self.dtype, kernel_init=zeros, name="linear")(x)


# muP parameter classes (models/mup.py): the embedders read fixed-width inputs (patches, timestep
# features, pooled and token text), the final linear writes the fixed-width patch output; every
# other kernel maps width to width.
MUP_ROLES = mup.RoleRule(
  inputs=("x_embedder", "context_embedder", "t_embedder/mlp_0", "y_embedder/mlp_0"), outputs=("final_layer/linear",)
)


# --------------------------------------------------------------------------------------------
# Helpers: dummy inputs, abstract init, parameter counts, scan layout conversion


def dummy_inputs(config: MMDiTConfig, batch: int = 1, latent_size: int = 8, context_len: int = 8):
  x = jnp.zeros((batch, latent_size, latent_size, config.in_channels), jnp.float32)
  return (
    x,
    jnp.zeros((batch,), jnp.float32),
    jnp.zeros((batch, config.pooled_dim), jnp.float32),
    jnp.zeros((batch, context_len, config.context_dim), jnp.float32),
  )


def init_params(model: MMDiT, rng: jax.Array, boxed: bool = False):
  """Initialise parameters (float32). ``boxed`` keeps the nn.Partitioned logical-axis boxes."""
  variables = model.init(rng, *dummy_inputs(model.config, latent_size=2 * model.config.patch_size))
  params = variables["params"]
  return params if boxed else nn.unbox(params)


def abstract_params(model: MMDiT):
  """Shapes, dtypes and logical axes of the parameters without allocating them."""
  return jax.eval_shape(functools.partial(init_params, model, boxed=True), jax.random.key(0))


def count_params(config: MMDiTConfig, include_pos_embed: bool = False) -> int:
  shapes = nn.unbox(abstract_params(MMDiT(config)))
  total = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
    if not include_pos_embed and any(getattr(k, "key", None) == "pos_embed" for k in path):
      continue
    total += int(np.prod(leaf.shape))
  return total


def stack_block_params(params: dict, config: MMDiTConfig) -> dict:
  """Unscanned layout -> scanned layout (runs of blocks stacked on a leading axis)."""
  out = {k: v for k, v in params.items() if not k.startswith("joint_blocks_")}
  for start, stop, _ in block_segments(config):
    blocks = [params[f"joint_blocks_{i}"] for i in range(start, stop)]
    out[f"scan_blocks_{start}_{stop}"] = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
  last = config.depth - 1
  out[f"joint_blocks_{last}"] = params[f"joint_blocks_{last}"]
  return out


def unstack_block_params(params: dict, config: MMDiTConfig) -> dict:
  """Scanned layout -> unscanned layout."""
  out = {k: v for k, v in params.items() if not k.startswith("scan_blocks_")}
  for start, stop, _ in block_segments(config):
    stacked = params[f"scan_blocks_{start}_{stop}"]
    for j, i in enumerate(range(start, stop)):
      out[f"joint_blocks_{i}"] = jax.tree.map(lambda a: a[j], stacked)
  return out
