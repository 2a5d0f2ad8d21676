"""Device mesh, the logical-axis -> mesh-axis rule table, and global batch assembly.

Mesh axis names appear only here and in configs. The mesh has three axes:
  data    pure data parallelism (parameters replicated across it)
  fsdp    data parallelism with parameters, gradients and optimizer state sharded over it
  tensor  tensor (model) parallelism: attention heads and the MLP hidden axis are split
The batch is split over ('data', 'fsdp').
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# THE rule table: every logical name used by the model (parameters and activations).
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
  # activations
  ("act_batch", BATCH_AXES),
  ("act_length", None),
  ("act_embed", None),
  ("act_heads", "tensor"),
  ("act_mlp", "tensor"),
  # parameters
  ("embed", "fsdp"),  # hidden size h: FSDP-sharded
  ("mlp", "tensor"),  # MLP hidden (4h) and adaLN outputs (n*h)
  ("heads", "tensor"),  # attention heads
  ("kv", None),  # head dim (64)
  ("qkv", None),  # the q/k/v selector (3)
  ("cond", None),  # conditioning input widths (256 timestep features, 2048 pooled, 4096 context)
  ("layers", None),  # the stacked axis of scanned blocks
  ("conv_in", None),  # UViT conv-stage channels (small; widths such as 384 divide few meshes)
  ("conv_out", None),
)


@contextlib.contextmanager
def logical_axes(mesh: Mesh, rules=LOGICAL_RULES):
  """Context (usable inside jit) under which the model's nn.with_logical_constraint calls become
  sharding constraints on ``mesh``. Without it they are no-ops."""
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(list(rules)):
    yield


def resolve_mesh_shape(data: int, fsdp: int, tensor: int, n_devices: int) -> tuple[int, int, int]:
  """Mesh shape with at most one -1 ("all remaining devices")."""
  dims = [int(data), int(fsdp), int(tensor)]
  if dims.count(-1) > 1:
    raise ValueError(f"mesh (data={data}, fsdp={fsdp}, tensor={tensor}): at most one axis may be -1")
  if any(d == 0 or d < -1 for d in dims):
    raise ValueError(f"mesh (data={data}, fsdp={fsdp}, tensor={tensor}): sizes must be positive or -1")
  known = int(np.prod([d for d in dims if d != -1]))
  if -1 in dims:
    if n_devices % known:
      raise ValueError(
        f"mesh (data={data}, fsdp={fsdp}, tensor={tensor}): {n_devices} devices are not divisible by {known}"
      )
    dims[dims.index(-1)] = n_devices // known
  if int(np.prod(dims)) != n_devices:
    raise ValueError(
      f"mesh (data={dims[0]}, fsdp={dims[1]}, tensor={dims[2]}) needs {int(np.prod(dims))} "
      f"devices but {n_devices} are available; set one axis to -1 to use all of them"
    )
  return tuple(dims)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh over ``devices`` (default: all), Auto axis types.

  Uses mesh_utils so that on TPU the axes follow the physical interconnect (tensor innermost).
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(data, fsdp, tensor, len(devices))
  try:
    dev_array = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  except (ValueError, NotImplementedError, AssertionError) as e:
    log.warning(
      "device mesh %s over %d %s devices: cannot follow the physical topology (%s: %s); "
      "using the device list order, so collectives may take slower links",
      dict(zip(MESH_AXES, shape)),
      len(devices),
      devices[0].platform,
      type(e).__name__,
      e,
    )
    dev_array = np.asarray(devices).reshape(shape)
  return Mesh(dev_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_specs(boxed_tree):
  """Logical PartitionSpec of every leaf of a tree holding nn.Partitioned boxes (P() otherwise).

  Unlike nn.get_partition_spec this keeps empty pytree nodes (optax's MaskedNode) as they are,
  so the result has exactly the structure of ``nn.unbox(boxed_tree)``.
  """
  is_box = lambda x: isinstance(x, nn.Partitioned)
  return jax.tree.map(lambda x: x.get_partition_spec() if is_box(x) else P(), boxed_tree, is_leaf=is_box)


def specs_like_params(tree, params_specs, params_shapes):
  """Logical specs for any tree whose leaves mirror parameters (optimizer moments, EMA, ...).

  A leaf gets the spec of the parameter whose key path equals the leaf's trailing run of dict
  keys and whose shape matches (Adam's mu/nu under optax's wrappers); anything else (counts,
  scalars) is replicated.
  """
  by_path = {}
  for (path, spec), shape in zip(
    jax.tree_util.tree_flatten_with_path(params_specs, is_leaf=lambda x: isinstance(x, P))[0],
    jax.tree.leaves(params_shapes),
  ):
    by_path[tuple(k.key for k in path)] = (spec, tuple(shape.shape))

  def spec_for(path, leaf):
    keys = []
    for k in reversed(path):
      if not isinstance(k, jax.tree_util.DictKey):
        break
      keys.append(k.key)
    hit = by_path.get(tuple(reversed(keys)))
    if hit is not None and hit[1] == tuple(np.shape(leaf)):
      return hit[0]
    return P()

  return jax.tree_util.tree_map_with_path(spec_for, tree)


def logical_to_mesh_shardings(logical_specs, mesh: Mesh, rules=LOGICAL_RULES):
  """A pytree of logical PartitionSpecs -> NamedShardings on ``mesh``."""
  is_spec = lambda x: isinstance(x, P)
  return jax.tree.map(
    lambda s: NamedSharding(mesh, nn.logical_to_mesh_axes(s, list(rules))), logical_specs, is_leaf=is_spec
  )


def check_divisible(abstract_tree, shardings_tree, what: str = "array") -> None:
  """Every sharded dimension must divide evenly over its mesh axes; name the first that does not."""
  for (path, leaf), sh in zip(jax.tree_util.tree_flatten_with_path(abstract_tree)[0], jax.tree.leaves(shardings_tree)):
    for dim, axes in zip(leaf.shape, tuple(sh.spec) + (None,) * (len(leaf.shape) - len(sh.spec))):
      if axes is None:
        continue
      names = axes if isinstance(axes, tuple) else (axes,)
      n = int(np.prod([sh.mesh.shape[a] for a in names]))
      if dim % n:
        raise ValueError(
          f"{what} {jax.tree_util.keystr(path)} of shape {tuple(leaf.shape)}: dimension {dim} is "
          f"split over mesh axes {names} of total size {n}, which does not divide it. Choose a "
          f"mesh whose {'*'.join(names)} size divides {dim} (e.g. --config.mesh.fsdp=<divisor> "
          "--config.mesh.data=-1), or change the model width"
        )


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_size_per_process(global_batch_size: int, mesh: Mesh) -> int:
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if global_batch_size % shards:
    raise ValueError(
      f"global_batch_size {global_batch_size} must be divisible by the number of batch shards data*fsdp = {shards}"
    )
  if global_batch_size % jax.process_count():
    raise ValueError(
      f"global_batch_size {global_batch_size} must be divisible by the process count {jax.process_count()}"
    )
  return global_batch_size // jax.process_count()


def make_global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Host-local numpy batch (this process's slice) -> global jax.Arrays split over the batch axes."""
  return {
    k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
    for k, v in local_batch.items()
  }
