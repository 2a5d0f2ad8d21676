"""The deterministic sampler of every formulation: diffusers' DDIM and EDM Euler schedulers as
oracles for whole runs, the schedules, the shift, and integration of a Gaussian-data field to
the right marginal."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sd3_jax import flow
from sd3_jax.inference import sampling
from sd3_jax.flow import solver

NON_RF = ("eps/linear", "v/linear", "eps/cos", "v/cos", "edm(-1.20,1.20)", "edm(0.00,0.60)", "edm/cos", "edm/rf")


def _net(x, time):
  """A stand-in network: nonlinear in its input, depends on the time it is given."""
  return 0.8 * jnp.tanh(x) + 0.3 * jnp.sin(0.01 * time + x)


def _torch_net(x, time):
  import torch

  return 0.8 * torch.tanh(x) + 0.3 * torch.sin(0.01 * time + x)


def _run(f, z0, n, shift=1.0):
  sched = solver.ode_schedule(f, n, shift)
  return sched, solver.integrate(lambda x, tin, i: _net(x, tin * 1000.0), z0, **sched.arrays())


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_vp_sampler_is_diffusers_ddim(prediction):
  import torch
  from diffusers import DDIMScheduler

  f = flow.get_formulation("eps/linear" if prediction == "epsilon" else "v/linear")
  z0 = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
  for n in (10, 25):
    ddim = DDIMScheduler(
      num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
      clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing", prediction_type=prediction,
    )  # fmt: skip
    ddim.set_timesteps(n)
    x = torch.from_numpy(np.array(z0))
    for k in ddim.timesteps:
      x = ddim.step(_torch_net(x, float(k)), int(k), x).prev_sample
    sched, got = _run(f, z0, n)
    np.testing.assert_allclose(sched.time_input * 1000, ddim.timesteps.numpy(), atol=1e-3)
    np.testing.assert_allclose(got, x.numpy(), rtol=1e-4, atol=1e-4)


def test_edm_sampler_is_diffusers_edm_euler():
  import torch
  from diffusers import EDMEulerScheduler

  f = flow.get_formulation("edm(-1.20,1.20)")
  for n in (5, 18):
    edm = EDMEulerScheduler(sigma_data=0.5)
    edm.set_timesteps(n)
    z0 = jax.random.normal(jax.random.key(1), (2, 4, 4, 3)) * float(edm.init_noise_sigma)
    x = torch.from_numpy(np.array(z0))
    for c_noise in edm.timesteps:
      out = _torch_net(edm.scale_model_input(x, c_noise), float(c_noise))
      x = edm.step(out, c_noise, x).prev_sample
    sched, got = _run(f, z0, n)
    np.testing.assert_allclose(sched.sigma, edm.sigmas[:-1].numpy(), rtol=1e-5)
    np.testing.assert_allclose(sched.start_noise_scale(), float(edm.init_noise_sigma), rtol=1e-6)
    np.testing.assert_allclose(got, x.numpy(), rtol=1e-4, atol=1e-4)


def test_schedules_and_shift():
  for name in NON_RF:
    f = flow.get_formulation(name)
    for n in (1, 7):
      s = solver.ode_schedule(f, n)
      assert len(s) == n and np.all(np.diff(s.t) < 0) and np.all(np.isfinite(s.A)) and np.all(np.isfinite(s.B))
    base, shifted = solver.ode_schedule(f, 6), solver.ode_schedule(f, 6, shift=3.0)
    lam, lam3 = base.log_snr, shifted.log_snr
    if name.endswith("linear"):  # bounded SNR: stays inside it
      assert np.all(lam3 >= f.path.lam_min) and np.all(lam3 <= lam)
    else:
      np.testing.assert_allclose(lam3, lam - 2 * math.log(3.0), rtol=1e-12)
    inner = np.isfinite(lam)
    a, b = f.path.scale(lam[inner])
    np.testing.assert_allclose(2 * np.log(a / b), lam[inner], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(f.log_snr(base.t[inner]), lam[inner], rtol=1e-4)  # t is for reading
  with pytest.raises(ValueError, match="sampling_sigmas"):
    solver.ode_schedule(flow.get_formulation("rf"), 4)
  with pytest.raises(ValueError, match="num_steps"):
    solver.ode_schedule(flow.get_formulation("v/cos"), 0)


MU, STD = 0.5, 0.6  # the data: N(MU, STD^2) in every element


def _posterior(a, b, z):
  """E[x0 | z] and E[eps | z] for z = a x0 + b eps with x0 ~ N(MU, STD^2)."""
  var = a * a * STD**2 + b * b
  return MU + a * STD**2 / var * (z - a * MU), b / var * (z - a * MU)


@pytest.mark.parametrize("name", NON_RF + ("rf", "rf/lognorm(0.00,1.00)"))
def test_sampler_integrates_gaussian_data_to_its_marginal(name):
  f = flow.get_formulation(name)
  eps = jax.random.normal(jax.random.key(2), (20000, 1, 1, 1))
  if f.is_rectified:  # the reference sampler: Euler in t on the exact velocity
    sigmas = sampling.sampling_sigmas(200, shift=1.0)

    def velocity(x, s, i):
      x0_hat, eps_hat = _posterior(1.0 - s, s, x)
      return eps_hat - x0_hat

    end = sampling.euler_sample(velocity, eps, sigmas)
  else:
    sched = solver.ode_schedule(f, 200)
    a0, b0 = float(sched.alpha[0]), float(sched.sigma[0])
    z0 = a0 * MU + math.sqrt(a0 * a0 * STD**2 + b0 * b0) * eps  # the exact marginal at the start
    a, b = jnp.asarray(sched.alpha), jnp.asarray(sched.sigma)
    p, q = (
      jnp.asarray(np.broadcast_to(c, a.shape), jnp.float32)
      for c in f.coefficients_at(sched.alpha.astype(np.float64), sched.sigma.astype(np.float64))[:2]
    )

    def predict(x_in, tin, i):  # the output that implies the exact posterior mean of x0
      z = x_in / jnp.asarray(sched.input_scale)[i]
      x0_hat, _ = _posterior(a[i], b[i], z)
      return (x0_hat - p[i] * z) / q[i]

    end = solver.integrate(predict, z0, **sched.arrays())
  end = np.asarray(end).ravel()
  assert abs(end.mean() - MU) < 0.02 and abs(end.std() - STD) < 0.02, (end.mean(), end.std())
