"""Key table and tensor transforms between our VAE parameter tree (sd3_jax/models/vae.py),
diffusers' AutoencoderKL and the original LDM layout of the SD3 single file
(``first_stage_model.*``), plus config inference from shapes.

One ``Entry`` per tensor names it in all three layouts; every op is a transpose or a reshape,
so conversions are bit-exact:

  ours                       diffusers                              original (LDM)
  .../conv1/kernel [3,3,I,O] encoder.down_blocks.{i}.resnets.{j}.   encoder.down.{i}.block.{j}.
                             conv1.weight [O,I,3,3]                 conv1.weight [O,I,3,3]
  .../conv_shortcut          ...conv_shortcut                       ...nin_shortcut
  .../downsamplers_0/conv    encoder.down_blocks.{i}.downsamplers.0 encoder.down.{i}.downsample.conv
  mid_block/resnets_0, _1    mid_block.resnets.0, .1                mid.block_1, mid.block_2
  mid_block/attentions_0/    mid_block.attentions.0.                mid.attn_1.
    group_norm scale, bias     group_norm weight, bias                norm weight, bias
    to_q/k/v, to_out_0         to_q/k/v, to_out.0 Linear [O,I]        q/k/v, proj_out 1x1 conv [O,I,1,1]
  conv_norm_out, conv_out    conv_norm_out, conv_out                norm_out, conv_out
  decoder/up_blocks_{i}      decoder.up_blocks.{i}                  decoder.up.{n-1-i} (reversed)
    /upsamplers_0/conv         .upsamplers.0.conv                     .upsample.conv
    /resnets_{j}               .resnets.{j}                           .block.{j}
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping

import numpy as np
from flax import traverse_util

from sd3_jax.models.vae import VAEConfig
from sd3_jax.storage.trees import check_shapes
from sd3_jax.convert.safetensors_io import as_numpy

ORIGINAL_PREFIX = "first_stage_model."
# Weights of the LDM/SD1-style VAE that the SD3 VAE does not have.
_QUANT_KEYS = ("quant_conv.weight", "post_quant_conv.weight")


@dataclasses.dataclass(frozen=True)
class Entry:
  ours: str  # flat parameter name, "encoder/conv_in/kernel"
  diffusers: str  # "encoder.conv_in.weight"
  original: str  # "encoder.conv_in.weight" (without first_stage_model.)
  kind: str  # 'conv' | 'linear' | 'vector'
  diffusers_shape: tuple[int, ...]

  @property
  def ours_shape(self) -> tuple[int, ...]:
    s = self.diffusers_shape
    return {"conv": lambda: (s[2], s[3], s[1], s[0]), "linear": lambda: (s[1], s[0]), "vector": lambda: s}[self.kind]()

  @property
  def original_shape(self) -> tuple[int, ...]:
    return self.diffusers_shape + (1, 1) if self.kind == "linear" else self.diffusers_shape

  def name(self, fmt: str) -> str:
    return {"diffusers": self.diffusers, "original": self.original}[fmt]

  def shape(self, fmt: str) -> tuple[int, ...]:
    return {"diffusers": self.diffusers_shape, "original": self.original_shape}[fmt]


def entries(config: VAEConfig) -> list[Entry]:
  """Every tensor of the VAE for ``config``, in a fixed order."""
  out: list[Entry] = []

  def add(ours: str, original: str, kind: str, cin: int, cout: int, k: int = 3):
    diffusers = re.sub(r"_(\d+)(?=/|$)", r".\1", ours).replace("/", ".")  # resnets_0 -> resnets.0
    if kind == "norm":
      out.append(Entry(f"{ours}/scale", f"{diffusers}.weight", f"{original}.weight", "vector", (cout,)))
    else:
      wshape = (cout, cin, k, k) if kind == "conv" else (cout, cin)
      out.append(Entry(f"{ours}/kernel", f"{diffusers}.weight", f"{original}.weight", kind, wshape))
    out.append(Entry(f"{ours}/bias", f"{diffusers}.bias", f"{original}.bias", "vector", (cout,)))

  def resnet(ours: str, original: str, cin: int, cout: int):
    add(f"{ours}/norm1", f"{original}.norm1", "norm", cin, cin)
    add(f"{ours}/conv1", f"{original}.conv1", "conv", cin, cout)
    add(f"{ours}/norm2", f"{original}.norm2", "norm", cout, cout)
    add(f"{ours}/conv2", f"{original}.conv2", "conv", cout, cout)
    if cin != cout:
      add(f"{ours}/conv_shortcut", f"{original}.nin_shortcut", "conv", cin, cout, k=1)

  def mid(part: str, c: int):
    resnet(f"{part}/mid_block/resnets_0", f"{part}.mid.block_1", c, c)
    a, o = f"{part}/mid_block/attentions_0", f"{part}.mid.attn_1"
    add(f"{a}/group_norm", f"{o}.norm", "norm", c, c)
    for ours, orig in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out_0", "proj_out")):
      add(f"{a}/{ours}", f"{o}.{orig}", "linear", c, c)
    resnet(f"{part}/mid_block/resnets_1", f"{part}.mid.block_2", c, c)

  chans, n, lat = config.block_out_channels, len(config.block_out_channels), config.latent_channels
  add("encoder/conv_in", "encoder.conv_in", "conv", config.in_channels, chans[0])
  cin = chans[0]
  for i, c in enumerate(chans):
    for j in range(config.layers_per_block):
      resnet(f"encoder/down_blocks_{i}/resnets_{j}", f"encoder.down.{i}.block.{j}", cin, c)
      cin = c
    if i < n - 1:
      add(f"encoder/down_blocks_{i}/downsamplers_0/conv", f"encoder.down.{i}.downsample.conv", "conv", c, c)
  mid("encoder", chans[-1])
  add("encoder/conv_norm_out", "encoder.norm_out", "norm", chans[-1], chans[-1])
  add("encoder/conv_out", "encoder.conv_out", "conv", chans[-1], 2 * lat)

  add("decoder/conv_in", "decoder.conv_in", "conv", lat, chans[-1])
  mid("decoder", chans[-1])
  cin = chans[-1]
  for i, c in enumerate(chans[::-1]):
    level = n - 1 - i
    for j in range(config.layers_per_block + 1):
      resnet(f"decoder/up_blocks_{i}/resnets_{j}", f"decoder.up.{level}.block.{j}", cin, c)
      cin = c
    if i < n - 1:
      add(f"decoder/up_blocks_{i}/upsamplers_0/conv", f"decoder.up.{level}.upsample.conv", "conv", c, c)
  add("decoder/conv_norm_out", "decoder.norm_out", "norm", chans[0], chans[0])
  add("decoder/conv_out", "decoder.conv_out", "conv", chans[0], config.out_channels)
  return out


# --------------------------------------------------------------------------------------------
# Tensor transforms (exact)


def _to_ours(e: Entry, x: np.ndarray) -> np.ndarray:
  if e.kind == "conv":
    return np.ascontiguousarray(x.transpose(2, 3, 1, 0))  # [O,I,kh,kw] -> [kh,kw,I,O]
  if e.kind == "linear":
    return np.ascontiguousarray(x.reshape(e.diffusers_shape).T)  # [O,I](,1,1) -> [I,O]
  return np.ascontiguousarray(x)


def _from_ours(e: Entry, x: np.ndarray, fmt: str) -> np.ndarray:
  if e.kind == "conv":
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1))
  if e.kind == "linear":
    return np.ascontiguousarray(x.T.reshape(e.shape(fmt)))
  return np.ascontiguousarray(x)


# --------------------------------------------------------------------------------------------
# Reading state dicts


def detect_layout(keys) -> tuple[str, str]:
  """('diffusers' | 'original', prefix) of a VAE state dict. With any ``first_stage_model.`` key
  only those keys are the VAE (the rest of an SD3 single file is ignored)."""
  keys = list(keys)
  prefix = ORIGINAL_PREFIX if any(k.startswith(ORIGINAL_PREFIX) for k in keys) else ""
  bare = [k[len(prefix) :] for k in keys if k.startswith(prefix)]
  if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in bare):
    return "diffusers", prefix
  if any(k.startswith(("encoder.down.", "decoder.up.")) for k in bare):
    return "original", prefix
  raise ValueError(
    "not a VAE state dict: no 'encoder.down_blocks.*' (diffusers) or "
    "'[first_stage_model.]encoder.down.*' (original LDM) keys; first keys: "
    f"{keys[:5]}"
  )


def infer_config(shapes: Mapping[str, tuple[int, ...]], layout: str) -> VAEConfig:
  """VAEConfig from tensor shapes (bare keys of ``layout``).

  Weights do not record GroupNorm's group count or the latent normalisation: this assumes
  norm_num_groups=32 and SD3's scaling 1.5305 / shift 0.0609. Pass a config.json otherwise.
  """
  down, block = ("down_blocks", "resnets") if layout == "diffusers" else ("down", "block")

  def get(key):
    if key not in shapes:
      raise ValueError(f"cannot infer the VAE configuration: {layout} state dict has no {key!r}")
    return tuple(shapes[key])

  levels = sorted({int(m.group(1)) for k in shapes for m in [re.match(rf"encoder\.{down}\.(\d+)\.", k)] if m})
  layers = {int(m.group(1)) for k in shapes for m in [re.match(rf"encoder\.{down}\.0\.{block}\.(\d+)\.", k)] if m}
  if not levels or levels != list(range(len(levels))) or not layers:
    raise ValueError(
      f"cannot infer the VAE configuration: encoder levels {levels}, "
      f"level-0 resnets {sorted(layers)} in the {layout} state dict"
    )
  chans = tuple(get(f"encoder.{down}.{i}.{block}.0.conv1.weight")[0] for i in range(len(levels)))
  conv_in, dec_in, dec_out = (
    get("encoder.conv_in.weight"),
    get("decoder.conv_in.weight"),
    get("decoder.conv_out.weight"),
  )
  groups = 32
  if any(c % groups for c in chans):
    raise ValueError(
      f"cannot infer norm_num_groups: channels {list(chans)} are not all divisible by "
      "32 (the weights do not record it); pass the diffusers config.json"
    )
  return VAEConfig(
    in_channels=conv_in[1],
    out_channels=dec_out[0],
    latent_channels=dec_in[1],
    block_out_channels=chans,
    layers_per_block=max(layers) + 1,
    norm_num_groups=groups,
  )


def diffusers_state_dict_to_vae_params(
  state_dict: Mapping, config_json: Mapping | None = None, *, dtype=None
) -> tuple[VAEConfig, dict]:
  """A diffusers AutoencoderKL state dict, or the original LDM VAE keys (bare or with
  ``first_stage_model.``, e.g. a whole SD3 single file), -> (VAEConfig, nested params).

  Values: numpy arrays or torch tensors. ``config_json``: the diffusers config.json dict; without
  it the config is inferred from the shapes (see ``infer_config``). ``dtype``: cast the leaves
  (default: keep the checkpoint's dtype).
  """
  layout, prefix = detect_layout(state_dict.keys())
  src = "first_stage_model.* keys" if prefix else f"{layout} VAE state dict"
  tensors = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
  quant = [k for k in _QUANT_KEYS if k in tensors]
  if quant:
    raise ValueError(
      f"{src} has {quant}: a VAE with quant_conv/post_quant_conv (SD1/SDXL style) is "
      "not supported; the SD3 VAE has none"
    )
  shapes = {k: tuple(getattr(v, "shape")) for k, v in tensors.items()}
  config = VAEConfig.from_diffusers_config(config_json) if config_json is not None else infer_config(shapes, layout)
  es = entries(config)
  check_shapes(shapes, {e.name(layout): e.shape(layout) for e in es}, src)
  flat = {}
  for e in es:
    x = _to_ours(e, as_numpy(tensors[e.name(layout)]))
    flat[e.ours] = x if dtype is None else x.astype(dtype)
  return config, traverse_util.unflatten_dict(flat, sep="/")


# --------------------------------------------------------------------------------------------
# Writing


def _flat_params(params: Mapping, es: list[Entry]) -> dict[str, np.ndarray]:
  flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(dict(params), sep="/").items()}
  check_shapes({k: v.shape for k, v in flat.items()}, {e.ours: e.ours_shape for e in es}, "VAE parameter tree")
  return flat


def vae_params_to_diffusers_state_dict(params: Mapping, config: VAEConfig) -> dict[str, np.ndarray]:
  """Our parameter tree -> diffusers AutoencoderKL state dict (exact inverse of the reader)."""
  es = entries(config)
  flat = _flat_params(params, es)
  return {e.diffusers: _from_ours(e, flat[e.ours], "diffusers") for e in es}


def vae_params_to_original_state_dict(
  params: Mapping, config: VAEConfig, prefix: str = ORIGINAL_PREFIX
) -> dict[str, np.ndarray]:
  """Our parameter tree -> the original LDM keys (``first_stage_model.`` of an SD3 single file)."""
  es = entries(config)
  flat = _flat_params(params, es)
  return {prefix + e.original: _from_ours(e, flat[e.ours], "original") for e in es}


def diffusers_vae_config(config: VAEConfig) -> dict:
  """config.json for diffusers' ``AutoencoderKL.from_pretrained`` (no quant convs)."""
  n = len(config.block_out_channels)
  return {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.31.0",
    "in_channels": config.in_channels,
    "out_channels": config.out_channels,
    "down_block_types": ["DownEncoderBlock2D"] * n,
    "up_block_types": ["UpDecoderBlock2D"] * n,
    "block_out_channels": list(config.block_out_channels),
    "layers_per_block": config.layers_per_block,
    "act_fn": "silu",
    "latent_channels": config.latent_channels,
    "norm_num_groups": config.norm_num_groups,
    "sample_size": 1024,  # only diffusers' tiling threshold
    "scaling_factor": config.scaling_factor,
    "shift_factor": config.shift_factor,
    "latents_mean": None,
    "latents_std": None,
    "force_upcast": True,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": True,
  }
