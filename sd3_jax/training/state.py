"""The train state: the model a config asks for, TrainState, and its sharded initialisation
(parameters, EMA and Adam moments created straight into their target shardings inside jit)."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import linen as nn
from flax import struct

from sd3_jax import sharding
from sd3_jax.models import attention, backbones, mmdit


@struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any


def make_model(config: ml_collections.ConfigDict, platform: str | None = None) -> nn.Module:
  """The backbone of ``config`` (config.model.backbone: MM-DiT by default; models/backbones.py)
  with attention_impl resolved for ``platform`` (default: that of jax.devices();
  tools.aot_compile passes 'tpu' for compile-only topologies)."""
  impl = attention.resolve_impl(config.attention_impl, platform or jax.devices()[0].platform, config.dtype)
  return backbones.build(
    mmdit.config_from_preset(**config.model),
    dtype=jnp.dtype(config.dtype),
    remat=config.remat,
    scan_layers=config.scan_layers,
    attention_impl=impl,
    attention_blocks=attention.SplashBlocks(config.attention_block_q, config.attention_block_kv),
  )


def init_state(model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
  params = mmdit.init_params(model, rng)
  return TrainState(
    step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), ema_params=jax.tree.map(jnp.copy, params)
  )


def state_shardings(model, tx, mesh, rules=sharding.LOGICAL_RULES):
  """(abstract state with shardings, sharding pytree) without allocating anything.

  Parameters, EMA and Adam moments get the parameters' logical axes; the rest is replicated.
  """
  boxed_params = mmdit.abstract_params(model)
  param_specs = sharding.logical_specs(boxed_params)
  abstract = jax.eval_shape(functools.partial(init_state, model, tx), jax.random.key(0))
  shapes = nn.unbox(boxed_params)
  specs = TrainState(
    step=jax.sharding.PartitionSpec(),
    params=param_specs,
    opt_state=sharding.specs_like_params(abstract.opt_state, param_specs, shapes),
    ema_params=param_specs,
  )
  shardings = sharding.logical_to_mesh_shardings(specs, mesh, rules)
  sharding.check_divisible(abstract.params, shardings.params, "parameter")
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  return abstract, shardings


def create_sharded_state(model, tx, mesh, rng, shardings) -> TrainState:
  """Initialise straight into the target shardings (never materialised whole on one device)."""
  with sharding.logical_axes(mesh):
    return jax.jit(lambda k: init_state(model, tx, k), out_shardings=shardings)(rng)
