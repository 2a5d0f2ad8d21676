"""A tiny trained workdir and deterministic stand-ins for the SD3 text encoders and VAE, shared by
the tests of the commands that sample a run (sd3-sample, sd3-evaluate, sd3-geneval-export)."""

import os
import subprocess
import sys
import zlib

import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def conditioner(prompts):
  """Deterministic stand-in for the text encoders: each prompt hashes to fixed random vectors
  (context [8, 32], pooled [32], the tiny config's widths)."""
  rs = [np.random.default_rng(zlib.crc32(p.encode())) for p in prompts]
  return (
    jnp.asarray(np.stack([r.standard_normal((8, 32)) for r in rs]), jnp.float32),
    jnp.asarray(np.stack([r.standard_normal(32) for r in rs]), jnp.float32),
  )


def decoder(z):
  """Stand-in for the VAE decoder: latents -> RGB in [-1, 1]."""
  return jnp.tanh(3.0 * z[..., :3])


def train_tiny(workdir: str) -> str:
  """Trains configs/tiny.py for 2 steps (no validation) into ``workdir`` and returns it."""
  subprocess.run(
    [
      sys.executable,
      "-m",
      "sd3_jax.main",
      "--config",
      "configs/tiny.py",
      "--workdir",
      workdir,
      "--config.total_steps=2",
      "--config.val.every=0",
    ],
    cwd=REPO,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
    check=True,
    capture_output=True,
    timeout=600,
  )
  return workdir
