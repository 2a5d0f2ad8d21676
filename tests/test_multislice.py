"""Multi-slice meshes on fake devices that carry slice indices: which mesh axes cross slices,
and the start-up error for a DCN layout that does not match the slice count."""

import dataclasses

import numpy as np
import pytest

from sd3_jax import sharding


@dataclasses.dataclass(frozen=True)
class FakeDevice:
  id: int
  slice_index: int
  process_index: int
  platform: str = "cpu"
  device_kind: str = "cpu"


@dataclasses.dataclass(frozen=True)
class FakeGpu:  # no slice_index: the groups are processes (nodes)
  id: int
  process_index: int
  platform: str = "cpu"
  device_kind: str = "cpu"


def _devices(slices, per_slice, hosts_per_slice=1):
  return [
    FakeDevice(s * 1000 + i, s, s * hosts_per_slice + i * hosts_per_slice // per_slice)
    for s in range(slices)
    for i in range(per_slice)
  ]


def _slices_along(grid, axis):
  """For each position along ``axis``, the set of slices its devices live in."""
  moved = np.moveaxis(np.vectorize(lambda d: d.slice_index)(grid), axis, 0)
  return [set(moved[i].reshape(-1).tolist()) for i in range(moved.shape[0])]


def _crossing_axes(grid):
  """Mesh axes along which one step can change slice (with every other index fixed)."""
  s = np.vectorize(lambda d: d.slice_index)(grid)
  return [a for a, name in enumerate(sharding.MESH_AXES) if (np.diff(s, axis=a) != 0).any()]


@pytest.mark.parametrize(
  "ici,dcn,want_shape,crossing",
  [
    ((1, -1, 1), (-1, 1, 1), (4, 8, 1), ["data"]),  # the default: data parallelism across slices
    ((2, -1, 1), (2, 2, 1), (4, 8, 1), ["data", "fsdp"]),
    ((1, 4, 2), (1, -1, 1), (1, 16, 2), ["fsdp"]),
    ((2, 2, 2), (4, 1, 1), (8, 2, 2), ["data"]),
  ],
)
def test_only_the_dcn_axes_cross_slices(ici, dcn, want_shape, crossing):
  devices = _devices(4, 8)  # 4 slices of 8 devices
  grid = sharding.device_grid(
    devices, sharding.resolve_mesh_shape(*ici, 8), sharding.resolve_dcn_shape(*dcn, sharding.num_slices(devices))
  )
  assert grid.shape == want_shape
  assert sorted(d.id for d in grid.reshape(-1)) == sorted(d.id for d in devices)  # each device once
  assert [sharding.MESH_AXES[a] for a in _crossing_axes(grid)] == crossing
  # A DCN axis of size k splits its mesh axis into k contiguous blocks, one slice set each.
  for a, name in enumerate(sharding.MESH_AXES):
    per_position = _slices_along(grid, a)
    if name not in crossing:
      assert all(p == per_position[0] for p in per_position)


def test_single_slice_and_no_slice_devices_keep_the_old_mesh():
  assert sharding.resolve_dcn_shape(-1, 1, 1, 1) == (1, 1, 1)
  assert sharding.num_slices([FakeGpu(i, 0) for i in range(4)]) == 1
  assert sharding.num_slices(_devices(1, 8)) == 1 and sharding.num_slices(_devices(3, 2)) == 3


def test_gpu_nodes_as_dcn_groups_when_asked():
  devices = [FakeGpu(p * 4 + i, p) for p in range(2) for i in range(4)]
  groups = sharding.device_groups(devices)
  assert [[d.process_index for d in g] for g in groups] == [[0] * 4, [1] * 4]
  grid = sharding.device_grid(devices, (1, 4, 1), (2, 1, 1), by_process=True)
  procs = np.vectorize(lambda d: d.process_index)(grid)
  assert grid.shape == (2, 4, 1) and (procs[0] == 0).all() and (procs[1] == 1).all()


@pytest.mark.parametrize(
  "dcn,slices,match",
  [
    ((2, 1, 1), 4, r"\(dcn_data=2, dcn_fsdp=1, dcn_tensor=1\) spans 2 slice\(s\), but the devices form 4"),
    ((2, 2, 1), 1, r"spans 4 slice\(s\), but the devices form 1 slice"),
    ((-1, 3, 1), 4, r"needs a multiple of 3 slice\(s\), but the devices form 4"),
  ],
)
def test_a_dcn_layout_for_another_slice_count_is_one_error_naming_both(dcn, slices, match):
  with pytest.raises(ValueError, match=match) as e:
    sharding.resolve_dcn_shape(*dcn, slices)
  assert "\n" not in str(e.value) and "dcn_data=-1" in str(e.value)


def test_mesh_from_settings_refuses_unknown_keys():
  with pytest.raises(ValueError, match=r"unknown keys \['dcn_model'\]"):
    sharding.mesh_from_settings({"data": 1, "dcn_model": 2})
