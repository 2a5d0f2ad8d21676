"""CLIP's image tower and the two-tower CLIP model, inference only: what CLIP score and FID on
CLIP features need (the paper, section 5.1, ranks its formulations by both).

Numerically transformers' ``CLIPVisionModelWithProjection`` and ``CLIPModel`` (parity tests in
tests/test_clip_vision.py). Images come in already preprocessed (``sd3_jax.evaluation.
preprocess``: resize, centre crop, CLIP mean/std), channels last:

  CLIPVisionEncoder(config)(pixel_values [B, S, S, 3]) -> image embedding [B, projection_dim]
      = visual_projection(post_layernorm(CLS state of the last layer)), float32; with
      ``return_all=True`` a CLIPVisionOutput (hidden = last_hidden_state [B, 1 + N, D] without
      post-LN, pooled = post-LN CLS state [B, D], projected).
  CLIPModel(config)(pixel_values, input_ids) -> CLIPOutput(image_embeds, text_embeds,
      logit_scale); ``encode_image`` / ``encode_text`` run one tower. Embeddings are NOT
      normalised (transformers' get_image_features / get_text_features).

The vision transformer is pre-LN with a class token, learned positions, a LayerNorm before the
first layer (transformers' ``pre_layrnorm``, spelled as there) and bidirectional attention; its
layers are the text tower's (models/text_encoders.py). Parameter trees (kernels [in..., out...];
sd3_jax/convert/text_keys.py maps them to the transformers names):

  vision  class_embedding [D]; patch_embedding/kernel [P, P, 3, D] (the stride-P conv as a
          matmul over each patch); position_embedding/embedding [1 + N, D];
          pre_layrnorm/{scale, bias}; layers_{i}/... as the text tower; post_layernorm/{scale,
          bias}; visual_projection/kernel [D, projection_dim]
  CLIP    text_model/... (a CLIPTextEncoder), vision_model/... (a CLIPVisionEncoder),
          logit_scale [] (log of the contrastive temperature's inverse)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from sd3_jax.models.layers import ACTIVATIONS, Dense, Embed, LayerNorm, dataclass_from_dict, hf_get
from sd3_jax.models.text_encoders import CLIPEncoderLayer, CLIPTextConfig, CLIPTextEncoder

Dtype = Any

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # transformers' / OpenAI CLIP's normalisation
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  """A CLIP vision transformer + visual projection (defaults: ViT-B/32)."""

  hidden_size: int = 768
  intermediate_size: int = 3072
  num_layers: int = 12
  num_heads: int = 12
  image_size: int = 224
  patch_size: int = 32
  num_channels: int = 3
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  projection_dim: int = 512

  def __post_init__(self):
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"unsupported CLIP hidden_act {self.hidden_act!r}; known: {sorted(ACTIVATIONS)}")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
    if self.image_size % self.patch_size:
      raise ValueError(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def num_positions(self) -> int:
    return (self.image_size // self.patch_size) ** 2 + 1  # patches + the class token

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping) -> "CLIPVisionConfig":
    return dataclass_from_dict(cls, d)

  @classmethod
  def from_hf_config(cls, d: Mapping, **overrides) -> "CLIPVisionConfig":
    """From a transformers config.json dict: a CLIPVisionConfig (model_type 'clip_vision_model')
    or a full CLIPConfig (its vision_config and top-level projection_dim); missing keys take
    transformers' defaults."""
    projection_dim = None
    if d.get("model_type") == "clip" or "vision_config" in d:
      projection_dim = hf_get(d, "projection_dim", 512)
      d = d.get("vision_config") or {}
    kw = dict(
      hidden_size=hf_get(d, "hidden_size", 768),
      intermediate_size=hf_get(d, "intermediate_size", 3072),
      num_layers=hf_get(d, "num_hidden_layers", 12),
      num_heads=hf_get(d, "num_attention_heads", 12),
      image_size=hf_get(d, "image_size", 224),
      patch_size=hf_get(d, "patch_size", 32),
      num_channels=hf_get(d, "num_channels", 3),
      hidden_act=hf_get(d, "hidden_act", "quick_gelu"),
      layer_norm_eps=hf_get(d, "layer_norm_eps", 1e-5),
      projection_dim=projection_dim if projection_dim is not None else hf_get(d, "projection_dim", 512),
    )
    kw.update(overrides)
    return cls(**kw)

  def to_hf_config(self) -> dict:
    """config.json of the equivalent transformers CLIPVisionModelWithProjection."""
    return {
      "architectures": ["CLIPVisionModelWithProjection"],
      "model_type": "clip_vision_model",
      "hidden_size": self.hidden_size,
      "intermediate_size": self.intermediate_size,
      "num_hidden_layers": self.num_layers,
      "num_attention_heads": self.num_heads,
      "image_size": self.image_size,
      "patch_size": self.patch_size,
      "num_channels": self.num_channels,
      "hidden_act": self.hidden_act,
      "layer_norm_eps": self.layer_norm_eps,
      "projection_dim": self.projection_dim,
      "attention_dropout": 0.0,
      "dropout": 0.0,
      "initializer_factor": 1.0,
      "initializer_range": 0.02,
      "dtype": "float32",
    }


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """Both towers of a CLIP model; their projections share one embedding space."""

  text: CLIPTextConfig = CLIPTextConfig(
    hidden_size=512, intermediate_size=2048, num_heads=8, projection_dim=512, hidden_layer=-1
  )
  vision: CLIPVisionConfig = CLIPVisionConfig()
  logit_scale_init_value: float = 2.6592

  def __post_init__(self):
    if self.text.projection_dim != self.vision.projection_dim:
      raise ValueError(
        f"text projection_dim {self.text.projection_dim} != vision projection_dim "
        f"{self.vision.projection_dim}: the towers must share one embedding space"
      )

  @property
  def projection_dim(self) -> int:
    return self.vision.projection_dim

  def to_dict(self) -> dict:
    return {
      "text": self.text.to_dict(),
      "vision": self.vision.to_dict(),
      "logit_scale_init_value": self.logit_scale_init_value,
    }

  @classmethod
  def from_dict(cls, d: Mapping) -> "CLIPConfig":
    unknown = set(d) - {"text", "vision", "logit_scale_init_value"}
    if unknown:
      raise ValueError(f"unknown CLIPConfig keys {sorted(unknown)}")
    return cls(
      CLIPTextConfig.from_dict(d["text"]),
      CLIPVisionConfig.from_dict(d["vision"]),
      float(d.get("logit_scale_init_value", 2.6592)),
    )

  @classmethod
  def from_hf_config(cls, d: Mapping) -> "CLIPConfig":
    """From a transformers CLIPModel config.json dict."""
    return cls(
      CLIPTextConfig.from_hf_config(d, hidden_layer=-1),
      CLIPVisionConfig.from_hf_config(d),
      float(hf_get(d, "logit_scale_init_value", 2.6592)),
    )

  def to_hf_config(self) -> dict:
    """config.json of the equivalent transformers CLIPModel."""
    drop = ("architectures", "projection_dim", "dtype")
    text = {k: v for k, v in self.text.to_hf_config().items() if k not in drop}
    vision = {k: v for k, v in self.vision.to_hf_config().items() if k not in drop}
    return {
      "architectures": ["CLIPModel"],
      "model_type": "clip",
      "projection_dim": self.projection_dim,
      "logit_scale_init_value": self.logit_scale_init_value,
      "text_config": text,
      "vision_config": vision,
      "initializer_factor": 1.0,
      "dtype": "float32",
    }


# The two CLIPs the paper's protocol and clean-fid use (openai/clip-vit-base-patch32,
# openai/clip-vit-large-patch14 on the Hugging Face hub).
VIT_B_32 = CLIPConfig()
VIT_L_14 = CLIPConfig(
  CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_heads=12, projection_dim=768, hidden_layer=-1),
  CLIPVisionConfig(
    hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16, patch_size=14, projection_dim=768
  ),
)
PRESETS = {"vit_b_32": VIT_B_32, "vit_l_14": VIT_L_14}


class CLIPVisionOutput(NamedTuple):
  hidden: jax.Array  # [B, 1 + N, D] last layer, no post-LN (transformers' last_hidden_state)
  pooled: jax.Array  # [B, D] post-LN class token (pooler_output)
  projected: jax.Array  # [B, P] visual_projection(pooled) (image_embeds)


class CLIPOutput(NamedTuple):
  image_embeds: jax.Array  # [B, P], not normalised
  text_embeds: jax.Array  # [B, P], not normalised
  logit_scale: jax.Array  # [] (exp() of it scales the cosine similarities)


class CLIPVisionEncoder(nn.Module):
  """CLIP's vision transformer + visual projection (module docstring)."""

  config: CLIPVisionConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixel_values: jax.Array, return_all: bool = False):
    c = self.config
    want = (c.image_size, c.image_size, c.num_channels)
    if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != want:
      raise ValueError(
        f"pixel_values must be [B, {want[0]}, {want[1]}, {want[2]}] (channels last, "
        f"preprocessed), got shape {tuple(pixel_values.shape)}"
      )
    b, p, g = pixel_values.shape[0], c.patch_size, c.image_size // c.patch_size
    patches = pixel_values.astype(self.dtype).reshape(b, g, p, g, p, c.num_channels)
    patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(b, g * g, p, p, c.num_channels)  # row-major patches
    x = Dense(
      c.hidden_size, (None, None, None, "embed"), n_in=3, use_bias=False, dtype=self.dtype, name="patch_embedding"
    )(patches).astype(jnp.float32)  # [B, N, D]
    cls = self.param(
      "class_embedding",
      nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed",)),
      (c.hidden_size,),
      jnp.float32,
    )
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, c.hidden_size)), x], axis=1)
    x = (
      x
      + Embed(c.num_positions, c.hidden_size, (None, "embed"), name="position_embedding")(jnp.arange(c.num_positions))[
        None
      ]
    )
    x = LayerNorm(c.layer_norm_eps, name="pre_layrnorm")(x)
    for i in range(c.num_layers):
      x = CLIPEncoderLayer(c, self.dtype, causal=False, name=f"layers_{i}")(x)
    pooled = LayerNorm(c.layer_norm_eps, name="post_layernorm")(x[:, 0])
    projected = Dense(c.projection_dim, ("embed", None), use_bias=False, dtype=self.dtype, name="visual_projection")(
      pooled.astype(self.dtype)
    ).astype(jnp.float32)
    return CLIPVisionOutput(x, pooled, projected) if return_all else projected


class CLIPModel(nn.Module):
  """Both CLIP towers (module docstring)."""

  config: CLIPConfig
  dtype: Dtype = jnp.float32

  def setup(self):
    self.text_model = CLIPTextEncoder(self.config.text, self.dtype)
    self.vision_model = CLIPVisionEncoder(self.config.vision, self.dtype)
    self.logit_scale = self.param(
      "logit_scale",
      nn.with_logical_partitioning(nn.initializers.constant(self.config.logit_scale_init_value), ()),
      (),
      jnp.float32,
    )

  def encode_image(self, pixel_values: jax.Array) -> jax.Array:
    return self.vision_model(pixel_values)

  def encode_text(self, input_ids: jax.Array) -> jax.Array:
    return self.text_model(input_ids).projected

  def __call__(self, pixel_values: jax.Array, input_ids: jax.Array) -> CLIPOutput:
    return CLIPOutput(self.encode_image(pixel_values), self.encode_text(input_ids), self.logit_scale)


def build(config, dtype=jnp.float32) -> nn.Module:
  if isinstance(config, CLIPVisionConfig):
    return CLIPVisionEncoder(config, dtype=dtype)
  if isinstance(config, CLIPConfig):
    return CLIPModel(config, dtype=dtype)
  raise TypeError(f"not a CLIP vision or CLIP model config: {type(config).__name__}")


def _dummy_pixels(c: CLIPVisionConfig) -> jax.Array:
  return jnp.zeros((1, c.image_size, c.image_size, c.num_channels), jnp.float32)


def init_params(model: nn.Module, rng: jax.Array, boxed: bool = False):
  """Random float32 parameters of a CLIPVisionEncoder or CLIPModel; ``boxed`` keeps the
  logical-axis boxes."""
  if isinstance(model, CLIPModel):
    params = model.init(rng, _dummy_pixels(model.config.vision), jnp.zeros((1, 2), jnp.int32))["params"]
  else:
    params = model.init(rng, _dummy_pixels(model.config))["params"]
  return params if boxed else nn.unbox(params)


def abstract_params(model: nn.Module):
  """Shapes, dtypes and logical axes of the parameters without allocating them."""
  return jax.eval_shape(functools.partial(init_params, model, boxed=True), jax.random.key(0))
