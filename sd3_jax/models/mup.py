"""muP, the maximal update parametrization (Yang et al., Tensor Programs V): how a backbone's
initialisation, per-parameter Adam learning rates and attention scale change with width, so that
hyperparameters tuned at a small base width transfer to wide models (docs/mup_wsd.md).

Every parameter has a role, its class in ``backbones.param_class`` (one table for every backbone):
  input   weights from a fixed-width space into the width (patch, timestep, text embedders, a UViT's
          first conv), and biases and norm gains (TP5 counts vectors with the input weights)
  hidden  weights from width to width (attention, MLP, adaLN modulation, conv stages, embedder
          second layers)
  output  weights from the width to a fixed-width space (the final projection or conv)
  fixed   not trained (the sin-cos positional table)
Each backbone creates its input layers with this module's initialisers (``Scaling.normal``,
``Scaling.xavier_uniform``); tests/test_mup.py checks, per backbone, that the init of every
parameter scales with width as its class prescribes, so the two cannot disagree.

With m = width / base width, relative to the standard parametrization (SP) at the base width:
  role     init std            Adam lr
  input    x 1                 x 1
  hidden   x m^-1/2            x 1/m
  output   x m^-1              x 1/m
and attention logits q.k scaled by sqrt(d_base)/d instead of 1/sqrt(d) (d the head dimension). At
m = 1 every factor is exactly 1, so muP at its base width is SP, bit for bit.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

PARAMETRIZATIONS = ("sp", "mup")
INPUT, HIDDEN, OUTPUT, FIXED = "input", "hidden", "output", "fixed"
ROLES = (INPUT, HIDDEN, OUTPUT, FIXED)  # = backbones.PARAM_CLASSES

# Exponents a (init std x m^-a) and c (Adam lr x m^-c) per role (TP5, Table 3, in base-relative form).
INIT_EXPONENT = {INPUT: 0.0, HIDDEN: 0.5, OUTPUT: 1.0, FIXED: 0.0}
LR_EXPONENT = {INPUT: 0.0, HIDDEN: 1.0, OUTPUT: 1.0, FIXED: 0.0}

Initializer = Callable[..., jax.Array]
Classify = Callable[[str], str]  # '/'-joined parameter path -> role (backbones.param_class)


def path_names(path) -> tuple[str, ...]:
  """('joint_blocks_0', 'x_block', 'attn', 'qkv', 'kernel') from a jax key path."""
  return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def roles(params: Any, classify: Classify) -> Any:
  """The role of every parameter, a tree like ``params``."""

  def role(path, _):
    r = classify("/".join(path_names(path)))
    if r not in ROLES:
      raise ValueError(f"parameter class {r!r} of {'/'.join(path_names(path))} is not one of {ROLES}")
    return r

  return jax.tree_util.tree_map_with_path(role, params)


@dataclasses.dataclass(frozen=True)
class Scaling:
  """A model's muP scaling: width multiplier m = width / base width, and whether muP applies at
  all. ``Scaling()`` (SP) changes nothing."""

  mup: bool = False
  width_mult: float = 1.0

  def init_factor(self, role: str) -> float:
    return self.width_mult ** -INIT_EXPONENT[role] if self.mup else 1.0

  def lr_factor(self, role: str) -> float:
    return self.width_mult ** -LR_EXPONENT[role] if self.mup else 1.0

  def lr_factors(self, params: Any, classify: Classify) -> Any:
    """Adam learning-rate multipliers, a tree of floats like ``params`` (all 1 under SP)."""
    return jax.tree.map(self.lr_factor, roles(params, classify))

  def normal(self, std: float, role: str) -> Initializer:
    """A fixed-std normal init (SP: ``normal(std)``) at the base width, scaled for ``role``."""
    return nn.initializers.normal(std * self.init_factor(role))

  def xavier_uniform(self, role: str, in_axis=-2, out_axis=-1) -> Initializer | None:
    """SP's xavier-uniform (flax's, with the same ``in_axis`` / ``out_axis``; a conv's other axes
    are its receptive field) but with the fans of the base width, scaled for ``role``: an input
    kernel keeps its base-width scale at every width. None (the layer's default, SP's xavier)
    under SP, at the base width, and for hidden kernels, whose SP xavier already scales as muP's
    m^-1/2."""
    if not self.mup or self.width_mult == 1.0 or role == HIDDEN:
      return None

    def init(key, shape, dtype=jnp.float32):
      fan_in, fan_out = _fans(shape, in_axis, out_axis)
      base_in = fan_in / self.width_mult if role in (HIDDEN, OUTPUT) else fan_in
      base_out = fan_out / self.width_mult if role in (HIDDEN, INPUT) else fan_out
      # SP's draw at this width, rescaled to the base width's xavier scale times m^-a.
      factor = math.sqrt((fan_in + fan_out) / (base_in + base_out)) * self.init_factor(role)
      return nn.initializers.xavier_uniform(in_axis=in_axis, out_axis=out_axis)(key, shape, dtype) * factor

    return init


def _fans(shape: Sequence[int], in_axis, out_axis) -> tuple[float, float]:
  """(fan_in, fan_out) as flax's variance-scaling initialisers count them."""
  axes = lambda a: {x % len(shape) for x in (a if isinstance(a, (tuple, list)) else (a,))}  # noqa: E731
  ins, outs = axes(in_axis), axes(out_axis)
  receptive = math.prod(d for i, d in enumerate(shape) if i not in ins | outs)
  return math.prod(shape[i] for i in ins) * receptive, math.prod(shape[i] for i in outs) * receptive


def scaling(parametrization: str, width: int, base_width: int | None) -> Scaling:
  """The Scaling of a model ``width`` wide under ``parametrization`` tuned at ``base_width``."""
  if parametrization not in PARAMETRIZATIONS:
    raise ValueError(f"parametrization must be one of {PARAMETRIZATIONS}, got {parametrization!r}")
  if parametrization == "sp":
    return Scaling()
  if not base_width or base_width < 1:
    raise ValueError(
      "parametrization 'mup' needs model.mup_base_width, the width the hyperparameters were tuned at "
      "(e.g. --config.model.mup_base_width=256)"
    )
  return Scaling(mup=True, width_mult=width / base_width)


def attention_scale(head_dim: int, base_head_dim: int | None) -> float | None:
  """muP's attention logit scale sqrt(d_base)/d, i.e. 1/d up to the constant that makes it SP's
  1/sqrt(d) at the base head dimension; None (the kernels' own 1/sqrt(d)) when d = d_base."""
  if base_head_dim is None or base_head_dim == head_dim:
    return None
  return math.sqrt(base_head_dim) / head_dim


def check_exportable(config, fmt: str) -> None:
  """For the converters (convert/formats.py): the PyTorch formats compute attention with 1/sqrt(head_dim): a muP model whose head
  dimension differs from its base's (attention scale sqrt(d_base)/d) has no faithful export."""
  if fmt != "jax" and getattr(config, "attention_scale", None) is not None:
    raise ValueError(
      f"this MM-DiT uses muP's attention scale sqrt(d_base)/d = {config.attention_scale:.6g} (head dim "
      f"{config.head_dim}, base {config.mup_base_head_dim or config.mup_base_width // config.num_heads}); the "
      f"{fmt!r} format computes 1/sqrt(d) and cannot hold it: sample and evaluate it with sd3_jax, or train with "
      "model.mup_base_head_dim equal to the head dim"
    )
