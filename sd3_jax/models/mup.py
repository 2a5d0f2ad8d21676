"""muP, the maximal update parametrization (Yang et al., Tensor Programs V): how a backbone's
initialisation, per-parameter Adam learning rates and attention scale change with width, so that
hyperparameters tuned at a small base width transfer to wide models (docs/mup_wsd.md).

Every parameter has a role:
  input   weights from a fixed-width space into the width (patch, timestep, text embedders)
  hidden  weights from width to width (attention, MLP, adaLN modulation, embedder second layers)
  output  weights from the width to a fixed-width space (the final projection)
  vector  biases and norm gains (TP5 counts them with the input weights)
  fixed   not trained (the sin-cos positional table)
A backbone declares its input and output weights in one ``RoleRule``; every other weight is hidden.

With m = width / base width, relative to the standard parametrization (SP) at the base width:
  role     init std            Adam lr
  input    x 1                 x 1
  hidden   x m^-1/2            x 1/m
  output   x m^-1              x 1/m
  vector   x 1                 x 1
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
INPUT, HIDDEN, OUTPUT, VECTOR, FIXED = "input", "hidden", "output", "vector", "fixed"
ROLES = (INPUT, HIDDEN, OUTPUT, VECTOR, FIXED)
WEIGHT_NAMES = ("kernel", "embedding")  # leaves that are weights; any other leaf is a vector

# Exponents a (init std x m^-a) and c (Adam lr x m^-c) per role (TP5, Table 3, in base-relative form).
INIT_EXPONENT = {INPUT: 0.0, HIDDEN: 0.5, OUTPUT: 1.0, VECTOR: 0.0, FIXED: 0.0}
LR_EXPONENT = {INPUT: 0.0, HIDDEN: 1.0, OUTPUT: 1.0, VECTOR: 0.0, FIXED: 0.0}

Initializer = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class RoleRule:
  """A backbone's parameter classes: '/'-joined path prefixes of its input weights, its output
  weights and its untrained parameters. Other weights are hidden, other leaves vectors."""

  inputs: tuple[str, ...]
  outputs: tuple[str, ...]
  fixed: tuple[str, ...] = ("pos_embed",)

  def role(self, names: Sequence[str]) -> str:
    path = "/".join(names)
    if _matches(path, self.fixed):
      return FIXED
    if names[-1] not in WEIGHT_NAMES:
      return VECTOR
    if _matches(path, self.inputs):
      return INPUT
    if _matches(path, self.outputs):
      return OUTPUT
    return HIDDEN


def _matches(path: str, prefixes: Sequence[str]) -> bool:
  return any(path == p or path.startswith(p + "/") for p in prefixes)


def path_names(path) -> tuple[str, ...]:
  """('joint_blocks_0', 'x_block', 'attn', 'qkv', 'kernel') from a jax key path."""
  return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def roles(params: Any, rule: RoleRule) -> Any:
  """The role of every parameter, a tree like ``params``. Raises ValueError when a prefix of the
  rule matches no parameter (a renamed layer would otherwise silently become hidden)."""
  names = [path_names(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  paths = ["/".join(n) for n in names]
  for prefix in (*rule.inputs, *rule.outputs):
    if not any(_matches(p, [prefix]) for p in paths):
      raise ValueError(f"the muP role rule names {prefix!r}, which matches no parameter of this model")
  return jax.tree_util.tree_map_with_path(lambda p, _: rule.role(path_names(p)), params)


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

  def lr_factors(self, params: Any, rule: RoleRule) -> Any:
    """Adam learning-rate multipliers, a tree of floats like ``params`` (all 1 under SP)."""
    return jax.tree.map(self.lr_factor, roles(params, rule))

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
