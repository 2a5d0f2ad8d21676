"""The sampler's schedule and Euler steps against diffusers' FlowMatchEulerDiscreteScheduler."""

import jax
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from sd3_jax.inference import sampling


@pytest.mark.parametrize(
  "steps,shift", [(1, 3.0), (4, 3.0), (28, 3.0), (40, 3.0), (50, 1.0), (28, 2.5), (20, 3.2), (7, 6.0), (13, 0.7)]
)
def test_sigmas_equal_diffusers(steps, shift):
  sch = FlowMatchEulerDiscreteScheduler(shift=shift)
  sch.set_timesteps(steps)
  ours = sampling.sampling_sigmas(steps, shift)
  assert ours.dtype == np.float32 and ours.shape == (steps + 1,)
  np.testing.assert_array_equal(ours, sch.sigmas.numpy())


def _velocity(x, sigma, c):  # any x- and sigma-dependent field, same float32 ops in torch and jnp
  return x * (1 - sigma) - c * sigma


@pytest.mark.parametrize("denoise", [1.0, 0.6])
def test_euler_equals_diffusers_step(denoise):
  n, shift = 10, 3.0
  r = np.random.default_rng(0)
  noise, x_init, c = (r.standard_normal((2, 4, 4, 3)).astype(np.float32) for _ in range(3))
  sch = FlowMatchEulerDiscreteScheduler(shift=shift)
  sch.set_timesteps(n)
  start = int(n * (1 - denoise))  # the reference's img2img start
  if start:
    sch.set_begin_index(start)
    x = sch.scale_noise(torch.from_numpy(x_init), sch.timesteps[start : start + 1], torch.from_numpy(noise))
  else:
    x = torch.from_numpy(noise)
  for i, t in enumerate(sch.timesteps[start:]):
    x = sch.step(_velocity(x, sch.sigmas[start + i], torch.from_numpy(c)), t, x).prev_sample
  run = jax.jit(
    lambda nz, xi: sampling.euler_sample(
      lambda x, s, i: _velocity(x, s, c), nz, sampling.sampling_sigmas(n, shift), x_init=xi, denoise=denoise
    )
  )
  ours = run(noise, x_init if start else None)
  np.testing.assert_allclose(np.asarray(ours), x.numpy(), rtol=1e-6, atol=1e-6)
