"""Shared primitives with logical axis names: dense layers, norms, attention, embeddings.

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
