"""The sampling commands' library and CLI on a tiny trained workdir: ``load_workdir`` reads only
the wanted parameters, ``write_sample_grid`` and ``sd3-sample`` (pluggable text encoders and
decoder, --vae, default output inside the run, the run's text lengths, one-line errors, --help).
The sampler itself is tested in test_sampling.py."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn
from PIL import Image

from sd3_jax import command
from sd3_jax import sample as sample_cli
from sd3_jax import sharding
from sd3_jax.inference import generation, sampling
from sd3_jax.models import vae
from sd3_jax.storage import checkpoint as ckpt_lib
from sd3_jax.storage import pretrained
from sd3_jax.training import optimizer, state as state_lib
from tiny_run_helpers import REPO, conditioner as _conditioner, decoder as _decoder, train_tiny


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return train_tiny(str(tmp_path_factory.mktemp("run")))


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


def test_cli_writes_into_the_run_says_where_and_encodes_with_the_runs_text_lengths(
  workdir, monkeypatch, capsys, caplog
):
  """Without --out the grid goes to WORKDIR/samples/ (never over an earlier one) and the path is
  printed; without --clip_length/--t5_length the prompts are encoded with the run's lengths
  (tiny: 4 CLIP + 4 T5 tokens); other lengths are used but warned about in one line."""
  from sd3_jax import text_conditioning

  asked = []

  def load_conditioner(path, **kw):
    asked.append((path, kw["clip_length"], kw["t5_length"]))
    return _conditioner

  monkeypatch.setattr(text_conditioning, "load_conditioner", load_conditioner)
  # the settings of test_write_sample_grid_and_cli: its compiled sampler is reused
  argv = ["--workdir", workdir, "--text_encoders", "T", "--num_per_prompt", "2", "--num_steps", "3", "--cfg_scale", "2"]
  argv += sum((["--prompt", p] for p in ("a red circle", "a blue square", "a green triangle")), [])
  for n in range(2):
    sample_cli.main(argv, decoder=_decoder)
    path = os.path.join(workdir, "samples", f"sample_step_00000002_{n:03d}.png")
    assert capsys.readouterr().out == f"wrote {path} (3 prompts x 2, a 32x22 grid)\n" and os.path.exists(path)
  assert asked == [("T", 4, 4)] * 2
  assert not [r for r in caplog.records if r.levelname == "WARNING" and "--clip_length" in r.getMessage()]
  out = str(os.path.join(os.path.dirname(workdir), "other.png"))
  sample_cli.main(argv + ["--clip_length", "77", "--t5_length", "4", "--out", out], decoder=_decoder)
  assert asked[-1] == ("T", 77, 4) and os.path.exists(out)
  (warning,) = [r.getMessage() for r in caplog.records if "--clip_length" in r.getMessage()]
  assert "--clip_length 77 --t5_length 4 differ from the 4 CLIP + 4 T5 tokens the run was trained with" in warning
  assert "\n" not in warning
  # A converted checkpoint has no run: beside it, in CHECKPOINT_samples/, and SD3's 77 + 77.
  assert sample_cli.default_out(None, "/ckpt/sd3m", None) == "/ckpt/sd3m_samples/sample_000.png"
  from sd3_jax.inference import loader

  assert loader.text_lengths(None, None, None) == (77, 77) and loader.text_lengths(12, None, None) == (12, 77)


def test_cli_without_text_encoders_suggests_the_workdirs(tmp_path, capsys):
  (tmp_path / "text_encoders").mkdir()
  for wd, hint in ((tmp_path, f"; this workdir has one: --text_encoders {tmp_path}/text_encoders"), ("W", "")):
    with pytest.raises(SystemExit) as e:
      command.run(sample_cli.main, "sd3-sample", ["--workdir", str(wd), "--prompt", "p", "--pixel_space"])
    err = capsys.readouterr().err
    assert (
      e.value.code == 2
      and err == f"sd3-sample: error: give --text_encoders DIR (our converted CLIP-L/CLIP-G/T5 checkpoints){hint}\n"
    )


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
  err = capsys.readouterr().err
  assert e.value.code == 2 and message in err and err.count("\n") == 1 and err.startswith("sd3-sample: error: "), err


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
