"""Lossless MM-DiT checkpoint conversion: our JAX format <-> diffusers <-> original SD3 file.

CLI: ``python -m tools.convert_weights --src SRC --dst DST --to {jax,diffusers,sd3}``
(see ``--help``). Python API:

  convert(src, dst, to, dtype=None, num_heads=None, head_dim=None, max_shard_size="10GB",
          overwrite=False)
      -> MMDiTConfig                      file/directory conversion, streamed tensor by tensor
  open_source(path) -> Source             detect + validate a checkpoint (``.config``)
  state_dict_to_params(state_dict)        in-memory diffusers/original state dict (numpy or
      -> (MMDiTConfig, params)            torch) -> our unscanned parameter tree (numpy)
  params_to_state_dict(params, config, fmt) -> {name: np.ndarray}   fmt 'sd3' or 'diffusers'

Key tables and transforms: mmdit_keys.py; file formats: formats.py; safetensors streaming:
safetensors_io.py; our own format: sd3_jax/pretrained.py.
"""
from __future__ import annotations

import os
from typing import Mapping

import numpy as np

from sd3_jax import pretrained
from sd3_jax.models.mmdit import MMDiTConfig
from tools.convert_weights import mmdit_keys
from tools.convert_weights.formats import (WRITERS, Source, detect_format, iter_native, open_source,
                                           source_from_params, source_from_state_dict)
from tools.convert_weights.safetensors_io import parse_size

__all__ = ["convert", "detect_format", "open_source", "state_dict_to_params", "params_to_state_dict",
           "Source", "mmdit_keys"]


def convert(src, dst, to: str, *, dtype=None, num_heads: int | None = None,
            head_dim: int | None = None, max_shard_size: str | int = "10GB",
            overwrite: bool = False) -> MMDiTConfig:
  """Converts the checkpoint at ``src`` (format detected) to format ``to`` at ``dst``.

  dtype: cast every tensor ('float32', 'bfloat16', 'float16'); None keeps the source dtypes.
  num_heads / head_dim: for original files without qk-norm (nor our metadata) whose head dim
    is not 64; checked against the checkpoint otherwise.
  max_shard_size: diffusers output shard size ('10GB' like diffusers; '500MB', bytes, ...).
  Returns the model configuration.
  """
  if to not in WRITERS:
    raise ValueError(f"unknown target format {to!r}; choose one of {sorted(WRITERS)}")
  if os.path.abspath(os.fspath(src)) == os.path.abspath(os.fspath(dst)):
    raise ValueError("--src and --dst are the same path")
  kwargs = {"max_shard_bytes": parse_size(max_shard_size)} if to == "diffusers" else {}
  source = open_source(src, num_heads=num_heads, head_dim=head_dim)
  WRITERS[to](source, dst, dtype=dtype, overwrite=overwrite, **kwargs)
  return source.config


def state_dict_to_params(state_dict: Mapping, *, num_heads: int | None = None,
                         diffusers_config: Mapping | None = None, dtype=None
                         ) -> tuple[MMDiTConfig, dict]:
  """diffusers or original (prefixed or bare) state dict -> (config, unscanned params)."""
  source = source_from_state_dict(state_dict, num_heads=num_heads, diffusers_config=diffusers_config)
  flat = {e.name: np.ascontiguousarray(a) for e, a in iter_native(source, "jax", dtype)}
  return source.config, pretrained.unflatten(flat)


def params_to_state_dict(params: Mapping, config: MMDiTConfig, fmt: str, *, dtype=None
                         ) -> dict[str, np.ndarray]:
  """Our parameters (unscanned or scanned) -> 'sd3' (prefixed keys) or 'diffusers' state dict."""
  if fmt not in ("sd3", "diffusers"):
    raise ValueError(f"fmt must be 'sd3' or 'diffusers', got {fmt!r}")
  prefix = mmdit_keys.SD3_PREFIX if fmt == "sd3" else ""
  source = source_from_params(params, config)
  return {prefix + e.name: np.ascontiguousarray(a) for e, a in iter_native(source, fmt, dtype)}
