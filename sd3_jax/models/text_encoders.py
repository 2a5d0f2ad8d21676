"""SD3's text encoders (the paper, section 5.2.1), inference only: the CLIP-L/14 and OpenCLIP
bigG/14 text transformers (``CLIPTextEncoder``), the presets of all three encoders with T5-v1.1-XXL
(``models/t5.py``), and building / initialising any of them from its config."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from sd3_jax.models.layers import ACTIVATIONS, Dense, Embed, LayerNorm, dataclass_from_dict, hf_get, masked_attention
from sd3_jax.models.field_checks import check_config
from sd3_jax.models.t5 import T5Encoder, T5EncoderConfig

Dtype = Any

LEGACY_CLIP_EOS_ID = 2  # transformers: this eos_token_id means "pool at argmax(input_ids)"


# ---------------------------------------------------------------------------------------------
# Configs


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """A CLIP text transformer (pre-LN, causal attention, learned positions) + text projection.

  eos_token_id picks the pooled position as transformers does: 2 (the value in the configs of
  CLIP-L and of SD3's encoders, from before transformers PR #24773) pools at
  ``argmax(input_ids)`` (EOS has the largest id in CLIP's vocabulary); any other value pools at
  the FIRST occurrence of that id. hidden_layer indexes transformers' ``hidden_states`` tuple
  (0 = embeddings, i = after layer i, negative from the end): -2 is SD3's choice.
  """

  vocab_size: int = 49408
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_layers: int = 12
  num_heads: int = 12
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  projection_dim: int = 768
  eos_token_id: int = LEGACY_CLIP_EOS_ID
  bos_token_id: int = 0
  pad_token_id: int = 1
  hidden_layer: int = -2

  def __post_init__(self):
    check_config(
      self,
      positive=(
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_layers",
        "num_heads",
        "max_position_embeddings",
        "projection_dim",
      ),
      non_negative=("eos_token_id", "bos_token_id", "pad_token_id"),
      positive_real=("layer_norm_eps",),
    )
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"unsupported CLIP hidden_act {self.hidden_act!r}; known: {sorted(ACTIVATIONS)}")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
    if not -(self.num_layers + 1) <= self.hidden_layer <= self.num_layers:
      raise ValueError(
        f"hidden_layer {self.hidden_layer} is out of range for {self.num_layers} layers "
        f"(transformers' hidden_states has {self.num_layers + 1} entries)"
      )

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping) -> "CLIPTextConfig":
    return dataclass_from_dict(cls, d)

  @classmethod
  def from_hf_config(cls, d: Mapping, **overrides) -> "CLIPTextConfig":
    """From a transformers config.json dict: a CLIPTextConfig (model_type 'clip_text_model') or
    a full CLIPConfig (model_type 'clip': its text_config and its top-level projection_dim).
    Missing keys take transformers' defaults."""
    projection_dim = None
    if d.get("model_type") == "clip" or "text_config" in d:
      projection_dim = hf_get(d, "projection_dim", 512)
      d = d.get("text_config") or {}
    kw = dict(
      vocab_size=hf_get(d, "vocab_size", 49408),
      hidden_size=hf_get(d, "hidden_size", 512),
      intermediate_size=hf_get(d, "intermediate_size", 2048),
      num_layers=hf_get(d, "num_hidden_layers", 12),
      num_heads=hf_get(d, "num_attention_heads", 8),
      max_position_embeddings=hf_get(d, "max_position_embeddings", 77),
      hidden_act=hf_get(d, "hidden_act", "quick_gelu"),
      layer_norm_eps=hf_get(d, "layer_norm_eps", 1e-5),
      projection_dim=projection_dim if projection_dim is not None else hf_get(d, "projection_dim", 512),
      eos_token_id=hf_get(d, "eos_token_id", 49407),
      bos_token_id=hf_get(d, "bos_token_id", 49406),
      pad_token_id=hf_get(d, "pad_token_id", 1),
    )
    kw.update(overrides)
    return cls(**kw)

  def to_hf_config(self) -> dict:
    """config.json of the equivalent transformers CLIPTextModelWithProjection."""
    return {
      "architectures": ["CLIPTextModelWithProjection"],
      "model_type": "clip_text_model",
      "vocab_size": self.vocab_size,
      "hidden_size": self.hidden_size,
      "intermediate_size": self.intermediate_size,
      "num_hidden_layers": self.num_layers,
      "num_attention_heads": self.num_heads,
      "max_position_embeddings": self.max_position_embeddings,
      "hidden_act": self.hidden_act,
      "layer_norm_eps": self.layer_norm_eps,
      "projection_dim": self.projection_dim,
      "eos_token_id": self.eos_token_id,
      "bos_token_id": self.bos_token_id,
      "pad_token_id": self.pad_token_id,
      "attention_dropout": 0.0,
      "dropout": 0.0,
      "initializer_factor": 1.0,
      "initializer_range": 0.02,
      "dtype": "float32",
    }


# SD3's encoders (the configs of stable-diffusion-3-medium-diffusers text_encoder{,_2,_3}).
CLIP_L = CLIPTextConfig()
CLIP_G = CLIPTextConfig(
  hidden_size=1280, intermediate_size=5120, num_layers=32, num_heads=20, hidden_act="gelu", projection_dim=1280
)
T5_XXL = T5EncoderConfig()
PRESETS = {"clip_l": CLIP_L, "clip_g": CLIP_G, "t5_xxl": T5_XXL}


def get_config(name: str):
  if name not in PRESETS:
    raise ValueError(f"unknown text encoder preset {name!r}; choose one of {sorted(PRESETS)}")
  return PRESETS[name]


class CLIPTextOutput(NamedTuple):
  hidden: jax.Array  # [B, L, D] hidden_states[config.hidden_layer], no final LN
  pooled: jax.Array  # [B, D] final-LN state at the EOS position
  projected: jax.Array  # [B, P] text_projection(pooled)


class CLIPEmbeddings(nn.Module):
  config: CLIPTextConfig

  @nn.compact
  def __call__(self, input_ids: jax.Array) -> jax.Array:  # [B, L] -> [B, L, D] float32
    c = self.config
    tok = Embed(c.vocab_size, c.hidden_size, name="token_embedding")(input_ids)
    pos = Embed(c.max_position_embeddings, c.hidden_size, (None, "embed"), name="position_embedding")(
      jnp.arange(input_ids.shape[1])
    )
    return tok + pos[None]


class CLIPAttention(nn.Module):
  """CLIP self-attention; ``causal`` for the text tower, bidirectional for the vision tower
  (models/clip_vision.py), which reuses these layers with its own config."""

  config: CLIPTextConfig
  dtype: Dtype = jnp.float32
  causal: bool = True

  @nn.compact
  def __call__(self, y: jax.Array) -> jax.Array:  # [B, L, D] -> [B, L, D]
    c = self.config
    h, dh = c.num_heads, c.head_dim
    q, k, v = (
      Dense((h, dh), ("embed", "heads", "kv"), dtype=self.dtype, name=f"{n}_proj")(y) for n in ("q", "k", "v")
    )  # each [B, L, H, Dh]
    o = masked_attention(q, k, v, scale=dh**-0.5, causal=self.causal)
    return Dense(c.hidden_size, ("heads", "kv", "embed"), n_in=2, dtype=self.dtype, name="out_proj")(o)


class CLIPMLP(nn.Module):
  config: CLIPTextConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, y: jax.Array) -> jax.Array:
    c = self.config
    y = Dense(c.intermediate_size, ("embed", "mlp"), dtype=self.dtype, name="fc1")(y)
    y = ACTIVATIONS[c.hidden_act](y)
    return Dense(c.hidden_size, ("mlp", "embed"), dtype=self.dtype, name="fc2")(y)


class CLIPEncoderLayer(nn.Module):
  config: CLIPTextConfig
  dtype: Dtype = jnp.float32
  causal: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:  # x [B, L, D]: float32 residual stream
    c = self.config
    y = LayerNorm(c.layer_norm_eps, name="layer_norm1")(x).astype(self.dtype)
    x = x + CLIPAttention(c, self.dtype, self.causal, name="self_attn")(y).astype(jnp.float32)
    y = LayerNorm(c.layer_norm_eps, name="layer_norm2")(x).astype(self.dtype)
    return x + CLIPMLP(c, self.dtype, name="mlp")(y).astype(jnp.float32)


class CLIPTextEncoder(nn.Module):
  """CLIP text transformer + projection: input_ids [B, L] (L <= max_position_embeddings) ->
  CLIPTextOutput (below). Outputs are float32.

  Numerically the transformers models ``CLIPTextModelWithProjection`` and ``T5EncoderModel``
  (transformers 5.24; parity tests in tests/test_text_encoders.py):

    CLIPTextEncoder(config)(input_ids [B, L]) -> CLIPTextOutput
        hidden     [B, L, D]  residual stream after ``config.hidden_layer`` (transformers'
                              ``hidden_states[hidden_layer]``; default -2 = penultimate layer),
                              WITHOUT the final LayerNorm: SD3's sequence features.
        pooled     [B, D]     final-LN state at the EOS position (``pooler_output``): SD3's CLIP-L
                              pooled vector (un-projected).
        projected  [B, P]     ``text_projection(pooled)`` (``text_embeds``): SD3's CLIP-G pooled.
    T5Encoder(config)(input_ids [B, L]) -> [B, L, d_model]   last hidden state (after the final
                              RMS norm); no attention mask (SD3 attends to pad tokens).

  Parameters are float32; ``dtype`` is the compute dtype of the matmuls. The residual stream,
  norms, softmax and T5's position bias stay float32 (T5-XXL overflows in float16; bfloat16
  compute is fine). Parameter trees (kernels [in..., out...];
  sd3_jax/convert/text_keys.py maps them to the transformers names):

    CLIP  embeddings/{token_embedding, position_embedding}/embedding
          layers_{i}/{layer_norm1, layer_norm2}/{scale, bias}
          layers_{i}/self_attn/{q_proj, k_proj, v_proj}/{kernel [D, H, Dh], bias [H, Dh]}
          layers_{i}/self_attn/out_proj/{kernel [H, Dh, D], bias [D]}
          layers_{i}/mlp/{fc1, fc2}/{kernel, bias}
          final_layer_norm/{scale, bias}, text_projection/kernel [D, P]
    T5    shared/embedding [V, D]; relative_attention_bias/embedding [buckets, H] (shared by all
          layers; transformers keeps it in block 0)
          blocks_{i}/attn_norm/scale, blocks_{i}/attn/{q, k, v}/kernel [D, H, Dkv],
          blocks_{i}/attn/o/kernel [H, Dkv, D]
          blocks_{i}/ffn_norm/scale, blocks_{i}/ffn/{wi_0, wi_1 (gated) | wi, wo}/kernel
          final_layer_norm/scale
  """

  config: CLIPTextConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids: jax.Array) -> CLIPTextOutput:
    c = self.config
    b, n = input_ids.shape
    if n > c.max_position_embeddings:
      raise ValueError(f"{n} tokens exceed max_position_embeddings {c.max_position_embeddings}")
    x = CLIPEmbeddings(c, name="embeddings")(input_ids)
    want = c.hidden_layer % (c.num_layers + 1)  # index into (embeddings, layer 1, ..., layer N)
    hidden = x
    for i in range(c.num_layers):
      x = CLIPEncoderLayer(c, self.dtype, name=f"layers_{i}")(x)
      if i + 1 == want:
        hidden = x
    x = LayerNorm(c.layer_norm_eps, name="final_layer_norm")(x)
    if c.eos_token_id == LEGACY_CLIP_EOS_ID:
      pos = jnp.argmax(input_ids, axis=-1)  # first maximum, as torch.argmax
    else:
      pos = jnp.argmax(input_ids == c.eos_token_id, axis=-1)  # first EOS (0 when there is none)
    pooled = x[jnp.arange(b), pos]  # [B, D]
    projected = Dense(c.projection_dim, ("embed", None), use_bias=False, dtype=self.dtype, name="text_projection")(
      pooled.astype(self.dtype)
    )
    return CLIPTextOutput(hidden, pooled, projected.astype(jnp.float32))


def build(config, dtype=jnp.float32) -> nn.Module:
  """The module of a config: CLIPTextConfig -> CLIPTextEncoder, T5EncoderConfig -> T5Encoder."""
  if isinstance(config, CLIPTextConfig):
    return CLIPTextEncoder(config, dtype=dtype)
  if isinstance(config, T5EncoderConfig):
    return T5Encoder(config, dtype=dtype)
  raise TypeError(f"not a text encoder config: {type(config).__name__}")


def init_params(model: nn.Module, rng: jax.Array, boxed: bool = False):
  """Random float32 parameters; ``boxed`` keeps the logical-axis boxes."""
  params = model.init(rng, jnp.zeros((1, 2), jnp.int32))["params"]
  return params if boxed else nn.unbox(params)


def abstract_params(model: nn.Module):
  """Shapes, dtypes and logical axes of the parameters without allocating them."""
  return jax.eval_shape(functools.partial(init_params, model, boxed=True), jax.random.key(0))
