"""config.init_from: a run starts from one of our converted checkpoints (weights and positional
table from it, EMA equal to them, fresh optimizer); mismatches fail before compiling."""

import dataclasses

import jax
import numpy as np
import pytest

from configs import tiny
from sd3_jax.storage import checkpoint, pretrained
from sd3_jax.storage import trees
from sd3_jax.training import optimizer, state as state_lib, step as step_lib, train
from sd3_jax.models import mmdit


def _config(**overrides):
  c = tiny.get_config()
  c.total_steps, c.log_every, c.checkpoint_every = 1, 1, 1
  c.val.every = 0
  for k, v in overrides.items():
    node = c
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return c


def _random_checkpoint(path, model_config):
  """A converted-checkpoint stand-in: every parameter random (the positional table too, so
  that taking it from the checkpoint is visible)."""
  params = mmdit.init_params(mmdit.MMDiT(model_config), jax.random.key(7))
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(8), len(leaves))
  params = jax.tree.unflatten(treedef, [np.asarray(0.1 * jax.random.normal(k, x.shape)) for k, x in zip(keys, leaves)])
  pretrained.save_pretrained(str(path), params, model_config)
  return params


@pytest.fixture
def no_compile(monkeypatch):
  def boom(*a, **k):
    raise AssertionError("compiled before the start-up checks failed")

  monkeypatch.setattr(state_lib, "create_sharded_state", boom)
  monkeypatch.setattr(step_lib, "make_train_step", boom)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_run_starts_from_the_checkpoint_with_a_fresh_optimizer(tmp_path, scan_layers):
  # A learning rate of 1e-30 (0 is refused by the start-up checks): Adam moves each parameter by
  # about the learning rate, far below float32's resolution of any nonzero weight, so after one
  # step the parameters equal the checkpoint's (atol covers a weight that was exactly 0).
  c = _config(scan_layers=scan_layers, **{"optimizer.learning_rate": 1e-30, "optimizer.warmup_steps": 0})
  saved = _random_checkpoint(tmp_path / "ckpt", mmdit.config_from_preset(**c.model))
  c.init_from = str(tmp_path / "ckpt")
  last = train.train_and_evaluate(c, str(tmp_path / "w"))
  assert np.isfinite(last["loss"])
  for use_ema in (False, True):
    model, params, _, step = checkpoint.load_workdir(str(tmp_path / "w"), use_ema=use_ema)
    assert step == 1
    if scan_layers:
      params = mmdit.unstack_block_params(jax.device_get(params), model.config)
    got, want = trees.flatten(params), trees.flatten(saved)
    assert sorted(got) == sorted(want)
    for k in want:
      np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=1e-7, atol=1e-25, err_msg=k)
  # A fresh optimizer: Adam's step count is 1 after the one step of this run.
  model, tx = state_lib.make_model(c), optimizer.make_optimizer(c)
  abstract, _ = state_lib.state_shardings(model, tx, train.sharding.make_mesh())
  with checkpoint.Checkpointer(str(tmp_path / "w" / "checkpoints")) as ck:
    state, _ = ck.restore(1, abstract_state=abstract)
  assert int(state.opt_state.inner_states["train"].inner_state[1][0].count) == 1


def test_shape_mismatch_names_the_leaves(tmp_path, no_compile):
  c = _config()
  ckpt_cfg = dataclasses.replace(mmdit.config_from_preset(**c.model), qk_norm=True)
  _random_checkpoint(tmp_path / "ckpt", ckpt_cfg)
  c.init_from = str(tmp_path / "ckpt")
  with pytest.raises(ValueError) as e:
    train.train_and_evaluate(c, str(tmp_path / "w"))
  msg = str(e.value)
  assert "unexpected (" in msg and "joint_blocks_0/x_block/attn/ln_q/scale" in msg
  assert "qk_norm=True" in msg and "--config.model.qk_norm=True" in msg


def test_resolution_beyond_the_checkpoint_grid_is_a_clear_error(tmp_path, no_compile):
  c = _config()
  _random_checkpoint(tmp_path / "ckpt", mmdit.config_from_preset(**c.model))  # grid 8 at patch 2
  c.init_from = str(tmp_path / "ckpt")
  c.data.latent_size = 32
  with pytest.raises(
    ValueError,
    match=r"covers a 8x8 patch grid \(latents up to 16x16\), but the run "
    r"trains on 32x32 latents \(16x16 patches\)",
  ):
    train.train_and_evaluate(c, str(tmp_path / "w"))
