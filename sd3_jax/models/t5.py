"""The T5 encoder stack (T5-v1.1-XXL is SD3's third text encoder), inference only, numerically
transformers' ``T5EncoderModel``: ``T5Encoder(config)(input_ids [B, L]) -> [B, L, d_model]``, the
last hidden state after the final RMS norm, with no attention mask (SD3 attends to pad tokens).
Norms, softmax and the position bias stay float32 (T5-XXL overflows in float16).
The parameter layout is in ``sd3_jax.models.text_encoders``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from sd3_jax.models.field_checks import check_config
from sd3_jax.models.layers import ACTIVATIONS, Dense, Embed, T5LayerNorm, dataclass_from_dict, hf_get, masked_attention

Dtype = Any


@dataclasses.dataclass(frozen=True)
class T5EncoderConfig:
  """A T5 encoder stack (pre-RMS-norm, relative position bias, unscaled attention logits).

  feed_forward_proj as in transformers: 'gated-gelu' (T5 v1.1: GELU-tanh gate times a linear,
  no biases), 'relu' (T5 v1.0), or '[gated-]{relu,gelu,gelu_new,silu}'.
  """

  vocab_size: int = 32128
  d_model: int = 4096
  d_kv: int = 64
  d_ff: int = 10240
  num_layers: int = 24
  num_heads: int = 64
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  feed_forward_proj: str = "gated-gelu"

  def __post_init__(self):
    check_config(
      self,
      positive=(
        "vocab_size",
        "d_model",
        "d_kv",
        "d_ff",
        "num_layers",
        "num_heads",
        "relative_attention_num_buckets",
        "relative_attention_max_distance",
      ),
      positive_real=("layer_norm_epsilon",),
    )
    self.activation  # validates feed_forward_proj

  @property
  def is_gated(self) -> bool:
    return self.feed_forward_proj.split("-")[0] == "gated"

  @property
  def activation(self) -> str:
    parts = self.feed_forward_proj.split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
      raise ValueError(f"feed_forward_proj {self.feed_forward_proj!r} is not '[gated-]ACT'")
    if self.feed_forward_proj == "gated-gelu":
      return "gelu_new"  # transformers' special case: T5 v1.1 uses the tanh approximation
    if parts[-1] not in ACTIVATIONS:
      raise ValueError(f"unsupported T5 activation {parts[-1]!r} in {self.feed_forward_proj!r}")
    return parts[-1]

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping) -> "T5EncoderConfig":
    return dataclass_from_dict(cls, d)

  @classmethod
  def from_hf_config(cls, d: Mapping, **overrides) -> "T5EncoderConfig":
    """From a transformers T5Config dict (missing keys take transformers' defaults)."""
    if d.get("is_decoder"):
      raise ValueError("this is a T5 decoder config (is_decoder=True); only the encoder is supported")
    kw = dict(
      vocab_size=hf_get(d, "vocab_size", 32128),
      d_model=hf_get(d, "d_model", 512),
      d_kv=hf_get(d, "d_kv", 64),
      d_ff=hf_get(d, "d_ff", 2048),
      num_layers=hf_get(d, "num_layers", 6),
      num_heads=hf_get(d, "num_heads", 8),
      relative_attention_num_buckets=hf_get(d, "relative_attention_num_buckets", 32),
      relative_attention_max_distance=hf_get(d, "relative_attention_max_distance", 128),
      layer_norm_epsilon=hf_get(d, "layer_norm_epsilon", 1e-6),
      feed_forward_proj=hf_get(d, "feed_forward_proj", "relu"),
    )
    kw.update(overrides)
    return cls(**kw)

  def to_hf_config(self) -> dict:
    """config.json of the equivalent transformers T5EncoderModel."""
    return {
      "architectures": ["T5EncoderModel"],
      "model_type": "t5",
      "vocab_size": self.vocab_size,
      "d_model": self.d_model,
      "d_kv": self.d_kv,
      "d_ff": self.d_ff,
      "num_layers": self.num_layers,
      "num_heads": self.num_heads,
      "relative_attention_num_buckets": self.relative_attention_num_buckets,
      "relative_attention_max_distance": self.relative_attention_max_distance,
      "layer_norm_epsilon": self.layer_norm_epsilon,
      "feed_forward_proj": self.feed_forward_proj,
      "is_encoder_decoder": False,
      "use_cache": False,
      "dropout_rate": 0.0,
      "pad_token_id": 0,
      "eos_token_id": 1,
      "decoder_start_token_id": 0,
      "initializer_factor": 1.0,
      "dtype": "float32",
    }


def relative_position_buckets(
  query_length: int, key_length: int, num_buckets: int = 32, max_distance: int = 128, bidirectional: bool = True
) -> np.ndarray:
  """[Lq, Lk] int32 bucket of (key position - query position), exactly as transformers'
  T5Attention._relative_position_bucket (float32 log, truncation toward zero)."""
  rel = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]
  buckets = np.zeros_like(rel)
  if bidirectional:
    num_buckets //= 2
    buckets += (rel > 0).astype(rel.dtype) * num_buckets
    rel = np.abs(rel)
  else:
    rel = -np.minimum(rel, 0)
  max_exact = num_buckets // 2
  is_small = rel < max_exact
  with np.errstate(divide="ignore"):
    large = (
      np.log(rel.astype(np.float32) / np.float32(max_exact))
      / np.float32(math.log(max_distance / max_exact))
      * np.float32(num_buckets - max_exact)
    )
  large = max_exact + np.where(is_small, 0, large).astype(np.int64)
  large = np.minimum(large, num_buckets - 1)
  return (buckets + np.where(is_small, rel, large)).astype(np.int32)


class T5Attention(nn.Module):
  config: T5EncoderConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, y: jax.Array, position_bias: jax.Array) -> jax.Array:
    c = self.config
    q, k, v = (
      Dense((c.num_heads, c.d_kv), ("embed", "heads", "kv"), use_bias=False, dtype=self.dtype, name=n)(y)
      for n in ("q", "k", "v")
    )  # each [B, L, H, Dkv]
    o = masked_attention(q, k, v, scale=1.0, bias=position_bias)  # T5 does not scale the logits
    return Dense(c.d_model, ("heads", "kv", "embed"), n_in=2, use_bias=False, dtype=self.dtype, name="o")(o)


class T5FeedForward(nn.Module):
  config: T5EncoderConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, y: jax.Array) -> jax.Array:
    c = self.config
    act = ACTIVATIONS[c.activation]

    def wi(name):
      return Dense(c.d_ff, ("embed", "mlp"), use_bias=False, dtype=self.dtype, name=name)

    h = act(wi("wi_0")(y)) * wi("wi_1")(y) if c.is_gated else act(wi("wi")(y))
    return Dense(c.d_model, ("mlp", "embed"), use_bias=False, dtype=self.dtype, name="wo")(h)


class T5Block(nn.Module):
  config: T5EncoderConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, position_bias: jax.Array) -> jax.Array:  # x [B, L, D] float32
    c = self.config
    y = T5LayerNorm(c.layer_norm_epsilon, name="attn_norm")(x).astype(self.dtype)
    x = x + T5Attention(c, self.dtype, name="attn")(y, position_bias).astype(jnp.float32)
    y = T5LayerNorm(c.layer_norm_epsilon, name="ffn_norm")(x).astype(self.dtype)
    return x + T5FeedForward(c, self.dtype, name="ffn")(y).astype(jnp.float32)


class T5Encoder(nn.Module):
  """T5 encoder: input_ids [B, L] -> last hidden state [B, L, d_model] float32 (no mask)."""

  config: T5EncoderConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids: jax.Array) -> jax.Array:
    c = self.config
    n = input_ids.shape[1]
    x = Embed(c.vocab_size, c.d_model, name="shared")(input_ids)  # [B, L, D], no sqrt(d) scaling
    buckets = relative_position_buckets(
      n, n, c.relative_attention_num_buckets, c.relative_attention_max_distance
    )  # static [L, L]
    table = Embed(c.relative_attention_num_buckets, c.num_heads, (None, "heads"), name="relative_attention_bias")(
      jnp.asarray(buckets)
    )  # [L, L, H]
    position_bias = jnp.transpose(table, (2, 0, 1))[None]  # [1, H, L, L]: computed once, shared
    for i in range(c.num_layers):
      x = T5Block(c, self.dtype, name=f"blocks_{i}")(x, position_bias)
    return T5LayerNorm(c.layer_norm_epsilon, name="final_layer_norm")(x)


# ---------------------------------------------------------------------------------------------
# Construction helpers
