"""Typed validation of the model config dataclasses (``MMDiTConfig``, ``CLIPTextConfig``,
``T5EncoderConfig``, ``VAEConfig``), called from their ``__post_init__``.

Configs arrive from JSON files (our ``sd3_jax_config.json``, transformers / diffusers
``config.json``), where ``"qk_norm": "false"`` or ``"num_heads": 0`` would otherwise surface
much later as a wrong model, a ``ZeroDivisionError`` or a JAX shape error. Every error names the
class and the field.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Iterable

import numpy as np


def _kind(annotation: str) -> tuple[str, bool]:
  """(base type name, optional) of a field annotation string such as 'int | None'."""
  parts = [p.strip() for p in str(annotation).split("|")]
  optional = "None" in parts
  base = [p for p in parts if p != "None"]
  return (base[0] if base else "None"), optional


def _is_int(v) -> bool:
  return isinstance(v, (numbers.Integral, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_real(v) -> bool:
  return isinstance(v, (numbers.Real, np.floating, np.integer)) and not isinstance(v, (bool, np.bool_))


def check_config(
  config, *, positive: Iterable[str] = (), non_negative: Iterable[str] = (), positive_real: Iterable[str] = ()
) -> None:
  """Raises ValueError naming the first field whose value does not fit its annotation
  (int, float, bool, str, tuple[int, ...], optionally None) or its range.

  positive: integer fields that must be >= 1 (for tuples: every element); non_negative: >= 0;
  positive_real: float fields that must be > 0 (and finite)."""
  cls = type(config).__name__
  positive, non_negative, positive_real = set(positive), set(non_negative), set(positive_real)
  for f in dataclasses.fields(config):
    v = getattr(config, f.name)
    base, optional = _kind(f.type)
    where = f"{cls}.{f.name}"
    if v is None:
      if optional:
        continue
      raise ValueError(f"{where} must be set (a {base}), got null")
    got = f"{v!r} ({type(v).__name__})"
    if base == "int":
      if not _is_int(v):
        raise ValueError(f"{where} must be an integer, got {got}")
    elif base == "float":
      if not _is_real(v) or not np.isfinite(float(v)):
        raise ValueError(f"{where} must be a finite number, got {got}")
    elif base == "bool":
      if not isinstance(v, (bool, np.bool_)):
        raise ValueError(f"{where} must be true or false (a JSON boolean), got {got}")
    elif base == "str":
      if not isinstance(v, str):
        raise ValueError(f"{where} must be a string, got {got}")
    elif base.startswith("tuple"):
      if isinstance(v, (str, bytes)) or not isinstance(v, (list, tuple)) or not all(_is_int(x) for x in v):
        raise ValueError(f"{where} must be a list of integers, got {got}")
    values = list(v) if isinstance(v, (list, tuple)) else [v]
    if f.name in positive and any(x < 1 for x in values):
      raise ValueError(f"{where} must be >= 1, got {v!r}")
    if f.name in non_negative and any(x < 0 for x in values):
      raise ValueError(f"{where} must be >= 0, got {v!r}")
    if f.name in positive_real and not float(v) > 0:
      raise ValueError(f"{where} must be > 0, got {v!r}")
