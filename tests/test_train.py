"""The trainer on 8 fake CPU devices: sharded == unsharded, rules, accumulation, resume, NaN stop."""

import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import tiny
from sd3_jax import sharding
from sd3_jax.training import optimizer, state as state_lib, step as step_lib, train, train_data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**overrides):
  c = tiny.get_config()
  for k, v in overrides.items():
    node = c
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return c


def _batches(c, n, seed=0):
  rng = np.random.default_rng(seed)
  d = c.data
  b = c.global_batch_size
  return [
    dict(
      latent=rng.standard_normal((b, d.latent_size, d.latent_size, d.latent_channels), np.float32),
      context=rng.standard_normal((b, d.context_len, d.context_dim), np.float32),
      pooled=rng.standard_normal((b, d.pooled_dim), np.float32),
    )
    for _ in range(n)
  ]


def _run_steps(c, mesh, batches):
  model, tx, opts = state_lib.make_model(c), optimizer.make_optimizer(c), step_lib.step_options(c)
  _, shardings = state_lib.state_shardings(model, tx, mesh)
  state = state_lib.create_sharded_state(model, tx, mesh, jax.random.key(c.seed), shardings)
  shapes = {k: v.shape for k, v in batches[0].items()}
  schedule = optimizer.learning_rate_schedule(c.optimizer, c.total_steps)
  step = step_lib.make_train_step(model, tx, opts, schedule, mesh, shardings, shapes)
  losses = []
  for b in batches:
    state, out = step(state, sharding.make_global_batch(b, mesh), jax.random.key(1))
    losses.append(float(out["loss"]))
  return state, np.array(losses)


def _mesh(shape, n=None):
  return sharding.make_mesh(*shape, devices=jax.devices()[:n] if n else None)


@pytest.fixture(scope="module")
def reference_run():
  # Adam divides by sqrt(v) + eps: with the default eps 1e-8 a gradient that is zero up to
  # rounding noise (adaLN-Zero entries early on) becomes a full +-lr update, so parameters of
  # two correct runs can differ by ~lr there. A larger eps keeps updates linear in tiny
  # gradients, so parameters can be compared tightly as well as losses.
  c = _config(**{"model.qk_norm": True, "model.dual_attention_layers": (0,), "optimizer.eps": 1e-3})
  batches = _batches(c, 3)
  state, losses = _run_steps(c, _mesh((1, 1, 1), 1), batches)
  return c, batches, state, losses


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 8, 1)])
def test_sharded_losses_equal_single_device(reference_run, shape):
  c, batches, ref_state, ref_losses = reference_run
  assert len(jax.devices()) == 8
  state, losses = _run_steps(c, _mesh(shape), batches)
  assert np.all(np.isfinite(losses)) and losses[0] > 0
  # Different devices reduce in a different order: float32 rounding only (~1e-7 relative per
  # op, amplified by three Adam steps whose first update is ~lr*sign(g)).
  np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=2e-5)


def test_production_step_scanned_remat_bf16_matches_plain_float32():
  """The step pods run (scanned blocks, full remat, bf16 compute, FSDP over 8 devices) against
  the plain one (unscanned, no remat, float32, one device) from the same parameters."""
  from sd3_jax.models import mmdit

  base = {
    "model.depth": 4,
    "model.hidden_size": 64,
    "model.num_heads": 4,
    "optimizer.eps": 1e-3,
    "optimizer.warmup_steps": 0,
  }
  prod = _config(**base, scan_layers=True, remat="full", dtype="bfloat16")
  ref = _config(**base)
  batches = _batches(ref, 3)
  mesh8, mesh1 = _mesh((1, 8, 1)), _mesh((1, 1, 1), 1)

  def steps(c, mesh, state, shardings):
    model, tx = state_lib.make_model(c), optimizer.make_optimizer(c)
    step = step_lib.make_train_step(
      model,
      tx,
      step_lib.step_options(c),
      optimizer.learning_rate_schedule(c.optimizer, c.total_steps),
      mesh,
      shardings,
      {k: v.shape for k, v in batches[0].items()},
    )
    losses = []
    for b in batches:
      state, out = step(state, sharding.make_global_batch(b, mesh), jax.random.key(1))
      losses.append(float(out["loss"]))
    return state, np.array(losses)

  p_model, p_tx = state_lib.make_model(prod), optimizer.make_optimizer(prod)
  assert p_model.scan_layers and p_model.remat == "full" and p_model.dtype == jnp.bfloat16
  _, p_sh = state_lib.state_shardings(p_model, p_tx, mesh8)
  p_state = state_lib.create_sharded_state(p_model, p_tx, mesh8, jax.random.key(0), p_sh)
  # The same initial parameters in the plain layout (adaLN-Zero layers randomised, so that the
  # first steps already exercise every block).
  cfg = mmdit.config_from_preset(**ref.model)
  rng = np.random.default_rng(0)
  plain = jax.tree.map(
    lambda a: np.asarray(a) if np.asarray(a).any() else (0.02 * rng.standard_normal(a.shape)).astype(np.float32),
    mmdit.unstack_block_params(jax.device_get(p_state.params), cfg),
  )
  r_model, r_tx = state_lib.make_model(ref), optimizer.make_optimizer(ref)
  _, r_sh = state_lib.state_shardings(r_model, r_tx, mesh1)
  copy = lambda tree: jax.tree.map(np.array, tree)  # distinct buffers: the step donates the state

  def state(tx, params, shardings):
    return jax.device_put(
      state_lib.TrainState(
        step=jnp.zeros((), jnp.int32), params=copy(params), opt_state=copy(tx.init(params)), ema_params=copy(params)
      ),
      shardings,
    )

  r_state = state(r_tx, plain, r_sh)
  p_state = state(p_tx, mmdit.stack_block_params(plain, cfg), p_sh)
  r_state, r_losses = steps(ref, mesh1, r_state, r_sh)
  p_state, p_losses = steps(prod, mesh8, p_state, p_sh)
  assert np.all(np.isfinite(p_losses))
  # bf16 matmuls (8-bit mantissa) with float32 accumulation and master weights: ~1% per loss.
  np.testing.assert_allclose(p_losses, r_losses, rtol=3e-2)
  got = mmdit.unstack_block_params(jax.device_get(p_state.params), cfg)
  moved = 0
  for a, b, a0 in zip(jax.tree.leaves(got), jax.tree.leaves(jax.device_get(r_state.params)), jax.tree.leaves(plain)):
    # three updates of at most ~lr (1e-3) each; bf16 gradient noise changes them by a few percent
    np.testing.assert_allclose(a, b, atol=3e-4)
    moved += int(np.abs(b - a0).max() > 1e-5)
  assert moved > len(jax.tree.leaves(plain)) // 2  # the comparison is not of untouched leaves


def test_parameter_shardings_follow_rules():
  c = _config()
  mesh = _mesh((2, 2, 2))
  model, tx = state_lib.make_model(c), optimizer.make_optimizer(c)
  abstract, shardings = state_lib.state_shardings(model, tx, mesh)
  blk = shardings.params["joint_blocks_0"]["x_block"]
  assert blk["mlp"]["fc1"]["kernel"].spec == P("fsdp", "tensor")
  assert blk["mlp"]["fc2"]["kernel"].spec == P("tensor", "fsdp")
  assert blk["attn"]["qkv"]["kernel"].spec == P("fsdp", None, "tensor", None)
  assert blk["attn"]["proj"]["kernel"].spec == P("tensor", None, "fsdp")
  assert blk["adaLN_modulation"]["kernel"].spec == P("fsdp", "tensor")
  assert shardings.params["pos_embed"].spec == P(None, None, "fsdp")
  assert shardings.step.spec == P()
  # Adam moments and EMA are sharded like the parameters they mirror.
  adam = shardings.opt_state.inner_states["train"].inner_state[1][0]
  assert adam.mu["joint_blocks_0"]["x_block"]["mlp"]["fc1"]["kernel"].spec == P("fsdp", "tensor")
  assert shardings.ema_params["joint_blocks_0"]["x_block"]["mlp"]["fc1"]["kernel"].spec == P("fsdp", "tensor")
  # Initialisation lands directly in those shardings.
  state = state_lib.create_sharded_state(model, tx, mesh, jax.random.key(0), shardings)
  leaf = state.params["joint_blocks_0"]["x_block"]["mlp"]["fc1"]["kernel"]
  assert leaf.sharding.spec == P("fsdp", "tensor")
  assert leaf.addressable_shards[0].data.shape == (leaf.shape[0] // 2, leaf.shape[1] // 2)


def test_gradient_accumulation_matches_full_batch():
  c1 = _config(**{"optimizer.eps": 1e-3})  # see reference_run for eps
  c2 = _config(grad_accum_steps=4, **{"optimizer.eps": 1e-3})
  batches = _batches(c1, 2)
  mesh = _mesh((1, 8, 1))
  s1, l1 = _run_steps(c1, mesh, batches)
  s2, l2 = _run_steps(c2, mesh, batches)
  np.testing.assert_allclose(l2, l1, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=2e-5)


def _compiled_step_hlo(c, mesh):
  model, tx, opts = state_lib.make_model(c), optimizer.make_optimizer(c), step_lib.step_options(c)
  abstract, shardings = state_lib.state_shardings(model, tx, mesh)
  shapes = train_data.batch_shapes(c)
  batch = {
    k: jax.ShapeDtypeStruct(s, jnp.float16, sharding=sharding.batch_sharding(mesh, len(s))) for k, s in shapes.items()
  }
  rng = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=sharding.replicated(mesh))
  schedule = optimizer.learning_rate_schedule(c.optimizer, c.total_steps)
  step = step_lib.make_train_step(model, tx, opts, schedule, mesh, shardings, shapes)
  return step.lower(abstract, batch, rng).compile().as_text()


def test_gradient_accumulation_moves_no_batch_between_devices():
  """Each microbatch keeps the batch sharding: the accumulated step has no all-to-all or
  collective-permute (a reshard of the batch) that the plain step lacks."""
  mesh = _mesh((2, 4, 1))
  count = lambda hlo: {
    op: hlo.count(f" {op}(") + hlo.count(f" {op}-start(") for op in ("all-to-all", "collective-permute")
  }
  plain = count(_compiled_step_hlo(_config(global_batch_size=32), mesh))
  accum = count(_compiled_step_hlo(_config(global_batch_size=32, grad_accum_steps=4), mesh))
  for op in plain:
    assert accum[op] <= plain[op], (op, accum, plain)


def test_ema_changes_only_on_its_steps():
  c = _config(**{"ema.every": 2, "ema.decay": 0.9})
  mesh = _mesh((1, 8, 1))
  model, tx, opts = state_lib.make_model(c), optimizer.make_optimizer(c), step_lib.step_options(c)
  _, shardings = state_lib.state_shardings(model, tx, mesh)
  state = state_lib.create_sharded_state(model, tx, mesh, jax.random.key(c.seed), shardings)
  init = jax.tree.map(np.asarray, state.ema_params)
  batches = _batches(c, 2)
  schedule = optimizer.learning_rate_schedule(c.optimizer, c.total_steps)
  step = step_lib.make_train_step(model, tx, opts, schedule, mesh, shardings, train_data.batch_shapes(c))
  state, _ = step(state, sharding.make_global_batch(batches[0], mesh), jax.random.key(1))
  for a, b in zip(jax.tree.leaves(state.ema_params), jax.tree.leaves(init)):
    np.testing.assert_array_equal(np.asarray(a), b)  # step 1: untouched
  state, _ = step(state, sharding.make_global_batch(batches[1], mesh), jax.random.key(1))
  for e, p, e0 in zip(jax.tree.leaves(state.ema_params), jax.tree.leaves(state.params), jax.tree.leaves(init)):
    np.testing.assert_allclose(np.asarray(e), 0.9 * e0 + 0.1 * np.asarray(p), rtol=1e-6, atol=1e-7)


def test_pos_embed_is_frozen_and_ema_moves():
  c = _config(**{"ema.every": 1})
  mesh = _mesh((1, 8, 1))
  model, tx = state_lib.make_model(c), optimizer.make_optimizer(c)
  _, shardings = state_lib.state_shardings(model, tx, mesh)
  init = state_lib.create_sharded_state(model, tx, mesh, jax.random.key(c.seed), shardings)
  pos0 = np.asarray(init.params["pos_embed"])
  state, _ = _run_steps(c, mesh, _batches(c, 2))
  np.testing.assert_array_equal(np.asarray(state.params["pos_embed"]), pos0)
  p = np.asarray(state.params["final_layer"]["linear"]["kernel"])
  e = np.asarray(state.ema_params["final_layer"]["linear"]["kernel"])
  assert np.any(p != 0) and np.any(e != 0) and not np.allclose(p, e)


def _read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _main(workdir, *flags, env=None, **popen):
  cmd = [
    sys.executable,
    "-m",
    "sd3_jax.main",
    "--config",
    os.path.join(REPO, "configs/tiny.py"),
    "--workdir",
    workdir,
    *flags,
  ]
  e = dict(os.environ, **(env or {}))
  return subprocess.Popen(cmd, cwd=REPO, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


COMMON = [
  "--config.total_steps=16",
  "--config.log_every=2",
  "--config.checkpoint_every=4",
  "--config.val.every=8",
  "--config.mesh.fsdp=4",
  "--config.mesh.data=2",
]


def test_resume_after_kill_is_exact(tmp_path):
  """Kill -9 mid-run (after some checkpoints), rerun the same command: identical losses."""
  full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
  p = _main(full, *COMMON)
  out, _ = p.communicate(timeout=600)
  assert p.returncode == 0, out
  p = _main(cut, *COMMON)
  ckdir = os.path.join(cut, "checkpoints")
  deadline = time.time() + 600
  while time.time() < deadline and p.poll() is None:
    steps = [int(s) for s in os.listdir(ckdir) if s.isdigit()] if os.path.isdir(ckdir) else []
    if steps and max(steps) >= 8:
      break
    time.sleep(0.05)
  p.kill()
  p.communicate()
  killed_at = max(_read_metrics(cut))
  assert killed_at < 16, "the run finished before it could be killed"
  p = _main(cut, *COMMON)
  out, _ = p.communicate(timeout=600)
  assert p.returncode == 0, out
  assert "resuming from step" in out
  a, b = _read_metrics(full), _read_metrics(cut)
  assert sorted(a) == sorted(b) == list(range(2, 17, 2))
  assert a == b  # exact equality of every logged loss


def test_restore_onto_different_mesh(tmp_path):
  wd = str(tmp_path / "w")
  p = _main(wd, "--config.total_steps=4", "--config.checkpoint_every=4", "--config.val.every=0", "--config.mesh.fsdp=8")
  out, _ = p.communicate(timeout=600)
  assert p.returncode == 0, out
  p = _main(
    wd,
    "--config.total_steps=6",
    "--config.checkpoint_every=2",
    "--config.val.every=0",
    "--config.mesh.fsdp=2",
    "--config.mesh.tensor=2",
    "--config.mesh.data=2",
  )
  out, _ = p.communicate(timeout=600)
  assert p.returncode == 0, out
  assert "resuming from step 4 (" in out
  assert max(_read_metrics(wd)) == 6


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  wd = str(tmp_path / "w")
  p = _main(wd, "--config.total_steps=4", "--config.checkpoint_every=2", "--config.val.every=0")
  out, _ = p.communicate(timeout=600)
  assert p.returncode == 0, out
  # Resume with an absurd learning rate: the parameters overflow and the loss turns NaN/Inf.
  p = _main(
    wd,
    "--config.total_steps=12",
    "--config.checkpoint_every=2",
    "--config.log_every=1",
    "--config.val.every=0",
    "--config.optimizer.learning_rate=1e30",
    "--config.optimizer.warmup_steps=0",
    "--config.optimizer.grad_clip=0",
  )
  out, _ = p.communicate(timeout=600)
  assert p.returncode == 3, out
  assert "non-finite training values" in out and "last good checkpoint" in out
  # The inputs (synthetic, finite) were re-read: it is the training that diverged.
  assert "the TRAINING diverged" in out and "are all finite" in out
  steps = sorted(int(s) for s in os.listdir(os.path.join(wd, "checkpoints")) if s.isdigit())
  assert steps and steps[-1] >= 4
  # Every kept checkpoint restores to finite parameters.
  from sd3_jax.storage import checkpoint as ckpt_lib

  c = _config()
  mesh = _mesh((1, 8, 1))
  model, tx = state_lib.make_model(c), optimizer.make_optimizer(c)
  abstract, _ = state_lib.state_shardings(model, tx, mesh)
  ck = ckpt_lib.Checkpointer(os.path.join(wd, "checkpoints"), max_to_keep=2)
  state, _ = ck.restore(ck.latest_step(), abstract_state=abstract)
  ck.close()
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state.params))


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 4, 2), (2, 4, 1)])
def test_sharded_forward_of_random_model_equals_unsharded(shape):
  """adaLN-Zero hides sharding bugs at init (modulations are zero), so randomise everything."""
  from sd3_jax.models import mmdit

  c = _config(**{"model.qk_norm": True, "model.dual_attention_layers": (0,)})
  model = state_lib.make_model(c)
  params = mmdit.init_params(model, jax.random.key(0))
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(treedef, [0.2 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
  b = _batches(c, 1)[0]
  t = np.linspace(0.1, 0.9, c.global_batch_size).astype(np.float32)
  ref = model.apply({"params": params}, b["latent"], t, b["pooled"], b["context"])
  mesh = _mesh(shape)
  specs = sharding.logical_specs(mmdit.abstract_params(model))
  shardings = sharding.logical_to_mesh_shardings(specs, mesh)
  sharded = jax.device_put(params, shardings)

  @jax.jit
  def fwd(p, batch, t):
    with sharding.logical_axes(mesh):
      return model.apply({"params": p}, batch["latent"], t, batch["pooled"], batch["context"])

  got = fwd(sharded, sharding.make_global_batch(b, mesh), jnp.asarray(t))
  rel = float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))
  assert rel < 1e-5, rel


def test_periodic_sample_grids(tmp_path, monkeypatch):
  """config.sample.every writes PNG grids from the EMA weights (conditioner stubbed by a
  deterministic function: real text encoders need tokenizer files, tested elsewhere)."""
  from PIL import Image
  from sd3_jax import text_conditioning

  c = _config(
    total_steps=2,
    log_every=1,
    checkpoint_every=2,
    **{
      "val.every": 0,
      "sample.every": 1,
      "sample.prompts": ("a", "b"),
      "sample.num_steps": 2,
      "sample.pixel_space": True,
      "sample.text_encoders": "unused",
      "model.in_channels": 3,
      "model.out_channels": 3,
      "data.latent_channels": 3,
    },
  )

  def conditioner(prompts):
    n = len(prompts)
    return (
      np.full((n, c.data.context_len, c.data.context_dim), 0.1, np.float32),
      np.full((n, c.data.pooled_dim), 0.1, np.float32),
    )

  monkeypatch.setattr(text_conditioning, "load_conditioner", lambda path, **kw: conditioner)
  train.train_and_evaluate(c, str(tmp_path))
  grids = sorted(os.listdir(tmp_path / "samples"))
  assert grids == ["step_00000001.png", "step_00000002.png"]
  img = np.asarray(Image.open(tmp_path / "samples" / grids[-1]))
  assert img.ndim == 3 and img.shape[0] >= c.data.latent_size


def test_indivisible_mesh_is_a_clear_error():
  c = _config(**{"model.hidden_size": 36, "model.num_heads": 4})  # 36 is not divisible by fsdp 8
  model, tx = state_lib.make_model(c), optimizer.make_optimizer(c)
  with pytest.raises(ValueError, match=r"dimension 36 is split over mesh axes \('fsdp',\) of total size 8"):
    state_lib.state_shardings(model, tx, _mesh((1, 8, 1)))
