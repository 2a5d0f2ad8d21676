"""Start-up validation of the experiment config (the schema is ``sd3_jax/config.py``): values
that cannot run (a negative ``total_steps``, a zero batch size or interval, a learning rate that
is a string) are one clear error naming the key before any device work, instead of a loop that
silently does nothing, a ``ZeroDivisionError`` mid-run or a JAX shape error. ``train.py`` calls
``check_runnable`` first thing.
"""

from __future__ import annotations

import math
import numbers

from sd3_jax import config as config_lib
from sd3_jax import flow

# key -> (kind, lowest allowed, highest allowed); kind 'int' or 'real'; None: unbounded.
_RANGES = {
  "seed": ("int", 0, 2**32 - 1),
  "total_steps": ("int", 1, None),
  "global_batch_size": ("int", 1, None),
  "grad_accum_steps": ("int", 1, None),
  "log_every": ("int", 1, None),
  "checkpoint_every": ("int", 1, None),
  "keep_checkpoints": ("int", 1, None),
  "optimizer.learning_rate": ("real", 0.0, None),
  "optimizer.warmup_steps": ("int", 0, None),
  "optimizer.end_lr_ratio": ("real", 0.0, 1.0),
  "optimizer.decay_fraction": ("real", 0.0, 1.0),
  "optimizer.b1": ("real", 0.0, 1.0),
  "optimizer.b2": ("real", 0.0, 1.0),
  "optimizer.eps": ("real", 0.0, None),
  "optimizer.weight_decay": ("real", 0.0, None),
  "optimizer.grad_clip": ("real", 0.0, None),
  "ema.decay": ("real", 0.0, 1.0),
  "ema.every": ("int", 1, None),
  "flow.text_dropout": ("real", 0.0, 1.0),
  "data.latent_size": ("int", 1, None),
  "data.latent_channels": ("int", 1, None),
  "data.context_len": ("int", 1, None),
  "data.context_dim": ("int", 1, None),
  "data.pooled_dim": ("int", 1, None),
  "data.num_synthetic": ("int", 1, None),
  "data.worker_count": ("int", -1, None),  # -1: by the host's cores
  "data.prefetch": ("int", 0, None),
  "data.val_holdout": ("int", 0, None),
  "data.bucket_pixels_per_latent": ("int", 1, None),
  "eval.every": ("int", 0, None),
  "val.every": ("int", 0, None),
  "val.num_examples": ("int", 1, None),
  "val.batch_size": ("int", 1, None),
  "val.levels": ("int", 1, None),
  "sample.every": ("int", 0, None),
  "sample.num_per_prompt": ("int", 1, None),
  "sample.num_steps": ("int", 1, None),
}
_BOOLS = (
  "async_checkpointing",
  "checkpoint_compression",
  "scan_layers",
  "data.shuffle",
  "val.use_ema",
  "sample.pixel_space",
)
_MESH = ("mesh.data", "mesh.fsdp", "mesh.tensor", "mesh.dcn_data", "mesh.dcn_fsdp", "mesh.dcn_tensor")


def _get(config, key: str):
  node = config
  for part in key.split("."):
    if part not in node:
      return _MISSING
    node = node[part]
  return node


_MISSING = object()


def check_runnable(config) -> None:
  """Raises ValueError naming the first key whose value cannot run (type or range); keys the
  config does not have are left to the code that reads them."""
  for key, (kind, lo, hi) in _RANGES.items():
    v = _get(config, key)
    if v is _MISSING:
      continue
    is_int = isinstance(v, numbers.Integral) and not isinstance(v, bool)
    is_real = isinstance(v, numbers.Real) and not isinstance(v, bool)
    if kind == "int" and not is_int:
      raise ValueError(f"config.{key} must be an integer, got {v!r} ({type(v).__name__})")
    if kind == "real" and (not is_real or not math.isfinite(v)):
      raise ValueError(f"config.{key} must be a finite number, got {v!r} ({type(v).__name__})")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
      span = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
      raise ValueError(f"config.{key} must be {span}, got {v!r}")
  for key in _BOOLS:
    v = _get(config, key)
    if v is not _MISSING and not isinstance(v, bool):
      raise ValueError(f"config.{key} must be True or False, got {v!r} ({type(v).__name__})")
  for key in _MESH:
    v = _get(config, key)
    if v is not _MISSING and (not isinstance(v, int) or isinstance(v, bool) or not (v == -1 or v >= 1)):
      raise ValueError(f"config.{key} must be a positive integer or -1 (all remaining devices), got {v!r}")
  if _get(config, "optimizer.learning_rate") == 0:
    raise ValueError("config.optimizer.learning_rate must be > 0, got 0")
  check_formulation(config)


def check_formulation(config) -> None:
  """config.flow.formulation must name a formulation (and flow.shift suit it); the retired
  flow.sampler keys are refused with the name that replaces them."""
  flow_cfg = _get(config, "flow")
  if flow_cfg is _MISSING:
    return
  config_lib.check_retired(config)
  name, shift = flow_cfg.get("formulation"), flow_cfg.get("shift", 1.0)
  if name is not None:
    try:
      flow.get_formulation(name, shift=shift)
    except ValueError as e:
      raise ValueError(f"config.flow.formulation: {e}") from None
