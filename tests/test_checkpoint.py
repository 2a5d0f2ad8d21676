"""checkpoint.py on 8 fake devices: sharded save/restore (same and other meshes), keep-N, grain
iterator position, config, interrupted saves, error messages."""

import os

import flax
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from sd3_jax.storage.checkpoint import Checkpointer, abstract_like

CONFIG = {"model": "d2", "lr": 1e-4, "mesh": [2, 4], "note": "tiny"}


def _mesh(shape, names):
  return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names))


def _shardings(tree, mesh, spec_fn):
  return jax.tree.map(lambda x: NamedSharding(mesh, spec_fn(x)), tree)


def _fsdp_spec(x):  # shard the first axis on 'fsdp' when it divides, else replicate
  return P("fsdp") if x.ndim and x.shape[0] % 4 == 0 else P()


def _make_state(seed=0):
  """{'params', 'opt_state' (adamw after two updates), 'step'} with params sharded P('fsdp')."""
  mesh = _mesh((2, 4), ("data", "fsdp"))
  tx = optax.adamw(1e-2)

  def init(key):
    k1, k2, k3 = jax.random.split(key, 3)
    params = {
      "w": jax.random.normal(k1, (16, 8)),
      "b": jax.random.normal(k2, (8,)),
      "emb": jax.random.normal(k3, (3, 16)),
    }
    opt_state = tx.init(params)
    for i in range(2):
      grads = jax.tree.map(lambda p: jnp.sin(p * (i + 1)), params)
      updates, opt_state = tx.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
    return {"params": params, "opt_state": opt_state, "step": jnp.array(2, jnp.int32)}

  shardings = _shardings(jax.eval_shape(init, jax.random.key(seed)), mesh, _fsdp_spec)
  return jax.jit(init, out_shardings=shardings)(jax.random.key(seed))


def _assert_same_values(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def _assert_shardings(tree, abstract):
  jax.tree.map(
    lambda x, t: x.sharding.is_equivalent_to(t.sharding, x.ndim) or pytest.fail(f"{x.sharding} != {t.sharding}"),
    tree,
    abstract,
  )


def _dataset():
  return grain.MapDataset.range(200).shuffle(seed=3).batch(4).to_iter_dataset()


@pytest.fixture(scope="module")
def state():
  return _make_state()


def test_save_restore_same_mesh_exact(tmp_path, state):
  assert state["params"]["w"].sharding.spec == P("fsdp")
  with Checkpointer(tmp_path / "ckpt") as ckpt:
    assert ckpt.latest_step() is None and ckpt.all_steps() == []
    assert ckpt.save(2, state, config=CONFIG)
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [2]
    abstract = abstract_like(state)
    restored, config = ckpt.restore(abstract_state=abstract)
  _assert_same_values(restored, state)
  _assert_shardings(restored, abstract)
  assert jax.tree.structure(restored) == jax.tree.structure(state)  # optax namedtuples intact
  assert config == CONFIG
  assert sorted(os.listdir(tmp_path / "ckpt" / "2")) == [
    "_CHECKPOINT_METADATA",
    "checksums",
    "commit_success.txt",
    "config",
    "state",
  ]


@pytest.mark.parametrize(
  "shape,names,spec_fn",
  [
    ((8,), ("fsdp",), lambda x: P("fsdp") if x.ndim and x.shape[0] % 8 == 0 else P()),
    ((4, 2), ("fsdp", "tensor"), lambda x: P(None, "tensor") if x.ndim == 2 and x.shape[1] % 2 == 0 else P()),
  ],
)
def test_restore_onto_other_mesh(tmp_path, state, shape, names, spec_fn):
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(2, state)
    ckpt.wait_until_finished()
  mesh = _mesh(shape, names)
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec_fn(x))), state
  )
  with Checkpointer(tmp_path) as ckpt:  # a new process after a restart
    restored, config = ckpt.restore(2, abstract_state=abstract)
  assert config is None
  _assert_same_values(restored, state)
  _assert_shardings(restored, abstract)
  w = restored["params"]["w"]
  assert w.sharding.mesh.devices.shape == shape
  assert {s.data.shape for s in w.addressable_shards} == {w.sharding.shard_shape(w.shape)}


def test_restore_casts_to_requested_dtype(tmp_path, state):
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(2, state)
    ckpt.wait_until_finished()
    abstract = abstract_like(state)
    abstract["params"] = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16, sharding=x.sharding), abstract["params"]
    )
    restored, _ = ckpt.restore(abstract_state=abstract)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(restored["params"]))
  _assert_same_values(restored["params"], jax.tree.map(lambda x: x.astype(jnp.bfloat16), state["params"]))


def test_keep_n_and_async_flag(tmp_path, state):
  for async_save in (True, False):
    d = tmp_path / str(async_save)
    with Checkpointer(d, max_to_keep=2, async_save=async_save) as ckpt:
      for step in (1, 2, 3, 4):
        bumped = dict(state, step=state["step"] + step)
        assert ckpt.save(step, bumped)
      ckpt.wait_until_finished()
      assert ckpt.all_steps() == [3, 4]
    assert sorted(os.listdir(d)) == ["3", "4"]
    with Checkpointer(d, max_to_keep=2) as ckpt:
      assert ckpt.latest_step() == 4
      restored, _ = ckpt.restore(abstract_state=abstract_like(state))
      assert int(restored["step"]) == 2 + 4
      assert not ckpt.reached_preemption(4)


def test_data_iterator_resumes_at_next_element(tmp_path, state):
  it = iter(_dataset())
  for _ in range(3):
    next(it)
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(3, state, data_iterator=it)
    # Training goes on while the save finishes: the saved position is the one at save().
    expected = [next(it) for _ in range(4)]
    ckpt.wait_until_finished()
  fresh = iter(_dataset())
  assert not np.array_equal(next(iter(_dataset())), expected[0])
  with Checkpointer(tmp_path) as ckpt:
    _, _ = ckpt.restore(abstract_state=abstract_like(state), data_iterator=fresh)
  for want in expected:
    np.testing.assert_array_equal(next(fresh), want)


@flax.struct.dataclass
class _TrainState:
  step: jax.Array
  params: dict
  opt_state: optax.OptState
  apply_fn: object = flax.struct.field(pytree_node=False, default=None)


def test_dataclass_state_round_trip(tmp_path, state):
  ts = _TrainState(step=state["step"], params=state["params"], opt_state=state["opt_state"])
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(5, ts)
    ckpt.wait_until_finished()
    restored, _ = ckpt.restore(abstract_state=abstract_like(ts))
  assert isinstance(restored, _TrainState)
  _assert_same_values(restored, ts)


def _failing_iterator():
  """A grain iterator whose position cannot be read: its save dies half-way (after orbax
  created the step's tmp directory and began writing the state)."""
  it = iter(_dataset())

  def get_state():
    raise OSError("disk went away")

  it.get_state = get_state
  return it


def test_interrupted_save_keeps_last_good_checkpoint(tmp_path, state):
  d = tmp_path / "ckpt"
  it = iter(_dataset())
  with Checkpointer(d, max_to_keep=2) as ckpt:
    ckpt.save(1, state, data_iterator=it)
    ckpt.save(2, dict(state, step=state["step"] + 10), data_iterator=it)
    ckpt.wait_until_finished()
    with pytest.raises(OSError, match="disk went away"):
      ckpt.save(3, dict(state, step=state["step"] + 20), data_iterator=_failing_iterator())
      ckpt.wait_until_finished()
    assert ckpt.latest_step() == 2 and ckpt.all_steps() == [1, 2]  # keep-N deleted nothing
  leftovers = sorted(os.listdir(d))
  assert "1" in leftovers and "2" in leftovers and "3" not in leftovers
  assert any(name.startswith("3.") for name in leftovers), leftovers  # the tmp dir of step 3
  # A step directory that never committed (e.g. a partial copy) is ignored as well.
  os.makedirs(d / "7" / "state")
  with Checkpointer(d, max_to_keep=2) as ckpt:  # restart
    assert ckpt.latest_step() == 2 and ckpt.all_steps() == [1, 2]
    restored, _ = ckpt.restore(abstract_state=abstract_like(state))
    assert int(restored["step"]) == 12
    with pytest.raises(FileNotFoundError, match="step 7"):
      ckpt.restore(7, abstract_state=abstract_like(state))
  assert not any(name.startswith("3.") for name in os.listdir(d))  # tmp dir cleaned up


def test_error_messages(tmp_path, state):
  abstract = abstract_like(state)
  with Checkpointer(tmp_path / "empty") as ckpt:
    with pytest.raises(FileNotFoundError, match="no committed checkpoint in"):
      ckpt.restore(abstract_state=abstract)
  with Checkpointer(tmp_path / "c") as ckpt:
    with pytest.raises(TypeError, match="step"):
      ckpt.save(1, dict(state, step=2))  # a Python int: not a global array
    with pytest.raises(TypeError, match="JSON"):
      ckpt.save(1, state, config={"f": object()})
    ckpt.save(1, state)
    ckpt.wait_until_finished()
    with pytest.raises(FileNotFoundError, match=r"step 9 .*available steps: \[1\]"):
      ckpt.restore(9, abstract_state=abstract)

    wrong_shape = jax.tree.map(lambda x: x, abstract)
    wrong_shape["params"]["w"] = jax.ShapeDtypeStruct((16, 4), jnp.float32, sharding=abstract["params"]["w"].sharding)
    with pytest.raises(ValueError, match=r"params\.w \(checkpoint \(16, 8\), requested \(16, 4\)\)"):
      ckpt.restore(abstract_state=wrong_shape)

    extra = dict(abstract, ema=abstract["params"])
    with pytest.raises(ValueError, match=r"not in the checkpoint: ema\.b, ema\.emb, ema\.w"):
      ckpt.restore(abstract_state=extra)
    fewer = {k: v for k, v in abstract.items() if k != "opt_state"}
    with pytest.raises(ValueError, match=r"in the checkpoint but not in abstract_state: opt_state\.0\.count"):
      ckpt.restore(abstract_state=fewer)

    unsharded = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), abstract)
    with pytest.raises(ValueError, match="need a sharding"):
      ckpt.restore(abstract_state=unsharded)
    with pytest.raises(ValueError, match="no data iterator position"):
      ckpt.restore(abstract_state=abstract, data_iterator=iter(_dataset()))


def _flip_in_largest_array_file(step_dir):
  files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir / "state") for f in fs if f"{os.sep}d" in r]
  path = max(files, key=os.path.getsize)
  data = bytearray(open(path, "rb").read())
  data[len(data) // 2] ^= 0x01
  open(path, "wb").write(bytes(data))


@pytest.mark.parametrize("compress", [True, False])
def test_a_flipped_bit_is_caught_by_the_checksums_compressed_or_not(tmp_path, state, compress):
  """orbax restores a flipped bit without complaint, zstd or not; the recorded checksums don't."""
  from sd3_jax.storage import recovery

  sh = NamedSharding(state["params"]["w"].sharding.mesh, P("fsdp"))
  big = dict(state, big=jax.device_put(jax.random.normal(jax.random.key(1), (256, 64)), sh))  # 64 KiB of noise
  with Checkpointer(tmp_path, compress=compress) as ckpt:
    ckpt.save(1, big)
    ckpt.save(2, dict(big, step=big["step"] + 1))
    ckpt.wait_until_finished()
  _flip_in_largest_array_file(tmp_path / "2")
  with Checkpointer(tmp_path) as ckpt:
    with pytest.raises(recovery.DamagedCheckpoint, match=r"step 2 is damaged \(checksum\): 1 array\(s\) differ"):
      ckpt.restore(2, abstract_state=abstract_like(big))
    restored, _, step = ckpt.restore_newest_intact(abstract_state=abstract_like(big))
  assert step == 1
  _assert_same_values(restored, big)
  assert sorted(os.listdir(tmp_path)) == ["1", "2.damaged-checksum"]


def test_another_config_is_not_damage_and_old_checkpoints_restore_unchecked(tmp_path, state, caplog):
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, state)
    ckpt.wait_until_finished()
  abstract = abstract_like(state)
  w = abstract["params"]["w"]
  wrong = dict(abstract, params=dict(abstract["params"], w=jax.ShapeDtypeStruct((16, 4), w.dtype, sharding=w.sharding)))
  with Checkpointer(tmp_path) as ckpt:
    with pytest.raises(ValueError, match="state shapes do not match"):
      ckpt.restore_newest_intact(abstract_state=wrong)
  assert sorted(os.listdir(tmp_path)) == ["1"]  # nothing moved aside
  import shutil

  shutil.rmtree(tmp_path / "1" / "checksums")  # as written before checksums existed
  meta = tmp_path / "1" / "_CHECKPOINT_METADATA"
  meta.write_text(meta.read_text().replace('"checksums"', '"unused"'))
  with Checkpointer(tmp_path) as ckpt:
    restored, _, _ = ckpt.restore_newest_intact(abstract_state=abstract)
  _assert_same_values(restored, state)
  assert any("has no checksums" in r.getMessage() for r in caplog.records)
