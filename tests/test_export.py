"""Export from a training run (``tools.convert_weights --src WORKDIR[/checkpoints/STEP]``): the
exported diffusers model computes the run's own velocity; --ema/--no-ema pick the weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import SD3Transformer2DModel

from configs import tiny
from sd3_jax.storage import checkpoint, pretrained
from sd3_jax.storage import trees
from sd3_jax.training import train
from sd3_jax.convert import cli, convert


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A short run with scanned layers (the export must unscan them) and visible updates."""
  wd = tmp_path_factory.mktemp("run")
  c = tiny.get_config()
  c.total_steps, c.log_every, c.checkpoint_every, c.scan_layers = 3, 3, 3, True
  c.val.every = 0
  c.optimizer.learning_rate, c.optimizer.warmup_steps = 1e-2, 0
  train.train_and_evaluate(c, str(wd))
  return str(wd)


def test_exported_diffusers_model_gives_the_runs_velocity(run, tmp_path):
  dst = tmp_path / "transformer"
  assert cli.main(["--src", run, "--dst", str(dst), "--to", "diffusers", "--no-ema"]) == 0
  model, params, _, step = checkpoint.load_workdir(run, use_ema=False)
  assert step == 3 and model.scan_layers
  torch_model = SD3Transformer2DModel.from_pretrained(dst).eval()
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
  context = rng.standard_normal((2, 8, 32)).astype(np.float32)
  pooled = rng.standard_normal((2, 32)).astype(np.float32)
  t = np.asarray([0.3, 0.8], np.float32)
  ours = np.asarray(
    model.apply({"params": params}, jnp.asarray(x), jnp.asarray(t), jnp.asarray(pooled), jnp.asarray(context))
  )
  with torch.no_grad():
    theirs = (
      torch_model(
        hidden_states=torch.from_numpy(x.transpose(0, 3, 1, 2)),
        encoder_hidden_states=torch.from_numpy(context),
        pooled_projections=torch.from_numpy(pooled),
        timestep=torch.from_numpy(1000.0 * t),
      )
      .sample.numpy()
      .transpose(0, 2, 3, 1)
    )
  assert float(np.std(ours)) > 1e-3  # the trained final layer is no longer zero
  # Same float32 model on two frameworks: rounding only (the parity tests' limit).
  assert np.linalg.norm(theirs - ours) / np.linalg.norm(ours) < 1e-5


@pytest.mark.parametrize("use_ema", [True, False])
def test_ema_flag_picks_the_weights_and_a_step_directory_works(run, tmp_path, use_ema):
  src = f"{run}/checkpoints/3"
  dst = tmp_path / "jax"
  cfg = convert(src, dst, "jax", ema=use_ema)
  model, params = pretrained.load_pretrained(dst)
  assert cfg == model.config
  run_model, want, _, _ = checkpoint.load_workdir(run, 3, use_ema=use_ema)
  from sd3_jax.models import mmdit

  want = mmdit.unstack_block_params(jax.device_get(want), run_model.config)
  flat_got, flat_want = trees.flatten(params), trees.flatten(want)
  assert sorted(flat_got) == sorted(flat_want)
  for k in flat_want:
    np.testing.assert_array_equal(np.asarray(flat_got[k]), np.asarray(flat_want[k]), err_msg=k)


def test_ema_flag_on_a_non_run_is_an_error(run, tmp_path, capsys):
  jax_dir = tmp_path / "jax"
  convert(run, jax_dir, "jax")
  assert cli.main(["--src", str(jax_dir), "--dst", str(tmp_path / "d"), "--to", "diffusers", "--ema"]) == 2
  assert "--ema/--no-ema choose the weights of a training run" in capsys.readouterr().err
