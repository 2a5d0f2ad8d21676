"""Key tables and tensor transforms between transformers' text encoders and CLIP models and
ours (sd3_jax/models/text_encoders.py, sd3_jax/models/clip_vision.py), plus model detection
from a transformers config.json.

  transformers (torch)                                      ours
  CLIP  [text_model.]embeddings.{token,position}_embedding.weight   embeddings/..._embedding/embedding
        [text_model.]encoder.layers.N.self_attn.{q,k,v}_proj.weight  layers_N/self_attn/{q,k,v}_proj/kernel
              [H*Dh, D] -> [D, H, Dh]; .bias [H*Dh] -> [H, Dh]
        ...self_attn.out_proj.weight [D, H*Dh] -> [H, Dh, D]; .bias as is
        ...layer_norm{1,2}.{weight,bias}                             layers_N/layer_norm{1,2}/{scale,bias}
        ...mlp.fc{1,2}.{weight,bias}  (Linear [out, in] -> [in, out]) layers_N/mlp/fc{1,2}/{kernel,bias}
        [text_model.]final_layer_norm.{weight,bias}                  final_layer_norm/{scale,bias}
        text_projection.weight [P, D] -> [D, P]                      text_projection/kernel
  T5    shared.weight (or its tie encoder.embed_tokens.weight)       shared/embedding
        encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight
                                                                     relative_attention_bias/embedding
        encoder.block.N.layer.0.SelfAttention.{q,k,v}.weight         blocks_N/attn/{q,k,v}/kernel
              [H*Dkv, D] -> [D, H, Dkv]
        encoder.block.N.layer.0.SelfAttention.o.weight               blocks_N/attn/o/kernel
              [D, H*Dkv] -> [H, Dkv, D]
        encoder.block.N.layer.0.layer_norm.weight                    blocks_N/attn_norm/scale
        encoder.block.N.layer.1.DenseReluDense.{wi_0,wi_1,wi,wo}.weight   blocks_N/ffn/{...}/kernel
        encoder.block.N.layer.1.layer_norm.weight                    blocks_N/ffn_norm/scale
        encoder.final_layer_norm.weight                              final_layer_norm/scale
  CLIP image tower (CLIPVisionModelWithProjection; in a CLIPModel too, ours under vision_model/)
        vision_model.embeddings.class_embedding                      class_embedding
        vision_model.embeddings.patch_embedding.weight [D, 3, P, P] -> [P, P, 3, D]
                                                                     patch_embedding/kernel
        vision_model.embeddings.position_embedding.weight            position_embedding/embedding
        vision_model.{pre_layrnorm,post_layernorm}.{weight,bias}     {pre_layrnorm,post_layernorm}/...
        vision_model.encoder.layers.N.*                              layers_N/* (as the text tower)
        visual_projection.weight [P, D] -> [D, P]                    visual_projection/kernel
  CLIPModel  the text tower (ours under text_model/), the image tower, logit_scale -> logit_scale

Every tensor maps to exactly one tensor by a transpose and/or reshape, so conversions are
bit-exact and run one tensor at a time (``to_ours`` / ``to_hf``). Tensors of the other half of
a model (a CLIPModel's vision tower when only its text tower is read, T5's decoder and lm_head)
and non-persistent buffers (position_ids) are ignored; anything else unknown is reported.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterable, Mapping

import numpy as np

from sd3_jax.convert.safetensors_io import as_numpy, check_float_dtypes
from sd3_jax.models.clip_vision import CLIPConfig, CLIPVisionConfig
from sd3_jax.models.text_encoders import CLIPTextConfig, T5EncoderConfig
from sd3_jax.storage import trees

CLIP_PREFIX = "text_model."
VISION_PREFIX = "vision_model."
# Tensors of a transformers checkpoint that are not part of the text encoder.
_CLIP_IGNORED = re.compile(
  r"^(vision_model\.|visual_projection\.|logit_scale$|(text_model\.)?embeddings\.position_ids$)"
)
_T5_IGNORED = re.compile(r"^(decoder\.|lm_head\.)")
_CLIP_MODEL_IGNORED = re.compile(r"^(text_model\.|vision_model\.)embeddings\.position_ids$")
T5_EMBED_KEYS = ("shared.weight", "encoder.embed_tokens.weight")

CLIP_ARCHITECTURES = ("CLIPTextModelWithProjection", "CLIPTextModel")
CLIP_VISION_ARCHITECTURES = ("CLIPVisionModelWithProjection",)
CLIP_MODEL_ARCHITECTURES = ("CLIPModel",)
T5_ARCHITECTURES = ("T5EncoderModel", "T5ForConditionalGeneration", "T5Model")


@dataclasses.dataclass(frozen=True)
class Entry:
  hf: str  # transformers name (CLIP: with the text_model. prefix)
  ours: str  # flat parameter name "a/b/kernel"
  op: str  # copy | linear | heads_in | heads_out | bias_heads
  ours_shape: tuple[int, ...]
  hf_shape: tuple[int, ...]


def _linear(hf, ours, n_in, n_out):
  return Entry(hf, ours, "linear", (n_in, n_out), (n_out, n_in))


def clip_layer_entries(hp: str, op: str, d: int, h: int, dh: int, f: int) -> list[Entry]:
  """One CLIP transformer layer (text or vision tower): transformers prefix ``hp``
  ('...encoder.layers.N.'), ours ``op`` ('.../layers_N/')."""
  es = []
  for n in ("q", "k", "v"):
    es.append(
      Entry(f"{hp}self_attn.{n}_proj.weight", f"{op}self_attn/{n}_proj/kernel", "heads_in", (d, h, dh), (h * dh, d))
    )
    es.append(Entry(f"{hp}self_attn.{n}_proj.bias", f"{op}self_attn/{n}_proj/bias", "bias_heads", (h, dh), (h * dh,)))
  es.append(
    Entry(f"{hp}self_attn.out_proj.weight", f"{op}self_attn/out_proj/kernel", "heads_out", (h, dh, d), (d, h * dh))
  )
  es.append(Entry(f"{hp}self_attn.out_proj.bias", f"{op}self_attn/out_proj/bias", "copy", (d,), (d,)))
  for n in ("layer_norm1", "layer_norm2"):
    es.append(Entry(f"{hp}{n}.weight", f"{op}{n}/scale", "copy", (d,), (d,)))
    es.append(Entry(f"{hp}{n}.bias", f"{op}{n}/bias", "copy", (d,), (d,)))
  es.append(_linear(f"{hp}mlp.fc1.weight", f"{op}mlp/fc1/kernel", d, f))
  es.append(Entry(f"{hp}mlp.fc1.bias", f"{op}mlp/fc1/bias", "copy", (f,), (f,)))
  es.append(_linear(f"{hp}mlp.fc2.weight", f"{op}mlp/fc2/kernel", f, d))
  es.append(Entry(f"{hp}mlp.fc2.bias", f"{op}mlp/fc2/bias", "copy", (d,), (d,)))
  return es


def _norm(hf: str, ours: str, d: int) -> list[Entry]:
  return [
    Entry(f"{hf}.weight", f"{ours}/scale", "copy", (d,), (d,)),
    Entry(f"{hf}.bias", f"{ours}/bias", "copy", (d,), (d,)),
  ]


def clip_entries(c: CLIPTextConfig, ours_prefix: str = "") -> list[Entry]:
  d, h, dh, f = c.hidden_size, c.num_heads, c.head_dim, c.intermediate_size
  p, o = CLIP_PREFIX, ours_prefix
  es = [
    Entry(
      p + "embeddings.token_embedding.weight",
      o + "embeddings/token_embedding/embedding",
      "copy",
      (c.vocab_size, d),
      (c.vocab_size, d),
    ),
    Entry(
      p + "embeddings.position_embedding.weight",
      o + "embeddings/position_embedding/embedding",
      "copy",
      (c.max_position_embeddings, d),
      (c.max_position_embeddings, d),
    ),
  ]
  for i in range(c.num_layers):
    es += clip_layer_entries(f"{p}encoder.layers.{i}.", f"{o}layers_{i}/", d, h, dh, f)
  es += _norm(p + "final_layer_norm", o + "final_layer_norm", d)
  es.append(_linear("text_projection.weight", o + "text_projection/kernel", d, c.projection_dim))
  return es


def clip_vision_entries(c: CLIPVisionConfig, ours_prefix: str = "") -> list[Entry]:
  """CLIPVisionModelWithProjection (models/clip_vision.py CLIPVisionEncoder)."""
  d, h, dh, f, p = c.hidden_size, c.num_heads, c.head_dim, c.intermediate_size, c.patch_size
  v, o = VISION_PREFIX, ours_prefix
  es = [
    Entry(v + "embeddings.class_embedding", o + "class_embedding", "copy", (d,), (d,)),
    Entry(
      v + "embeddings.patch_embedding.weight",
      o + "patch_embedding/kernel",
      "conv",
      (p, p, c.num_channels, d),
      (d, c.num_channels, p, p),
    ),
    Entry(
      v + "embeddings.position_embedding.weight",
      o + "position_embedding/embedding",
      "copy",
      (c.num_positions, d),
      (c.num_positions, d),
    ),
  ]
  es += _norm(v + "pre_layrnorm", o + "pre_layrnorm", d)
  for i in range(c.num_layers):
    es += clip_layer_entries(f"{v}encoder.layers.{i}.", f"{o}layers_{i}/", d, h, dh, f)
  es += _norm(v + "post_layernorm", o + "post_layernorm", d)
  es.append(_linear("visual_projection.weight", o + "visual_projection/kernel", d, c.projection_dim))
  return es


def clip_model_entries(c: CLIPConfig) -> list[Entry]:
  """CLIPModel (models/clip_vision.py CLIPModel): both towers and logit_scale."""
  return (
    clip_entries(c.text, "text_model/")
    + clip_vision_entries(c.vision, "vision_model/")
    + [Entry("logit_scale", "logit_scale", "copy", (), ())]
  )


def t5_entries(c: T5EncoderConfig) -> list[Entry]:
  d, h, dk, f = c.d_model, c.num_heads, c.d_kv, c.d_ff
  es = [
    Entry("shared.weight", "shared/embedding", "copy", (c.vocab_size, d), (c.vocab_size, d)),
    Entry(
      "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
      "relative_attention_bias/embedding",
      "copy",
      (c.relative_attention_num_buckets, h),
      (c.relative_attention_num_buckets, h),
    ),
  ]
  for i in range(c.num_layers):
    hp, op = f"encoder.block.{i}.layer.", f"blocks_{i}/"
    for n in ("q", "k", "v"):
      es.append(Entry(f"{hp}0.SelfAttention.{n}.weight", f"{op}attn/{n}/kernel", "heads_in", (d, h, dk), (h * dk, d)))
    es.append(Entry(f"{hp}0.SelfAttention.o.weight", f"{op}attn/o/kernel", "heads_out", (h, dk, d), (d, h * dk)))
    es.append(Entry(f"{hp}0.layer_norm.weight", f"{op}attn_norm/scale", "copy", (d,), (d,)))
    for n in ("wi_0", "wi_1") if c.is_gated else ("wi",):
      es.append(_linear(f"{hp}1.DenseReluDense.{n}.weight", f"{op}ffn/{n}/kernel", d, f))
    es.append(_linear(f"{hp}1.DenseReluDense.wo.weight", f"{op}ffn/wo/kernel", f, d))
    es.append(Entry(f"{hp}1.layer_norm.weight", f"{op}ffn_norm/scale", "copy", (d,), (d,)))
  es.append(Entry("encoder.final_layer_norm.weight", "final_layer_norm/scale", "copy", (d,), (d,)))
  return es


def entries(config) -> list[Entry]:
  if isinstance(config, CLIPTextConfig):
    return clip_entries(config)
  if isinstance(config, CLIPVisionConfig):
    return clip_vision_entries(config)
  if isinstance(config, CLIPConfig):
    return clip_model_entries(config)
  if isinstance(config, T5EncoderConfig):
    return t5_entries(config)
  raise TypeError(f"not a text encoder config: {type(config).__name__}")


def to_ours(e: Entry, x: np.ndarray) -> np.ndarray:
  if e.op in ("copy", "bias_heads"):
    return x.reshape(e.ours_shape)
  if e.op == "conv":  # torch Conv2d [out, in, kh, kw] -> [kh, kw, in, out]
    return x.transpose(2, 3, 1, 0)
  if e.op in ("linear", "heads_in", "heads_out"):
    return x.T.reshape(e.ours_shape)  # [out, in] -> [in, out] -> split heads
  raise ValueError(f"unknown op {e.op}")


def to_hf(e: Entry, x: np.ndarray) -> np.ndarray:
  if e.op in ("copy", "bias_heads"):
    return x.reshape(e.hf_shape)
  if e.op == "linear":
    return x.T
  if e.op == "conv":
    return x.transpose(3, 2, 0, 1)
  if e.op == "heads_in":  # [D, H, Dh] -> [D, H*Dh] -> [H*Dh, D]
    return x.reshape(x.shape[0], -1).T
  if e.op == "heads_out":  # [H, Dh, D] -> [H*Dh, D] -> [D, H*Dh]
    return x.reshape(-1, x.shape[-1]).T
  raise ValueError(f"unknown op {e.op}")


# ---------------------------------------------------------------------------------------------
# Detection and naming


def model_kind(hf_config: Mapping) -> str | None:
  """'clip_text', 't5_encoder', 'clip' (both towers) or 'clip_vision' for a transformers
  config.json we can convert, else None."""
  archs = tuple(hf_config.get("architectures") or ())
  mt = hf_config.get("model_type")
  if mt == "clip" or any(a in CLIP_MODEL_ARCHITECTURES for a in archs):
    return "clip"
  if mt == "clip_vision_model" or any(a in CLIP_VISION_ARCHITECTURES for a in archs):
    return "clip_vision"
  if mt == "clip_text_model" or any(a in CLIP_ARCHITECTURES for a in archs):
    return "clip_text"
  if mt == "t5" or any(a in T5_ARCHITECTURES for a in archs):
    return "t5_encoder"
  return None


def config_from_hf(hf_config: Mapping, source: str = "config.json"):
  kind = model_kind(hf_config)
  try:
    if kind == "clip_text":
      return CLIPTextConfig.from_hf_config(hf_config)
    if kind == "t5_encoder":
      return T5EncoderConfig.from_hf_config(hf_config)
    if kind == "clip":
      return CLIPConfig.from_hf_config(hf_config)
    if kind == "clip_vision":
      return CLIPVisionConfig.from_hf_config(hf_config)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{source}: {e}") from None
  raise ValueError(
    f"{source}: not a text encoder we convert (model_type {hf_config.get('model_type')!r}, "
    f"architectures {hf_config.get('architectures')}); expected a CLIP text model "
    f"({', '.join(CLIP_ARCHITECTURES)}), a T5 encoder ({', '.join(T5_ARCHITECTURES)}), "
    f"a CLIP image tower ({', '.join(CLIP_VISION_ARCHITECTURES)}) or a CLIPModel"
  )


def has_projection(hf_config: Mapping) -> bool:
  """False for a bare CLIPTextModel (no text_projection tensor)."""
  archs = tuple(hf_config.get("architectures") or ())
  return not (archs and all(a == "CLIPTextModel" for a in archs))


def canonical_names(keys: Iterable[str], config) -> tuple[dict[str, str], list[str]]:
  """Stored key -> entry name (``Entry.hf``), and the ignored keys.

  CLIP keys may lack the ``text_model.`` prefix (a saved CLIPTextModel); T5's embedding may be
  stored as shared.weight, encoder.embed_tokens.weight or both (tied; the first is used, and
  the other is checked equal by ``TextSource``). Unknown keys are kept so that validation
  reports them as unexpected."""
  out, ignored = {}, []
  if isinstance(config, (CLIPConfig, CLIPVisionConfig)):  # stored under their full names
    for k in keys:
      if _CLIP_MODEL_IGNORED.match(k):
        ignored.append(k)
      else:
        out[k] = k
    return out, ignored
  is_clip = isinstance(config, CLIPTextConfig)
  for k in keys:
    if (_CLIP_IGNORED if is_clip else _T5_IGNORED).match(k):
      ignored.append(k)
      continue
    name = k
    if is_clip and k != "text_projection.weight" and not k.startswith(CLIP_PREFIX):
      name = CLIP_PREFIX + k
    if not is_clip and k in T5_EMBED_KEYS:
      name = "shared.weight"
    if name in out:
      if not is_clip and name == "shared.weight":
        ignored.append(k)  # the tie; compared in TextSource
        continue
      raise ValueError(f"tensor {name!r} is stored both as {out[name]!r} and as {k!r}")
    out[name] = k
  return out, ignored


# ---------------------------------------------------------------------------------------------
# Sources: named tensors of one model, validated up front, served one at a time


class TextSource:
  """A text encoder's tensors in transformers naming (``read_hf``) or ours (``read_ours``),
  validated against the config on construction; reads are lazy, one tensor at a time."""

  def __init__(
    self,
    config,
    *,
    hf_shapes: Mapping[str, tuple] | None = None,
    hf_dtypes: Mapping[str, np.dtype] | None = None,
    read_hf: Callable[[str], np.ndarray] | None = None,
    ours_shapes: Mapping[str, tuple] | None = None,
    ours_dtypes: Mapping[str, np.dtype] | None = None,
    read_ours: Callable[[str], np.ndarray] | None = None,
    description: str = "text encoder",
  ):
    if (read_hf is None) == (read_ours is None):
      raise ValueError("give exactly one of read_hf / read_ours")
    self.config, self.description = config, description
    self.entries = entries(config)
    self._by_hf = {e.hf: e for e in self.entries}
    self._by_ours = {e.ours: e for e in self.entries}
    if read_hf is not None:
      trees.check_shapes(hf_shapes, {e.hf: e.hf_shape for e in self.entries}, description)
      self._dtypes = {e.ours: np.dtype(hf_dtypes[e.hf]) for e in self.entries}
    else:
      trees.check_shapes(ours_shapes, {e.ours: e.ours_shape for e in self.entries}, description)
      self._dtypes = {e.ours: np.dtype(ours_dtypes[e.ours]) for e in self.entries}
    check_float_dtypes(self._dtypes, description)
    self._read_hf, self._read_ours = read_hf, read_ours

  def dtype(self, ours: str) -> np.dtype:
    return self._dtypes[ours]

  def read_ours(self, name: str) -> np.ndarray:
    if self._read_ours is not None:
      return self._read_ours(name)
    e = self._by_ours[name]
    return to_ours(e, self._read_hf(e.hf))

  def read_hf(self, name: str) -> np.ndarray:
    if self._read_hf is not None:
      return self._read_hf(name)
    e = self._by_hf[name]
    return to_hf(e, self._read_ours(e.ours))


def source_from_hf_tensors(
  config,
  shapes: Mapping[str, tuple],
  dtypes: Mapping[str, np.dtype],
  read: Callable[[str], np.ndarray],
  *,
  projection: bool = True,
  description: str = "transformers state dict",
) -> TextSource:
  """A TextSource over stored transformers tensors (keys as stored; see canonical_names).

  projection=False (a bare CLIPTextModel): text_projection is the identity, as diffusers'
  single-file loader does for SD3's CLIP-L; needs projection_dim == hidden."""
  names, ignored = canonical_names(shapes, config)
  embed_keys = [k for k in T5_EMBED_KEYS if k in shapes] if isinstance(config, T5EncoderConfig) else []
  hf_shapes = {n: tuple(shapes[k]) for n, k in names.items()}
  hf_dtypes = {n: np.dtype(dtypes[k]) for n, k in names.items()}
  eye = None
  if isinstance(config, CLIPTextConfig) and not projection:
    if "text_projection.weight" in names:
      raise ValueError(f"{description}: a CLIPTextModel checkpoint holds a text_projection tensor")
    if config.projection_dim != config.hidden_size:
      raise ValueError(
        f"{description}: no text_projection, but projection_dim {config.projection_dim} "
        f"!= hidden_size {config.hidden_size}; cannot use the identity"
      )
    eye = "text_projection.weight"
    hf_shapes[eye] = (config.hidden_size, config.hidden_size)
    hf_dtypes[eye] = hf_dtypes.get(CLIP_PREFIX + "final_layer_norm.weight", np.dtype(np.float32))

  def read_hf(name):
    if name == eye:
      return np.eye(config.hidden_size, dtype=hf_dtypes[eye])
    x = read(names[name])
    if name == "shared.weight" and len(embed_keys) == 2:
      other = read(embed_keys[1] if names[name] == embed_keys[0] else embed_keys[0])
      if other.shape != x.shape or not np.array_equal(other, x):
        raise ValueError(
          f"{description}: shared.weight and encoder.embed_tokens.weight differ; "
          "T5EncoderModel ties them, so this checkpoint is inconsistent"
        )
    return x

  return TextSource(config, hf_shapes=hf_shapes, hf_dtypes=hf_dtypes, read_hf=read_hf, description=description)


def _contiguous(a: np.ndarray) -> np.ndarray:
  """np.ascontiguousarray, keeping 0-d arrays (CLIP's logit_scale) 0-d."""
  return np.ascontiguousarray(a).reshape(a.shape)


def state_dict_to_params(state_dict: Mapping, hf_config: Mapping, *, dtype=None):
  """In-memory transformers state dict (torch or numpy) + its config dict -> (config, params).

  params is our nested parameter tree of numpy arrays (source dtypes unless ``dtype``)."""
  config = config_from_hf(hf_config)
  arrays = {k: as_numpy(v) for k, v in state_dict.items()}
  src = source_from_hf_tensors(
    config,
    {k: a.shape for k, a in arrays.items()},
    {k: a.dtype for k, a in arrays.items()},
    arrays.__getitem__,
    projection=has_projection(hf_config),
  )
  flat = {}
  for e in src.entries:
    a = src.read_ours(e.ours)
    flat[e.ours] = _contiguous(a.astype(dtype or a.dtype, copy=False))
  return config, trees.unflatten(flat)


def params_to_state_dict(params: Mapping, config, *, dtype=None) -> dict[str, np.ndarray]:
  """Our parameters -> transformers state dict (CLIPTextModelWithProjection / T5EncoderModel
  names, loadable with ``load_state_dict``), numpy arrays."""
  flat = {k: np.asarray(v) for k, v in trees.flatten(params).items()}
  src = TextSource(
    config,
    ours_shapes={k: a.shape for k, a in flat.items()},
    ours_dtypes={k: a.dtype for k, a in flat.items()},
    read_ours=flat.__getitem__,
    description="parameters",
  )
  out = {}
  for e in src.entries:
    a = src.read_hf(e.hf)
    out[e.hf] = _contiguous(a.astype(dtype or a.dtype, copy=False))
  return out
