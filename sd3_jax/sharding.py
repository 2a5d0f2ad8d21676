"""Device mesh, the logical-axis -> mesh-axis rule table, and global batch assembly.

Mesh axis names appear only here and in configs. The mesh has three axes:
  data    pure data parallelism (parameters replicated across it)
  fsdp    data parallelism with parameters, gradients and optimizer state sharded over it
  tensor  tensor (model) parallelism: attention heads and the MLP hidden axis are split
The batch is split over ('data', 'fsdp').

Several TPU slices (multi-slice): each axis is the product of a within-slice part (ICI, config
``mesh.data/fsdp/tensor``) and an across-slice part (DCN, ``mesh.dcn_data/dcn_fsdp/dcn_tensor``),
laid out with mesh_utils.create_hybrid_device_mesh so that only the axes with a DCN part > 1
cross the slow network; by default that is 'data' alone (gradients are all-reduced across
slices once per step, everything else stays inside a slice).
"""

from __future__ import annotations

import contextlib
import logging
import math
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


def _resolve(names: Sequence[str], sizes: Sequence[int], total: int, what: str, fix: str) -> tuple[int, ...]:
  """``sizes`` with at most one -1 ("the rest") filled so that their product is ``total``."""
  dims = [int(d) for d in sizes]
  shown = ", ".join(f"{n}={d}" for n, d in zip(names, sizes))
  if dims.count(-1) > 1:
    raise ValueError(f"mesh ({shown}): at most one axis may be -1")
  if any(d == 0 or d < -1 for d in dims):
    raise ValueError(f"mesh ({shown}): sizes must be positive or -1")
  known = math.prod(d for d in dims if d != -1)
  if -1 in dims:
    if total % known:
      raise ValueError(f"mesh ({shown}): {total} {what} are not divisible by {known}")
    dims[dims.index(-1)] = total // known
  if math.prod(dims) != total:
    filled = ", ".join(f"{n}={d}" for n, d in zip(names, dims))
    raise ValueError(f"mesh ({filled}) needs {math.prod(dims)} {what} but there are {total}; {fix}")
  return tuple(dims)


def resolve_mesh_shape(data: int, fsdp: int, tensor: int, n_devices: int) -> tuple[int, int, int]:
  """Mesh shape with at most one -1 ("all remaining devices")."""
  return _resolve(MESH_AXES, (data, fsdp, tensor), n_devices, "devices", "set one axis to -1 to use all of them")


def device_groups(devices: Sequence[Any], by_process: bool = False) -> list[list[Any]]:
  """The devices split into the groups joined by the slow network (DCN), in order: TPU slices
  (``slice_index``), or with ``by_process`` (or on devices that have no slice index) the
  processes. One group when everything is one slice."""
  attr = "process_index" if by_process or not hasattr(devices[0], "slice_index") else "slice_index"
  groups: dict[int, list[Any]] = {}
  for d in devices:
    groups.setdefault(int(getattr(d, attr)), []).append(d)
  return [groups[k] for k in sorted(groups)]


def num_slices(devices: Sequence[Any]) -> int:
  """Distinct ``slice_index`` values among ``devices`` (1 where devices have none: CPU, GPU)."""
  if not hasattr(devices[0], "slice_index"):
    return 1
  return len({int(d.slice_index) for d in devices})


def resolve_dcn_shape(
  dcn_data: int, dcn_fsdp: int, dcn_tensor: int, slices: int, unit: str = "slice"
) -> tuple[int, int, int]:
  """DCN (across-slice) mesh shape; -1 fills from the slice count. The product must be the
  slice count: a layout for another number of slices is an error naming both. ``unit``: what
  the groups are called in that error ('slice', or 'process' for devices without slices)."""
  names = tuple(f"dcn_{a}" for a in MESH_AXES)
  sizes = (dcn_data, dcn_fsdp, dcn_tensor)
  try:
    return _resolve(names, sizes, slices, "slices", "")
  except ValueError:
    shown = ", ".join(f"{n}={d}" for n, d in zip(names, sizes))
    known = math.prod(d for d in sizes if d > 0)
    need = f"needs a multiple of {known}" if -1 in sizes else f"spans {known}"
    raise ValueError(
      f"config.mesh DCN layout ({shown}) {need} {unit}(s), but the devices form {slices} {unit}(s); "
      "make the product of the dcn_* axes equal the slice count (e.g. --config.mesh.dcn_data=-1 "
      "with the other dcn_* axes 1)"
    ) from None


def device_grid(
  devices: Sequence[Any], ici_shape: Sequence[int], dcn_shape: Sequence[int], by_process: bool = False
) -> np.ndarray:
  """Devices arranged as the mesh ici_shape * dcn_shape (axis by axis). Each axis's DCN part
  is its outer part: along 'data' with dcn_data=2, the first half of the indices lie in one
  slice and the second half in the other, so only the axes whose DCN size is > 1 cross slices.
  Within a slice the layout follows the physical interconnect where mesh_utils can."""
  if math.prod(dcn_shape) == 1:
    return mesh_utils.create_device_mesh(tuple(ici_shape), list(devices), allow_split_physical_axes=True)
  return mesh_utils.create_hybrid_device_mesh(
    tuple(ici_shape),
    tuple(dcn_shape),
    list(devices),
    process_is_granule=by_process or not hasattr(devices[0], "slice_index"),
    allow_split_physical_axes=True,
  )


def make_mesh(
  data: int = 1,
  fsdp: int = -1,
  tensor: int = 1,
  devices: Sequence[Any] | None = None,
  *,
  dcn_data: int = -1,
  dcn_fsdp: int = 1,
  dcn_tensor: int = 1,
) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh over ``devices`` (default: all), Auto axis types.

  ``data``, ``fsdp``, ``tensor`` are the sizes within one slice (ICI); ``dcn_*`` how many
  slices each axis spans (DCN; -1 fills from the slice count, so by default data parallelism
  crosses slices and nothing else does). The mesh axis sizes are their products. On one slice
  (or devices without slices: CPU, GPU) the dcn_* axes resolve to 1, except that on devices
  without slices a dcn_* axis set > 1 splits the processes instead (GPU nodes).
  Uses mesh_utils so that on TPU the axes follow the physical interconnect (tensor innermost).
  """
  devices = list(jax.devices() if devices is None else devices)
  explicit = max(dcn_data, dcn_fsdp, dcn_tensor) > 1
  by_process = explicit and not hasattr(devices[0], "slice_index")
  groups = device_groups(devices, by_process=by_process) if by_process else None
  granules = len(groups) if groups is not None else num_slices(devices)
  dcn = resolve_dcn_shape(dcn_data, dcn_fsdp, dcn_tensor, granules, "process" if by_process else "slice")
  per_group = len(devices) // granules
  if per_group * granules != len(devices):
    raise ValueError(f"{len(devices)} devices do not split evenly over {granules} slices")
  if granules == 1:
    ici = resolve_mesh_shape(data, fsdp, tensor, per_group)
  else:
    ici = _resolve(
      MESH_AXES, (data, fsdp, tensor), per_group, "devices per slice", "set one axis to -1 to use all of them"
    )
  shape = tuple(i * d for i, d in zip(ici, dcn))
  try:
    dev_array = device_grid(devices, ici, dcn, by_process=by_process)
  except (ValueError, NotImplementedError, AssertionError) as e:
    if granules > 1:  # never mix slices silently: a wrong layout puts ICI traffic on DCN
      raise ValueError(
        f"cannot lay out mesh {dict(zip(MESH_AXES, ici))} per slice x {dict(zip(MESH_AXES, dcn))} slices "
        f"over {len(devices)} devices: {e}"
      ) from e
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


MESH_KEYS = ("data", "fsdp", "tensor", "dcn_data", "dcn_fsdp", "dcn_tensor")


def mesh_from_settings(settings: Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
  """make_mesh from a config's ``mesh`` block ({'data', 'fsdp', 'tensor', 'dcn_data', ...});
  keys it lacks take make_mesh's defaults."""
  unknown = sorted(set(settings) - set(MESH_KEYS))
  if unknown:
    raise ValueError(f"config.mesh has unknown keys {unknown}; known: {list(MESH_KEYS)}")
  return make_mesh(devices=devices, **{k: int(v) for k, v in settings.items()})


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
