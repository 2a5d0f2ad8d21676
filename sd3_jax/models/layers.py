"""Shared primitives with logical axis names: dense and conv layers, norms, attention, embeddings,
and the pieces every diffusion backbone shares (patch embedding, timestep and pooled-text
conditioning, positional table, MLP, adaLN final layer).

Every parameter is created through ``nn.with_logical_partitioning`` so that the trainer can
map logical names ('embed', 'mlp', 'heads', ...) to mesh axes with one rule table
(``sd3_jax.sharding``). Parameters are float32; ``dtype`` is the compute dtype. Norm
statistics, softmax and the timestep embedding are always computed in float32.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from sd3_jax.models import mup

Dtype = Any
Initializer = Callable[..., jax.Array]

# Logical names of activation axes (mapped to mesh axes by sharding.LOGICAL_RULES).
ACT_BATCH, ACT_LENGTH, ACT_EMBED, ACT_HEADS, ACT_MLP = ("act_batch", "act_length", "act_embed", "act_heads", "act_mlp")


def _as_tuple(x) -> tuple:
  return tuple(x) if isinstance(x, Sequence) else (x,)


class Dense(nn.Module):
  """Linear map over the last ``n_in`` input axes to ``features`` (int or tuple).

  The kernel has shape ``x.shape[-n_in:] + features`` and logical names ``axes`` (one name
  per kernel axis); the bias has the names of the feature axes.
  """

  features: int | tuple[int, ...]
  axes: tuple[str | None, ...]
  n_in: int = 1
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Initializer | None = None
  bias_init: Initializer = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = _as_tuple(self.features)
    in_shape = x.shape[-self.n_in :]
    kshape = tuple(in_shape) + features
    if len(self.axes) != len(kshape):
      raise ValueError(f"{self.name}: {len(self.axes)} axis names for a kernel of shape {kshape}")
    n_k = len(kshape)
    init = self.kernel_init or nn.initializers.xavier_uniform(
      in_axis=tuple(range(self.n_in)), out_axis=tuple(range(self.n_in, n_k))
    )
    kernel = self.param("kernel", nn.with_logical_partitioning(init, self.axes), kshape, self.param_dtype)
    contract = (tuple(range(x.ndim - self.n_in, x.ndim)), tuple(range(self.n_in)))
    y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), (contract, ((), ())))
    if self.use_bias:
      bias = self.param(
        "bias", nn.with_logical_partitioning(self.bias_init, self.axes[self.n_in :]), features, self.param_dtype
      )
      y = y + bias.astype(self.dtype)
    return y


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """LayerNorm without affine parameters, statistics in float32, result in x's dtype."""
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


class RMSNorm(nn.Module):
  """RMSNorm over the last axis with a learnable scale (QK-norm); float32 statistics."""

  eps: float = 1e-6
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param(
      "scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("kv",)), (x.shape[-1],), self.param_dtype
    )
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (y * scale.astype(jnp.float32)).astype(x.dtype)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  """adaLN modulation: x [B,L,D], shift/scale [B,D]."""
  return x * (1 + scale[:, None, :]) + shift[:, None, :]


def dot_product_attention(
  q: jax.Array, k: jax.Array, v: jax.Array, implementation: str = "xla", scale: float | None = None
) -> jax.Array:
  """Unmasked softmax attention, q/k/v [B, L, H, Dh] -> [B, L, H, Dh], logits scaled by
  ``scale`` (None: 1/sqrt(Dh)).

  'xla' computes the logits and softmax in float32 explicitly (numerically safe in bf16 and
  identical on every backend); 'cudnn' / 'auto' use jax.nn.dot_product_attention (fused flash
  attention on GPU).
  """
  if implementation == "xla":
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)
  impl = None if implementation == "auto" else implementation
  return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=impl)


def timestep_embedding(t: jax.Array, dim: int = 256, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal [cos, sin] features of the network timestep (float32), t [B] -> [B, dim]."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
  return emb


def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
  """1-D sin-cos embedding in float64: [sin(pos*omega), cos(pos*omega)], pos any shape -> [N, dim]."""
  if dim % 2:
    raise ValueError(f"sin-cos embedding dimension must be even, got {dim}")
  omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d_table(dim: int, grid_size: int, base_size: int = 16, scale: float = 1.0) -> np.ndarray:
  """The 2-D positional table [grid_size**2, dim] (the reference implementation's ``get_2d_sincos_pos_embed``), rows in row-major (y, x).

  Positions follow the paper (s5.3.2): ``(p - (grid_size - base_size*scale)/2) / scale`` on each
  axis, so that the centre crop of ``base_size*scale`` patches spans 0 .. base_size. With
  base_size 16 (256 px pretraining, f=8, patch 2) and scale S/256 for resolution S. The first
  half of the channels encodes the column (x), the second half the row (y), as the reference.
  """
  if dim % 4:
    raise ValueError(f"2-D sin-cos embedding needs a hidden size divisible by 4, got {dim}")
  p = (np.arange(grid_size, dtype=np.float64) - (grid_size - base_size * scale) / 2.0) / scale
  gx, gy = np.meshgrid(p, p)  # gx[i, j] = p[j] (column), gy[i, j] = p[i] (row)
  return np.concatenate([sincos_1d(dim // 2, gx), sincos_1d(dim // 2, gy)], axis=1)


def crop_pos_embed(table: jax.Array, grid_size: int, h: int, w: int) -> jax.Array:
  """Centre crop of a [1, M*M, D] table to [1, h*w, D] (floor offsets, as the reference)."""
  if h > grid_size or w > grid_size:
    raise ValueError(
      f"latent patch grid {h}x{w} is larger than the positional grid {grid_size}x{grid_size}; "
      f"use a smaller resolution (at most {2 * grid_size * 8} px per side for patch 2, f=8) "
      "or a model with a larger pos_embed_max_size"
    )
  top, left = (grid_size - h) // 2, (grid_size - w) // 2
  d = table.shape[-1]
  pe = table.reshape(1, grid_size, grid_size, d)[:, top : top + h, left : left + w, :]
  return pe.reshape(1, h * w, d)


# --------------------------------------------------------------------------------------------
# Pieces shared by the diffusion backbones (models/mmdit.py, dit.py, crossdit.py, uvit.py)


def replicated_features(mod_BxN):
  """Keep adaLN modulation vectors [B, n*h] split over the batch only.

  Without this constraint XLA's SPMD partitioner (jax 0.10.2, CPU, both Shardy and GSPMD)
  produced WRONG values on a (data 2, fsdp 2, tensor 2) mesh when the modulation (weights
  [embed->fsdp, mlp->tensor]) multiplies the MLP output (fc2 [mlp->tensor, embed->fsdp]):
  relative error ~1 against the unsharded result. The vectors are tiny, so replicating
  their feature axis costs nothing. tests/test_train.py checks a randomised model.
  """
  return nn.with_logical_constraint(mod_BxN, (ACT_BATCH, None))


def ada_modulation(c_BxD, n_mods: int, width: int, dtype, name: str = "adaLN_modulation") -> list[jax.Array]:
  """adaLN-Zero: ``n_mods`` vectors [B, width] from SiLU(c) through one zero-initialised Dense
  (created in the calling module under ``name``), so a fresh block is an identity."""
  dense = Dense(n_mods * width, ("embed", "mlp"), dtype=dtype, kernel_init=nn.initializers.zeros_init(), name=name)
  return jnp.split(replicated_features(dense(nn.silu(c_BxD))), n_mods, axis=-1)


class Mlp(nn.Module):
  hidden: int
  mlp_hidden: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = Dense(self.mlp_hidden, ("embed", "mlp"), dtype=self.dtype, name="fc1")(x)
    h = nn.with_logical_constraint(h, (ACT_BATCH, ACT_LENGTH, ACT_MLP))
    h = jax.nn.gelu(h, approximate=True)
    return Dense(self.hidden, ("mlp", "embed"), dtype=self.dtype, name="fc2")(h)


class MlpEmbedder(nn.Module):
  """Linear -> SiLU -> Linear (the reference's TimestepEmbedder / VectorEmbedder mlp); the kernel
  initialisers default to the Dense's xavier-uniform."""

  hidden: int
  dtype: Dtype = jnp.float32
  init_0: Initializer | None = None
  init_2: Initializer | None = None

  @nn.compact
  def __call__(self, x):
    x = Dense(self.hidden, ("cond", "embed"), dtype=self.dtype, kernel_init=self.init_0, name="mlp_0")(x)
    return Dense(self.hidden, ("embed", "mlp"), dtype=self.dtype, kernel_init=self.init_2, name="mlp_2")(nn.silu(x))


def conditioning(
  t_B: jax.Array, pooled_BxP: jax.Array, hidden: int, dtype, mu: mup.Scaling = mup.Scaling()
) -> jax.Array:
  """The adaLN conditioning vector c [B, hidden] = t_embedder(timestep features) +
  y_embedder(pooled text), both created in the calling module. The network sees t*1000 (the
  reference feeds sigma*1000). ``mu``: the model's muP scaling (SP: the standard inits)."""
  t_feat = timestep_embedding(t_B.astype(jnp.float32) * 1000.0)
  t_inits = dict(init_0=mu.normal(0.02, mup.INPUT), init_2=mu.normal(0.02, mup.HIDDEN))
  c = MlpEmbedder(hidden, dtype=dtype, **t_inits, name="t_embedder")(t_feat.astype(dtype))
  y_init = mu.xavier_uniform(mup.INPUT)
  return c + MlpEmbedder(hidden, dtype=dtype, init_0=y_init, name="y_embedder")(pooled_BxP.astype(dtype))


class PatchEmbed(nn.Module):
  """A p x p stride-p conv written as a Dense over patches: [B,H,W,C] -> [B,H/p,W/p,h] (kernel [p,p,C,h])."""

  hidden: int
  patch: int
  dtype: Dtype = jnp.float32
  axes: tuple[str | None, ...] = (None, None, None, "embed")
  kernel_init: Initializer | None = None  # None: the Dense's xavier-uniform

  @nn.compact
  def __call__(self, x_BxHxWxC):
    b, hh, ww, ch = x_BxHxWxC.shape
    p = self.patch
    patches = x_BxHxWxC.reshape(b, hh // p, p, ww // p, p, ch).transpose(0, 1, 3, 2, 4, 5)  # [B,h,w,p,q,C]
    return Dense(self.hidden, self.axes, n_in=3, dtype=self.dtype, kernel_init=self.kernel_init, name="proj")(patches)


def unpatchify(x_BxNxF: jax.Array, hp: int, wp: int, p: int) -> jax.Array:
  """[B, hp*wp, p*p*C] tokens (features ordered (p_row, q_col, c)) -> [B, hp*p, wp*p, C]."""
  b = x_BxNxF.shape[0]
  c = x_BxNxF.shape[-1] // (p * p)
  x = x_BxNxF.reshape(b, hp, wp, p, p, c).transpose(0, 1, 3, 2, 4, 5)  # [B, hp, p, wp, q, C]
  return x.reshape(b, hp * p, wp * p, c)


def pos_embed(module: nn.Module, hidden: int, max_size: int, base_size: int, scale: float, hp: int, wp: int):
  """The fixed 2-D sin-cos table, a parameter ``pos_embed`` [1, M*M, hidden] of ``module``
  (gradient stopped), centre-cropped to an hp x wp patch grid: [1, hp*wp, hidden]."""
  table = module.param(
    "pos_embed",
    nn.with_logical_partitioning(
      lambda *_: jnp.asarray(sincos_2d_table(hidden, max_size, base_size, scale)[None], jnp.float32),
      (None, None, "embed"),
    ),
    (1, max_size**2, hidden),
    jnp.float32,
  )
  return crop_pos_embed(jax.lax.stop_gradient(table), max_size, hp, wp)


class FinalLayer(nn.Module):
  """adaLN (shift, scale; zero-initialised) on the LayerNorm of the tokens, then a zero-initialised
  Dense to ``out_features``: a fresh model outputs exactly zero."""

  hidden: int
  out_features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, c):
    shift, scale = ada_modulation(c, 2, self.hidden, self.dtype)  # original order: shift first
    x = modulate(layer_norm(x), shift, scale)
    zeros = nn.initializers.zeros_init()
    return Dense(self.out_features, ("embed", None), dtype=self.dtype, kernel_init=zeros, name="linear")(x)


class Conv(nn.Module):
  """k x k stride-1 'SAME' convolution over NHWC with logical axes: kernel [k, k, Cin, Cout]
  named (None, None, *axes), bias [Cout]. Default init: Xavier-uniform over fan-in k*k*Cin and
  fan-out k*k*Cout, as the Dense layers."""

  features: int
  axes: tuple[str | None, str | None] = ("embed", "mlp")
  kernel_size: int = 3
  dtype: Dtype = jnp.float32
  kernel_init: Initializer | None = None

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    k = self.kernel_size
    init = self.kernel_init or nn.initializers.xavier_uniform(in_axis=-2, out_axis=-1)
    kshape = (k, k, x_BxHxWxC.shape[-1], self.features)
    kernel = self.param("kernel", nn.with_logical_partitioning(init, (None, None, *self.axes)), kshape, jnp.float32)
    bias = self.param(
      "bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), self.axes[1:]), (self.features,), jnp.float32
    )
    y = jax.lax.conv_general_dilated(
      x_BxHxWxC.astype(self.dtype),
      kernel.astype(self.dtype),
      (1, 1),
      "SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    return y + bias.astype(self.dtype)


# --------------------------------------------------------------------------------------------
# Pieces of the text encoders (CLIP, T5) and their transformers-style configs


# transformers' activation names (ACT2FN) -> functions.
ACTIVATIONS = {
  "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
  "gelu": functools.partial(jax.nn.gelu, approximate=False),
  "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
  "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
  "relu": jax.nn.relu,
  "silu": jax.nn.silu,
}


def dataclass_from_dict(cls, d: Mapping):
  """``cls(**d)``, naming any keys the dataclass does not have."""
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = set(d) - known
  if unknown:
    raise ValueError(f"unknown {cls.__name__} keys {sorted(unknown)}; known: {sorted(known)}")
  return cls(**d)


def hf_get(d: Mapping, key: str, default):
  """``d[key]``, or ``default`` when missing or None (transformers' config defaults)."""
  v = d.get(key)
  return default if v is None else v


class Embed(nn.Module):
  """Embedding table [num, features] with logical axes; float32 lookup."""

  num: int
  features: int
  axes: tuple[str | None, str | None] = ("vocab", "embed")

  @nn.compact
  def __call__(self, ids: jax.Array) -> jax.Array:
    table = self.param(
      "embedding",
      nn.with_logical_partitioning(nn.initializers.normal(0.02), self.axes),
      (self.num, self.features),
      jnp.float32,
    )
    return jnp.take(table, ids, axis=0)


class LayerNorm(nn.Module):
  """LayerNorm with scale and bias over the last axis; float32 statistics and output."""

  eps: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    scale = self.param(
      "scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)), (d,), jnp.float32
    )
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)), (d,), jnp.float32)
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias


class T5LayerNorm(nn.Module):
  """T5's RMS norm: x / rms(x) * scale, no mean subtraction, no bias; float32."""

  eps: float = 1e-6

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param(
      "scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)), (x.shape[-1],), jnp.float32
    )
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps) * scale


def masked_attention(q, k, v, *, scale: float, bias=None, causal: bool = False):
  """q/k/v [B, L, H, Dh] -> [B, L, H, Dh]; logits and softmax in float32; bias [1|B, H, L, L]."""
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  if bias is not None:
    logits = logits + bias
  if causal:
    n = q.shape[1]
    allowed = jnp.tril(jnp.ones((n, n), bool))  # [Lq, Lk]: key position <= query position
    logits = jnp.where(allowed, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


# ---------------------------------------------------------------------------------------------
# CLIP
