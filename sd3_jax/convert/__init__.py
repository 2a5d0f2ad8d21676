"""Lossless checkpoint conversion.

  MM-DiT          our JAX format <-> diffusers <-> original SD3 single file; a training run
                  (workdir or checkpoints/<step>, EMA or raw weights) -> any of them (runs.py)
  VAE             our JAX format <-> diffusers AutoencoderKL directory
  text encoders   our JAX format <-> transformers directories (CLIP-L, OpenCLIP bigG, T5)
  CLIP models     our JAX format <-> transformers CLIPModel / CLIPVisionModelWithProjection
                  directories (for CLIP score and FID on CLIP features; the tokenizer files of
                  a CLIPModel directory are copied along, into DST/tokenizer/)

Command: ``sd3-convert`` (= ``python -m sd3_jax.convert``)
``--src SRC --dst DST --to {jax,diffusers,sd3,transformers}`` (``cli.py``; see ``--help``).
Python API:

  convert(src, dst, to, dtype=None, num_heads=None, head_dim=None, max_shard_size="10GB",
          overwrite=False, verify=True)
      -> MMDiTConfig | VAEConfig | CLIPTextConfig | T5EncoderConfig | CLIPConfig | CLIPVisionConfig
                                          file/directory conversion, streamed tensor by tensor
                                          (the small VAE in memory)
  detect_model(path) -> (kind, format, path)   kind 'mmdit' | 'vae' | 'clip_text' | 't5_encoder'
                                          | 'clip' | 'clip_vision'
  open_source(path) -> Source             detect + validate an MM-DiT checkpoint (``.config``)
  open_text_source(path) -> TextSource    the same for a text encoder
  state_dict_to_params(state_dict)        in-memory diffusers/original state dict (numpy or
      -> (MMDiTConfig, params)            torch) -> our unscanned parameter tree (numpy)
  params_to_state_dict(params, config, fmt) -> {name: np.ndarray}   fmt 'sd3' or 'diffusers'
  text_keys.state_dict_to_params(state_dict, hf_config) / text_keys.params_to_state_dict(...)
                                          the same for text encoders (transformers names)

Key tables and transforms: mmdit_keys.py, text_keys.py, vae_keys.py; file formats: formats.py
(MM-DiT, detection) and encoders.py (text encoders, VAE); safetensors streaming:
safetensors_io.py; our own format: sd3_jax/pretrained.py.
"""

from __future__ import annotations

import os
from typing import Mapping

import numpy as np

from sd3_jax.storage import pretrained, trees
from sd3_jax.models.mmdit import MMDiTConfig
from sd3_jax.convert import mmdit_keys, runs, text_keys
from sd3_jax.convert.encoders import TEXT_WRITERS, convert_vae, copy_tokenizer, open_text_source
from sd3_jax.convert.formats import (
  WRITERS,
  Source,
  detect_format,
  detect_model,
  iter_native,
  open_source,
  source_from_params,
  source_from_state_dict,
)
from sd3_jax.convert.mmdit_keys import require_mmdit
from sd3_jax.convert.safetensors_io import parse_size

__all__ = [
  "convert",
  "detect_format",
  "detect_model",
  "open_source",
  "open_text_source",
  "state_dict_to_params",
  "params_to_state_dict",
  "Source",
  "mmdit_keys",
  "text_keys",
]
TARGETS = ("jax", "diffusers", "sd3", "transformers")


def convert(
  src,
  dst,
  to: str,
  *,
  dtype=None,
  num_heads: int | None = None,
  head_dim: int | None = None,
  max_shard_size: str | int = "10GB",
  overwrite: bool = False,
  verify: bool = True,
  ema: bool | None = None,
):
  """Converts the checkpoint at ``src`` (model and format detected) to format ``to`` at ``dst``.

  to: MM-DiT 'jax' | 'diffusers' | 'sd3'; VAE 'jax' | 'diffusers'; text encoder 'jax' |
    'transformers' ('diffusers' is
    accepted as a synonym: a diffusers pipeline stores its text encoders as transformers
    directories).
  dtype: cast every tensor ('float32', 'bfloat16', 'float16'); None keeps the source dtypes.
  num_heads / head_dim: MM-DiT only, for original files without qk-norm (nor our metadata)
    whose head dim is not 64; checked against the checkpoint otherwise.
  max_shard_size: diffusers/transformers output shard size ('10GB' like diffusers; '500MB', ...).
  verify: a source in our format is checked leaf by leaf against its checksums.
  ema: for a training run as ``src`` (a workdir or its checkpoints/<step>): export the EMA
    weights (True, the default) or the raw parameters (False); runs only.
  Returns the model configuration.
  """
  if to not in TARGETS:
    raise ValueError(f"unknown target format {to!r}; choose one of {sorted(TARGETS)}")
  if os.path.abspath(os.fspath(src)) == os.path.abspath(os.fspath(dst)):
    raise ValueError("--src and --dst are the same path")
  if runs.run_location(src) is not None:  # a training run: its latest (or given) checkpoint
    if to not in WRITERS:
      raise ValueError(f"{src} is a training run (an MM-DiT); it exports to {sorted(WRITERS)}, not {to!r}")
    if num_heads is not None or head_dim is not None:
      raise ValueError("num_heads / head_dim do not apply to a training run: its config says them")
    kwargs = {"max_shard_bytes": parse_size(max_shard_size)} if to == "diffusers" else {}
    config, params, description = runs.load_run(src, use_ema=True if ema is None else ema)
    if config.backbone != "mmdit":  # the other backbones of the study: our format only
      if to != "jax":
        require_mmdit(config, description)
      pretrained.save_pretrained(dst, params, config, dtype=dtype, overwrite=overwrite)
      return config
    source = source_from_params(params, config)
    source.description = description
    WRITERS[to](source, dst, dtype=dtype, overwrite=overwrite, **kwargs)
    return source.config
  if ema is not None:
    raise ValueError(
      f"--ema/--no-ema choose the weights of a training run; {src} is not one "
      "(a workdir with checkpoints/, or WORKDIR/checkpoints/<step>)"
    )
  kind, _, _ = detect_model(src)
  if kind == "vae":
    max_shard = parse_size(max_shard_size)
    if num_heads is not None or head_dim is not None:
      raise ValueError("num_heads / head_dim apply to MM-DiT checkpoints only")
    return convert_vae(src, dst, to, dtype=dtype, overwrite=overwrite, max_shard_bytes=max_shard, verify=verify)
  if kind in ("clip_text", "t5_encoder", "clip", "clip_vision"):
    target = "transformers" if to == "diffusers" else to
    if target not in TEXT_WRITERS:
      raise ValueError(f"{src} is a transformers model ({kind}); it converts to 'jax' or 'transformers', not {to!r}")
    if num_heads is not None or head_dim is not None:
      raise ValueError(
        "num_heads / head_dim apply to MM-DiT checkpoints only; a transformers model's config says its heads"
      )
    kwargs = {"max_shard_bytes": parse_size(max_shard_size)} if target == "transformers" else {}
    text_source = open_text_source(src, verify)
    TEXT_WRITERS[target](text_source, dst, dtype=dtype, overwrite=overwrite, **kwargs)
    if kind == "clip":
      copy_tokenizer(detect_model(src)[2], dst, target)
    return text_source.config
  if kind != "mmdit":
    raise ValueError(f"{src} holds a {kind} checkpoint, which this tool does not convert")
  if to not in WRITERS:
    raise ValueError(f"{src} is an MM-DiT; it converts to {sorted(WRITERS)}, not {to!r}")
  if detect_format(src)[0] == "jax" and pretrained.read_config(src).backbone != "mmdit":
    config = pretrained.read_config(src)
    if to != "jax":
      require_mmdit(config, str(src))
    _, params = pretrained.load_pretrained(src, param_dtype=None, verify=verify)  # a copy, or a cast with --dtype
    pretrained.save_pretrained(dst, params, config, dtype=dtype, overwrite=overwrite)
    return config
  kwargs = {"max_shard_bytes": parse_size(max_shard_size)} if to == "diffusers" else {}
  source = open_source(src, num_heads=num_heads, head_dim=head_dim, verify=verify)
  WRITERS[to](source, dst, dtype=dtype, overwrite=overwrite, **kwargs)
  return source.config


def state_dict_to_params(
  state_dict: Mapping, *, num_heads: int | None = None, diffusers_config: Mapping | None = None, dtype=None
) -> tuple[MMDiTConfig, dict]:
  """diffusers or original (prefixed or bare) state dict -> (config, unscanned params)."""
  source = source_from_state_dict(state_dict, num_heads=num_heads, diffusers_config=diffusers_config)
  flat = {e.name: np.ascontiguousarray(a) for e, a in iter_native(source, "jax", dtype)}
  return source.config, trees.unflatten(flat)


def params_to_state_dict(params: Mapping, config: MMDiTConfig, fmt: str, *, dtype=None) -> dict[str, np.ndarray]:
  """Our parameters (unscanned or scanned) -> 'sd3' (prefixed keys) or 'diffusers' state dict."""
  if fmt not in ("sd3", "diffusers"):
    raise ValueError(f"fmt must be 'sd3' or 'diffusers', got {fmt!r}")
  prefix = mmdit_keys.SD3_PREFIX if fmt == "sd3" else ""
  source = source_from_params(params, config)
  return {prefix + e.name: np.ascontiguousarray(a) for e, a in iter_native(source, fmt, dtype)}
