"""Sampling (pure JAX; diffusers parity is in test_sampling_parity.py): schedule, CFG/SLG algebra, exact landing on a point
mass, sharded == unsharded, and the sample CLI / write_sample_grid on a tiny trained workdir."""

import dataclasses
import os
import subprocess
import sys
import zlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sd3_jax import command
from flax import linen as nn
from PIL import Image

from sd3_jax.storage import checkpoint as ckpt_lib
from sd3_jax.inference import generation
from sd3_jax.storage import pretrained
from sd3_jax import sample as sample_cli
from sd3_jax.inference import sampling
from sd3_jax import sharding
from sd3_jax.training import optimizer, state as state_lib
from sd3_jax.models import mmdit, vae

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------------------------
# Schedule (diffusers parity: test_sampling_parity.py)


def test_sigmas_keep_the_reference_double_shift():
  s = sampling.sampling_sigmas(28, 3.0)
  assert s[0] == 1.0 and s[-1] == 0.0 and np.all(np.diff(s) < 0)
  once = 3 * 0.001 / (1 + 2 * 0.001)  # shift(1/1000) = 0.002994
  np.testing.assert_allclose(s[-2], 3 * once / (1 + 2 * once), rtol=1e-6)  # shifted twice: 0.00893
  np.testing.assert_allclose(s[-4:-1], [0.19983, 0.11091, 0.00893], atol=1e-5)  # diffusers' 28-step shift-3 sigmas


def test_img2img_arguments_are_checked():
  with pytest.raises(ValueError, match="needs x_init"):
    sampling.euler_sample(lambda x, s, i: x, jnp.zeros((1, 2)), sampling.sampling_sigmas(4), denoise=0.5)
  with pytest.raises(ValueError, match="denoise"):
    sampling.img2img_start(4, 0.0)


# --------------------------------------------------------------------------------------------
# Guidance algebra with an analytic stand-in for the MM-DiT (same apply() signature)


@dataclasses.dataclass(frozen=True)
class PointMassModel:
  """Velocity of a point mass at c = mean(context) + mean(pooled) (per example):
  x_t = (1 - t) c + t eps  ->  v = eps - c = (x - c) / t. Skipping layers moves the target by
  0.1 * sum(layers + 1). Records (batch, skip_layers) of every traced call. ``exact=False``
  gives v = (x - c)(1 + t) instead, whose end point depends on the whole path."""

  exact: bool = True
  scan_layers: bool = False
  calls: list = dataclasses.field(default_factory=list, hash=False, compare=False)

  def target(self, pooled, context, skip_layers=()):
    c = jnp.mean(context, (1, 2)) + jnp.mean(pooled, 1)
    return c + 0.1 * sum(i + 1 for i in skip_layers)

  def apply(self, variables, x, t, pooled, context, skip_layers=()):
    self.calls.append((x.shape[0], tuple(skip_layers)))
    c = self.target(pooled, context, skip_layers)[:, None, None, None]
    t = t[:, None, None, None]
    return (x - c) / t if self.exact else (x - c) * (1 + t)


def _conds(b, seed=0):
  r = np.random.default_rng(seed)
  return (jnp.asarray(r.standard_normal((b, 5, 6)), jnp.float32), jnp.asarray(r.standard_normal((b, 3)), jnp.float32))


def test_cfg_algebra_in_one_batched_call():
  model = PointMassModel()
  x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 4, 4, 3)), jnp.float32)
  cond, uncond = _conds(2, 1), _conds(2, 2)
  v_c = model.apply(None, x, jnp.full((2,), 0.7), cond[1], cond[0])
  v_u = model.apply(None, x, jnp.full((2,), 0.7), uncond[1], uncond[0])
  model.calls.clear()
  g1 = sampling.guided_velocity(model, None, x, 0.7, cond, uncond, 1.0)
  assert model.calls == [(4, ())]  # cond and uncond in ONE call on the concatenated batch
  np.testing.assert_allclose(g1, v_c, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(sampling.guided_velocity(model, None, x, 0.7, cond, uncond, 0.0), v_u, rtol=1e-6)
  np.testing.assert_allclose(
    sampling.guided_velocity(model, None, x, 0.7, cond, uncond, 4.5), v_u + 4.5 * (v_c - v_u), rtol=1e-5, atol=1e-5
  )
  model.calls.clear()
  np.testing.assert_array_equal(sampling.guided_velocity(model, None, x, 0.7, cond, None, 4.5), v_c)
  assert model.calls == [(2, ())]
  with pytest.raises(ValueError, match="shapes differ"):
    sampling.guided_velocity(model, None, x, 0.7, cond, (uncond[0][:, :3], uncond[1]), 2.0)


def test_slg_window_is_the_references():
  np.testing.assert_array_equal(np.nonzero(sampling.SkipLayerGuidance().window(28))[0], [1, 2, 3, 4, 5])
  # Python-float bounds as in the reference: 0.14 * 50 = 7.000000000000001 (7.0 in float32),
  # so call 7 is in.
  np.testing.assert_array_equal(np.nonzero(sampling.SkipLayerGuidance((0,), 1.0, 0.1, 0.14).window(50))[0], [6, 7])


def test_point_mass_lands_exactly_on_its_target():
  # Euler is exact for v = (x - c) / sigma: x_{i+1} - c = (x_i - c) sigma_{i+1} / sigma_i, and the
  # last sigma is 0. With CFG the targets extrapolate: c_u + g (c_c - c_u).
  model = PointMassModel()
  (ctx, pooled), (nctx, npooled) = _conds(3, 3), _conds(1, 4)
  c_c, c_u = model.target(pooled, ctx), model.target(npooled, nctx)
  for g in (1.0, 4.0):
    out = sampling.sample(
      model,
      None,
      ctx,
      pooled,
      nctx,
      npooled,
      rng=jax.random.key(0),
      latent_shape=(4, 4, 2),
      num_steps=28,
      shift=3.0,
      cfg_scale=g,
    )
    want = jnp.broadcast_to((c_u + g * (c_c - c_u))[:, None, None, None], out.shape)
    np.testing.assert_allclose(out, want, atol=2e-5)


def test_sample_with_slg_matches_a_reference_loop():
  """sample() (noise, broadcast negative, CFG, SLG under lax.cond) against a plain Python loop
  written like the reference's SkipLayerCFGDenoiser + sample_euler."""
  model = PointMassModel(exact=False)
  (ctx, pooled), (nctx, npooled) = _conds(2, 5), _conds(1, 6)
  n, g, slg = 10, 3.0, sampling.SkipLayerGuidance((1, 2), 1.5, 0.1, 0.45)
  out = sampling.sample(
    model,
    None,
    ctx,
    pooled,
    nctx,
    npooled,
    rng=jax.random.key(7),
    latent_shape=(4, 4, 2),
    num_steps=n,
    shift=3.0,
    cfg_scale=g,
    slg=slg,
  )
  sigmas = sampling.sampling_sigmas(n, 3.0)
  noise = np.asarray(sampling.example_noise(jax.random.key(7), 2, (4, 4, 2)), np.float64)
  tc, tu, ts = (
    np.asarray(model.target(*a), np.float64)[:, None, None, None]
    for a in ((pooled, ctx), (npooled, nctx), (pooled, ctx, (1, 2)))
  )

  def reference(slg_scale):
    x, guided = noise, []
    for i in range(n):
      s = sigmas[i]
      v_c, v_u = (x - tc) * (1 + s), (x - tu) * (1 + s)
      v = v_u + (v_c - v_u) * g
      if slg_scale > 0 and i > slg.start * n and i < slg.end * n:
        v = v + (v_c - (x - ts) * (1 + s)) * slg_scale
        guided.append(i)
      x = x + (sigmas[i + 1] - s) * v
    return x, guided

  want, guided = reference(slg.scale)
  assert guided == [2, 3, 4]
  np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)
  assert np.abs(reference(0.0)[0] - want).max() > 1e-2  # SLG matters here


# --------------------------------------------------------------------------------------------
# The real (tiny) MM-DiT


TINY = mmdit.MMDiTConfig(
  depth=2,
  hidden_size=64,
  num_heads=4,
  in_channels=4,
  out_channels=4,
  pooled_dim=32,
  context_dim=32,
  pos_embed_max_size=8,
)


@pytest.fixture(scope="module")
def tiny():
  model = mmdit.MMDiT(TINY)
  # Random weights everywhere (a fresh adaLN-Zero model would output 0), without compiling init.
  r = np.random.default_rng(0)
  params = jax.tree.map(
    lambda a: jnp.asarray(0.05 * r.standard_normal(a.shape), jnp.float32), nn.unbox(mmdit.abstract_params(model))
  )
  conds = [jnp.asarray(r.standard_normal(s), jnp.float32) for s in ((3, 8, 32), (3, 32), (1, 8, 32), (1, 32))]
  return model, params, conds


def test_slg_on_the_mmdit(tiny):
  model, params, (ctx, pooled, nctx, npooled) = tiny
  x = jnp.asarray(np.random.default_rng(2).standard_normal((3, 8, 8, 4)), jnp.float32)
  neg = (jnp.repeat(nctx, 3, 0), jnp.repeat(npooled, 3, 0))
  slg = sampling.SkipLayerGuidance((0,), 2.0)

  @jax.jit
  def run(params):
    guided = [
      sampling.guided_velocity(model, params, x, 0.4, (ctx, pooled), neg, 3.0, slg, slg_active=a)
      for a in (jnp.bool_(True), jnp.bool_(False))
    ]
    plain = sampling.guided_velocity(model, params, x, 0.4, (ctx, pooled), neg, 3.0)
    t = jnp.full((3,), 0.4)
    v_c = model.apply({"params": params}, x, t, pooled, ctx)
    v_skip = model.apply({"params": params}, x, t, pooled, ctx, skip_layers=(0,))
    return guided, plain, v_c, v_skip

  (on, off), plain, v_c, v_skip = run(params)
  assert np.abs(np.asarray(v_c - v_skip)).max() > 1e-2
  # Float rounding differs between the batched (2B) and single (B) calls: ~1e-5 here.
  np.testing.assert_allclose(on, plain + 2.0 * (v_c - v_skip), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(off, plain, rtol=1e-6, atol=1e-6)


def test_sharded_scanned_sample_equals_unsharded(tiny):
  """(2, 4) data x fsdp mesh, batch 3 padded to 8, scanned layout unstacked in-jit for SLG."""
  model, params, (ctx, pooled, nctx, npooled) = tiny
  kw = dict(
    rng=jax.random.key(5),
    latent_shape=(8, 8, 4),
    num_steps=4,
    shift=3.0,
    cfg_scale=3.0,
    slg=sampling.SkipLayerGuidance((0,), 2.0, 0.01, 0.6),
  )
  ref = sampling.sample(model, params, ctx, pooled, nctx, npooled, **kw)
  mesh = sharding.make_mesh(2, 4, 1)
  scanned = model.clone(scan_layers=True)
  out = sampling.sample(scanned, mmdit.stack_block_params(params, TINY), ctx, pooled, nctx, npooled, mesh=mesh, **kw)
  assert out.shape == (3, 8, 8, 4) and np.all(np.isfinite(np.asarray(out)))
  assert np.abs(np.asarray(ref)).mean() > 0.1
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Workdir, write_sample_grid and the CLI


def _conditioner(prompts):
  """Deterministic stand-in for the text encoders: each prompt hashes to fixed random vectors."""
  rs = [np.random.default_rng(zlib.crc32(p.encode())) for p in prompts]
  return (
    jnp.asarray(np.stack([r.standard_normal((8, 32)) for r in rs]), jnp.float32),
    jnp.asarray(np.stack([r.standard_normal(32) for r in rs]), jnp.float32),
  )


def _decoder(z):
  return jnp.tanh(3.0 * z[..., :3])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  w = str(tmp_path_factory.mktemp("run"))
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  subprocess.run(
    [
      sys.executable,
      "-m",
      "sd3_jax.main",
      "--config",
      "configs/tiny.py",
      "--workdir",
      w,
      "--config.total_steps=2",
      "--config.val.every=0",
    ],
    cwd=REPO,
    env=env,
    check=True,
    capture_output=True,
    timeout=600,
  )
  return w


def test_load_workdir_reads_only_the_wanted_params(workdir):
  mesh = sharding.make_mesh(1, -1, 1)
  model, ema, config, step = ckpt_lib.load_workdir(workdir, mesh=mesh)
  _, raw, _, _ = ckpt_lib.load_workdir(workdir, mesh=mesh, use_ema=False)
  assert step == 2 and config["total_steps"] == 2 and model.config.in_channels == 4
  # The full state restored the trainer's way, for comparison.
  cfg = ml_collections.ConfigDict(config)
  abstract, _ = state_lib.state_shardings(state_lib.make_model(cfg), optimizer.make_optimizer(cfg), mesh)
  with ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints")) as ck:
    state, _ = ck.restore(2, abstract_state=abstract)
  for got, want in ((ema, state.ema_params), (raw, state.params)):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      assert a.sharding == b.sharding
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(raw)))


def test_write_sample_grid_and_cli(workdir, tmp_path):
  mesh = sharding.make_mesh(1, -1, 1)  # the CLI's default mesh: one compiled sampler for all three
  model, params, _, _ = ckpt_lib.load_workdir(workdir, mesh=mesh)
  prompts = ["a red circle", "a blue square", "a green triangle"]
  out = str(tmp_path / "grid.png")
  grid = generation.write_sample_grid(
    model,
    params,
    _conditioner,
    prompts,
    out,
    latent_shape=(8, 8, 4),
    decoder=_decoder,
    num_per_prompt=2,
    num_steps=3,
    cfg_scale=2.0,
    shift=3.0,
    seed=4,
    mesh=mesh,
  )
  assert grid.shape == (3 * 10 + 2, 2 * 10 + 2, 3)  # a row per prompt, 2 columns, 2-pixel padding
  np.testing.assert_array_equal(np.asarray(Image.open(out)), grid)
  ctx, pooled = _conditioner(prompts)
  neg = _conditioner([""])
  lat = sampling.sample(
    model,
    params,
    jnp.repeat(ctx, 2, 0),
    jnp.repeat(pooled, 2, 0),
    *neg,
    rng=jax.random.key(4),
    latent_shape=(8, 8, 4),
    num_steps=3,
    cfg_scale=2.0,
    mesh=mesh,
  )
  want = generation.to_uint8(_decoder(lat))
  tiles = [grid[2 + r * 10 : 10 + r * 10, 2 + q * 10 : 10 + q * 10] for r in range(3) for q in range(2)]
  np.testing.assert_array_equal(np.stack(tiles), want)
  assert len({t.tobytes() for t in tiles}) == 6  # prompts and samples all differ

  # The CLI with the same pluggable pieces: latent size from the run's config (8x8x4).
  argv = [
    "--workdir",
    workdir,
    *sum((["--prompt", p] for p in prompts), []),
    "--num_per_prompt",
    "2",
    "--num_steps",
    "3",
    "--cfg_scale",
    "2",
    "--seed",
    "4",
    "--out",
    str(tmp_path / "cli.png"),
  ]
  np.testing.assert_array_equal(sample_cli.main(argv, conditioner=_conditioner, decoder=_decoder), grid)
  assert os.path.exists(tmp_path / "cli.png")

  # --vae: our checkpoint format, a tiny 4-channel autoencoder with f=2, so --size 16 16 gives
  # the same 8x8x4 latents; decoded 4 at a time by the CLI, all at once here.
  vae_cfg = vae.VAEConfig(latent_channels=4, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8)
  vae_model = vae.AutoencoderKL(vae_cfg)
  r = np.random.default_rng(0)
  vae_params = jax.tree.map(
    lambda a: (0.1 * r.standard_normal(a.shape)).astype(np.float32), nn.unbox(vae.abstract_params(vae_model))
  )
  pretrained.save_pretrained(tmp_path / "vae", vae_params, vae_cfg)
  vae_grid = sample_cli.main(
    argv[:-1] + [str(tmp_path / "vae.png"), "--vae", str(tmp_path / "vae"), "--size", "16", "16"],
    conditioner=_conditioner,
  )
  assert vae_grid.shape == (3 * 18 + 2, 2 * 18 + 2, 3)
  decoded = vae_model.apply({"params": vae_params}, lat, method=vae_model.images_from_latents)
  tiles = [vae_grid[2 + r * 18 : 18 + r * 18, 2 + q * 18 : 18 + q * 18] for r in range(3) for q in range(2)]
  diff = np.abs(np.stack(tiles).astype(int) - generation.to_uint8(decoded).astype(int))
  assert diff.max() <= 1 and diff.mean() < 0.01  # uint8 rounding of float-rounding differences


@pytest.mark.parametrize(
  "argv,message",
  [
    (["--workdir", "W", "--checkpoint", "C", "--prompt", "p"], "not allowed with"),
    (["--workdir", "W"], "one of the arguments --prompt --prompts_file is required"),
    (["--checkpoint", "C", "--step", "3", "--prompt", "p"], "--step and --no_ema apply to --workdir only"),
    (["--workdir", "W", "--prompt", "p", "--vae", "V", "--pixel_space"], "not allowed with"),
    (["--workdir", "W", "--prompt", "p", "--vae", "V"], "--text_encoders"),
    (["--workdir", "W", "--prompt", "p", "--text_encoders", "T"], "--vae DIR for latent models"),
    (["--workdir", "W", "--prompt", "p", "--text_encoders", "T", "--vae", "V", "--formulation", "v/cosine"],
     "unknown formulation 'v/cosine'; valid forms: rf, "),
  ],
)  # fmt: skip
def test_cli_argument_errors(argv, message, capsys):
  with pytest.raises(SystemExit) as e:
    command.run(sample_cli.main, "sd3-sample", argv)
  assert e.value.code == 2 and message in capsys.readouterr().err


def test_cli_errors_that_need_the_model(workdir, capsys):
  common = ["--workdir", workdir, "--prompt", "p"]
  for extra, message in (
    (["--pixel_space"], "3 output channels"),
    (["--size", "60", "64"], "divisible by the VAE factor 8"),
    (["--latent_size", "7", "8"], "divisible by the patch size 2"),
  ):
    with pytest.raises(SystemExit):
      command.run(
        sample_cli.main,
        "sd3-sample",
        common + extra,
        conditioner=_conditioner,
        decoder=None if extra[0] == "--pixel_space" else _decoder,
      )
    assert message in capsys.readouterr().err


def _cli(*argv):
  return subprocess.run(
    [sys.executable, "-m", "sd3_jax.sample", *argv],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )


def test_cli_expected_failures_are_one_line(workdir, tmp_path):
  """Text encoders whose widths are not the model's, and a missing checkpoint: one line on
  stderr that names the problem and the fix, exit code 2, no traceback."""
  from sd3_jax.demo import encoders as demo_encoders

  enc = str(tmp_path / "enc")
  demo_encoders.make_text_encoders(enc, ["a red circle", "a blue square"], clip_l_dim=16, clip_g_dim=16, t5_dim=48)
  vae_cfg = vae.VAEConfig(latent_channels=4, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8)
  vae_model = vae.AutoencoderKL(vae_cfg)
  pretrained.save_pretrained(str(tmp_path / "vae"), vae.init_params(vae_model, jax.random.key(0)), vae_cfg)
  r = _cli(
    "--workdir",
    workdir,
    "--vae",
    str(tmp_path / "vae"),
    "--text_encoders",
    enc,
    "--prompt",
    "p",
    "--num_steps",
    "1",
    "--clip_length",
    "12",
    "--t5_length",
    "12",
  )
  lines = r.stderr.strip().splitlines()
  assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
  assert "text encoders give context width 48 and pooled width 32" in lines[-1]
  assert "use the text encoders the model was trained with" in lines[-1]
  r = _cli(
    "--checkpoint", str(tmp_path / "nothing"), "--vae", str(tmp_path / "vae"), "--text_encoders", enc, "--prompt", "p"
  )
  assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
  assert str(tmp_path / "nothing") in r.stderr.strip().splitlines()[-1]


def test_cli_help():
  r = subprocess.run(
    [sys.executable, "-m", "sd3_jax.sample", "--help"],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  assert r.returncode == 0, r.stderr
  for flag in ("--workdir", "--checkpoint", "--prompts_file", "--pixel_space", "--num_per_prompt", "--slg"):
    assert flag in r.stdout
