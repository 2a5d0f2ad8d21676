"""The formulations of the paper's study: names, the paths and targets against diffusers'
schedulers and closed forms, the paper's weightings, the training densities, round trips, and
the rf yardstick that puts every formulation on one axis."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from sd3_jax import flow
from sd3_jax.flow import levels, rectified

N = 1 << 15
KS_EPS = math.sqrt(math.log(2 / 1e-6) / (2 * N))  # Dvoretzky-Kiefer-Wolfowitz at 1e-6
ALL = flow.FORMULATIONS + ("edm/rf/lognorm(0.00,1.00)", "edm/eps/cos", "rf/lognorm(0.30,0.70)")
# one of each path, prediction and weighting (the rf densities share all the rest)
DISTINCT = ("rf/lognorm(0.00,1.00)", "rf", "eps/linear", "v/linear", "eps/cos", "v/cos", "edm(-1.20,1.20)",
            "edm(0.00,0.60)", "edm/cos", "edm/rf", "edm/rf/lognorm(0.00,1.00)", "edm/eps/cos")  # fmt: skip


def _data(shape=(6, 4, 4, 3), seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return jax.random.normal(k1, shape) * 0.7 + 0.2, jax.random.normal(k2, shape)


def _levels(f, n=6):
  """n own times spread over log-SNR -5..5 (inside every formulation's range, LDM's included)."""
  return jnp.asarray(np.asarray(f.t_of_log_snr(np.linspace(-5.0, 5.0, n)), np.float32))


# --------------------------------------------------------------------------------------------
# Names


def test_names_parse_to_canonical_form():
  for name in ALL:
    f = flow.get_formulation(name)
    assert f.name == name and flow.get_formulation(f.name) == f
  assert flow.get_formulation(" RF/lognorm( 0, 1 ) ").name == flow.DEFAULT
  assert flow.get_formulation("edm(-1.2,1.2)").name == "edm(-1.20,1.20)"
  assert flow.get_formulation("rf/lognorm(0.125,1)").name == "rf/lognorm(0.125,1.00)"
  assert flow.get_formulation("edm/v/cos").name == "edm/cos"
  f = flow.get_formulation("rf/mode(1.29)", shift=3.0)
  assert f.density.shift == 3.0 and f.density.mode_scale == 1.29


@pytest.mark.parametrize(
  "name",
  ["", "flow", "rf/lognorm(0,-1)", "rf/lognorm(0)", "rf/mode(3)", "edm(1)", "edm(0,0)", "eps/edm", "edm/linear",
   "edm/edm(0,1)", "v/rf", "rf/lognorm(a,b)", "rf/cosmap(1)"],
)  # fmt: skip
def test_bad_names_list_the_valid_forms(name):
  with pytest.raises(ValueError, match=r"valid forms: rf, rf/lognorm\(m,s\), rf/mode\(s\)"):
    flow.get_formulation(name)


def test_shift_belongs_to_rectified_flow():
  with pytest.raises(ValueError, match="rectified-flow formulations"):
    flow.get_formulation("eps/linear", shift=3.0)
  with pytest.raises(ValueError, match="> 0"):
    flow.get_formulation("rf", shift=-1.0)


# --------------------------------------------------------------------------------------------
# Paths and targets against diffusers and closed forms


def test_ldm_linear_matches_diffusers_ddpm():
  import torch
  from diffusers import DDPMScheduler

  sched = DDPMScheduler(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="v_prediction",
  )  # fmt: skip
  x0, eps = _data((5, 4, 4, 3))
  k = np.array([0, 1, 499, 998, 999])
  t = jnp.asarray(k / 999.0, jnp.float32)
  to_t = lambda a: torch.from_numpy(np.array(a, np.float32))
  want = sched.add_noise(to_t(x0), to_t(eps), torch.from_numpy(k)).numpy()
  f_eps, f_v = flow.get_formulation("eps/linear"), flow.get_formulation("v/linear")
  np.testing.assert_allclose(f_eps.noised(x0, eps, t), want, rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(f_v.noised(x0, eps, t), want, rtol=2e-5, atol=2e-6)
  v_want = sched.get_velocity(to_t(x0), to_t(eps), torch.from_numpy(k)).numpy()
  np.testing.assert_allclose(f_v.target(x0, eps, t), v_want, rtol=2e-5, atol=2e-6)
  np.testing.assert_array_equal(f_eps.target(x0, eps, t), eps)
  np.testing.assert_allclose(f_eps.path.table, sched.alphas_cumprod.numpy(), rtol=2e-6)
  # the network sees the discrete step k
  np.testing.assert_allclose(np.asarray(f_eps.time_input(t)) * 1000, k, atol=2e-4)


def test_edm_preconditioning_matches_diffusers():
  import torch
  from diffusers import EDMEulerScheduler

  sched = EDMEulerScheduler(sigma_data=0.5)
  for name in ("edm(-1.20,1.20)", "edm/cos", "edm/rf"):
    f = flow.get_formulation(name)
    x0, eps = _data((4, 4, 4, 3))
    t = _levels(f, 4)
    sigma = np.array(f.sigma(t))
    np.testing.assert_array_equal(np.asarray(f.alpha(t)), 1.0)
    z = f.noised(x0, eps, t)
    s_t = torch.from_numpy(sigma).reshape(-1, 1, 1, 1)
    z_t = torch.from_numpy(np.array(z))
    np.testing.assert_allclose(f.model_input(z, t), sched.precondition_inputs(z_t, s_t).numpy(), rtol=1e-5)
    np.testing.assert_allclose(
      np.asarray(f.time_input(t)) * 1000, sched.precondition_noise(torch.from_numpy(sigma)).numpy(), rtol=1e-5
    )
    out = jax.random.normal(jax.random.key(3), x0.shape)
    want = sched.precondition_outputs(z_t, torch.from_numpy(np.asarray(out)), s_t).numpy()
    np.testing.assert_allclose(f.x0_from(out, z, t), want, rtol=1e-5, atol=1e-5)
  # edm(P_mean, P_std): log sigma is the normal quantile of t
  f = flow.get_formulation("edm(-1.20,1.20)")
  np.testing.assert_allclose(np.log(f.sigma(np.array([0.5, stats.norm.cdf(1.0)]))), [-1.2, 0.0], atol=1e-12)


def test_cosine_closed_forms_and_rf():
  t = np.linspace(0.0, 1.0, 11)
  for name in ("eps/cos", "v/cos"):
    f = flow.get_formulation(name)
    np.testing.assert_allclose(f.alpha(t), np.cos(np.pi * t / 2), atol=1e-15)
    np.testing.assert_allclose(f.sigma(t), np.sin(np.pi * t / 2), atol=1e-15)
    inner = t[1:-1]
    np.testing.assert_allclose(f.log_snr(inner), -2 * np.log(np.tan(np.pi * inner / 2)), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(f.t_of_log_snr(f.log_snr(inner)), inner, atol=1e-12)
    np.testing.assert_allclose(f.time_input(t), t)
  x0, eps = _data()
  tj = jnp.array([0.0, 0.1, 0.3, 0.5, 0.9, 1.0])
  a, b = jnp.cos(jnp.pi * tj / 2)[:, None, None, None], jnp.sin(jnp.pi * tj / 2)[:, None, None, None]
  f = flow.get_formulation("v/cos")
  np.testing.assert_allclose(f.noised(x0, eps, tj), a * x0 + b * eps, atol=1e-6)
  np.testing.assert_allclose(f.target(x0, eps, tj), a * eps - b * x0, atol=1e-6)
  rf = flow.get_formulation("rf")
  np.testing.assert_allclose(rf.log_snr(t[1:-1]), 2 * np.log((1 - t[1:-1]) / t[1:-1]), rtol=1e-12)
  np.testing.assert_array_equal(rf.noised(x0, eps, tj), rectified.noised(x0, eps, tj))


def _paper_weight(f, t):
  """w_t of the paper's L = -1/2 E_t[w_t lambda'_t ||eps_hat - eps||^2] for uniform t: the
  formulation's eps-weight times -2 / lambda'_t (lambda' by central differences)."""
  h = 1e-6
  dlam = (f.log_snr(t + h) - f.log_snr(t - h)) / (2 * h)
  return -2.0 * f.eps_weight(t) / dlam


def test_weightings_are_the_papers():
  t = np.linspace(0.05, 0.95, 19)
  lam = lambda f: f.log_snr(t)

  def proportional(a, b):
    r = a / b
    np.testing.assert_allclose(r, r[0], rtol=1e-5)

  proportional(_paper_weight(flow.get_formulation("rf"), t), t / (1 - t))  # w^RF = t / (1 - t)
  f = flow.get_formulation("eps/cos")
  proportional(_paper_weight(f, t), 1 / np.cosh(lam(f) / 2))  # sech(lambda / 2)
  f = flow.get_formulation("v/cos")
  proportional(_paper_weight(f, t), np.exp(-lam(f) / 2))
  for pm, ps in ((-1.2, 1.2), (0.0, 0.6)):
    f = flow.get_formulation(f"edm({pm},{ps})")
    paper = stats.norm.pdf(lam(f), -2 * pm, 2 * ps) * (np.exp(-lam(f)) + 0.25)
    proportional(_paper_weight(f, t), paper)
  # EDM at another formulation's weighting: equal log-SNR at equal t, equal eps-weights
  for name, ref in (("edm/cos", "v/cos"), ("edm/rf", "rf"), ("edm/eps/cos", "eps/cos")):
    f, r = flow.get_formulation(name), flow.get_formulation(ref)
    np.testing.assert_allclose(lam(f), lam(r), rtol=1e-10)
    np.testing.assert_allclose(f.eps_weight(t), r.eps_weight(t), rtol=1e-10)


# --------------------------------------------------------------------------------------------
# Training densities


def _ks(x, cdf):
  return stats.kstest(np.asarray(x, np.float64), cdf).statistic


def test_densities():
  key = jax.random.key(7)
  sample = lambda name: np.asarray(flow.get_formulation(name).sample_t(key, N))
  # rf: exactly rectified.sample_t (whose laws test_flow checks)
  np.testing.assert_array_equal(
    sample("rf/lognorm(0.30,0.70)"), rectified.sample_t(key, N, "logit_normal", m=0.3, s=0.7)
  )
  np.testing.assert_array_equal(sample("rf/mode(1.29)"), rectified.sample_t(key, N, "mode", mode_scale=1.29))
  np.testing.assert_array_equal(sample("rf"), rectified.sample_t(key, N, "uniform"))
  assert _ks(sample("v/cos"), stats.uniform.cdf) < KS_EPS
  k = sample("eps/linear") * 999
  np.testing.assert_allclose(k, np.round(k), atol=1e-3)  # the discrete steps
  counts = np.bincount(np.round(k).astype(int), minlength=1000).reshape(10, 100).sum(1)
  assert stats.chisquare(counts).pvalue > 1e-4 and k.min() < 10 and k.max() > 989
  for pm, ps in ((-1.2, 1.2), (0.4, 0.6)):
    f = flow.get_formulation(f"edm({pm},{ps})")
    log_sigma = np.log(np.asarray(f.sigma(f.sample_t(key, N))))
    assert _ks(log_sigma, stats.norm(pm, ps).cdf) < KS_EPS
    assert _ks(log_sigma, stats.norm(pm + 0.05, ps).cdf) > KS_EPS  # the test can fail
  # edm/cos and edm/rf: sigma = b / a of the reference at its own density
  f = flow.get_formulation("edm/cos")
  assert _ks(np.asarray(f.sigma(f.sample_t(key, N))), lambda s: 2 / np.pi * np.arctan(s)) < KS_EPS
  f = flow.get_formulation("edm/rf")
  assert _ks(np.asarray(f.sigma(f.sample_t(key, N))), lambda s: s / (1 + s)) < KS_EPS


# --------------------------------------------------------------------------------------------
# Round trips, losses, the yardstick


@pytest.mark.parametrize("name", DISTINCT)
def test_round_trip_and_loss(name):
  f = flow.get_formulation(name)
  x0, eps = _data()
  t = _levels(f)
  z = f.noised(x0, eps, t)
  out = f.target(x0, eps, t)
  np.testing.assert_allclose(f.x0_from(out, z, t), x0, rtol=1e-4, atol=2e-4)
  np.testing.assert_allclose(f.eps_from(out, z, t), eps, rtol=1e-4, atol=2e-4)
  np.testing.assert_allclose(f.rf_velocity(out, z, t), eps - x0, rtol=1e-4, atol=3e-4)
  np.testing.assert_allclose(f.loss(out, x0, eps, t), 0.0, atol=1e-10)
  wrong = out + 0.1
  w = np.asarray(f.loss_weight(t))
  np.testing.assert_allclose(f.loss(wrong, x0, eps, t), 0.01 * w, rtol=1e-4)
  assert np.all(np.isfinite(np.asarray(f.sample_t(jax.random.key(0), 64))))


def test_rf_default_loss_is_todays():
  f = flow.get_formulation(flow.DEFAULT)
  x0, eps = _data()
  t = f.sample_t(jax.random.key(1), 6)
  np.testing.assert_array_equal(t, rectified.sample_t(jax.random.key(1), 6, "logit_normal", m=0.0, s=1.0))
  out = jax.random.normal(jax.random.key(2), x0.shape)
  np.testing.assert_array_equal(f.noised(x0, eps, t), rectified.noised(x0, eps, t))
  np.testing.assert_array_equal(f.loss(out, x0, eps, t), rectified.per_example_loss(out, x0, eps))
  np.testing.assert_array_equal(f.model_input(x0, t), x0)
  np.testing.assert_array_equal(f.time_input(t), t)


def test_level_times_cover_what_each_formulation_can_take():
  grid = np.asarray(flow.levels.val_t_levels(8))
  for name, ends in (("rf", True), ("v/cos", True), ("eps/cos", True), ("eps/linear", False), ("edm/rf", False)):
    own, covered = levels.level_times(flow.get_formulation(name), grid)
    assert covered[1:-1].all() and covered[0] == ends and covered[-1] == ends, name
  own, covered = levels.level_times(flow.get_formulation("v/cos"), grid)
  np.testing.assert_allclose(own[[0, -1]], [0.0, 1.0])
  # LDM's bounded SNR range and a narrow EDM's float32 reach leave out the outer levels of a fine grid
  fine = np.linspace(0, 1, 41)
  _, covered = levels.level_times(flow.get_formulation("eps/linear"), fine)
  assert not covered[1] and covered[2] and covered[-4] and not covered[-3]  # t = 0.025 < 0.028, 0.95 > 0.936
  _, covered = levels.level_times(flow.get_formulation("edm(0.00,0.30)"), fine)
  assert covered[20] and not covered[-2]


def _t_from_time_input(f, tin):
  """Inverts the network's time input (for a stand-in network that needs t)."""
  if isinstance(f.path, flow.paths.VEPath):
    return f.path.t_of_sigma(jnp.exp(4000.0 * tin))
  if isinstance(f.path, flow.paths.LinearVPPath):
    return tin * 1000.0 / 999.0
  return tin


def test_yardstick_is_formulation_independent():
  """The same denoiser, written in each formulation's parametrisation, scores the same rf loss
  at every interior level; t = 0 and 1 are left out where a formulation cannot take them."""
  x0, eps = _data((8, 4, 4, 3), seed=4)
  grid = np.asarray(flow.levels.val_t_levels(8))

  def denoiser(x, sigma):  # any function of the scale-free z / a and the noise level
    return 0.6 * jnp.tanh(x) / (1.0 + 0.3 * sigma)

  results = {}
  for name in ("rf", "rf/mode(1.29)", "eps/linear", "v/linear", "eps/cos", "v/cos", "edm(-1.20,1.20)", "edm/rf"):
    f = flow.get_formulation(name)
    own_t, covered = levels.level_times(f, grid)

    def predict(x_in, tin, f=f):
      t = _t_from_time_input(f, tin)
      z = x_in / rectified.batch_broadcast(f.input_scale(t), x_in)
      a, b = f.alpha(t), f.sigma(t)
      x = z / rectified.batch_broadcast(a, z)
      x0_hat = denoiser(x, (b / a)[:, None, None, None])
      eps_hat = (z - rectified.batch_broadcast(a, z) * x0_hat) / rectified.batch_broadcast(b, z)
      return f.target(x0_hat, eps_hat, t)

    own, rf, count = jax.jit(lambda t: levels.loss_sums(predict, f, x0, eps, t))(own_t[covered])
    assert float(count) == 8
    results[name] = dict(zip(grid[covered], np.asarray(rf) / 8))
    summary = levels.summarize_yardstick(np.asarray(rf) / 8, grid[covered], grid)
    assert set(summary) == {"val/rf_loss"} | {f"val/rf_loss_t{t:.3f}" for t in grid[1:-1]}
  ref = results["rf"]
  assert set(results["eps/linear"]) == set(grid[1:-1]) and set(ref) == set(grid)
  for name, got in results.items():
    for t, value in got.items():
      if 0 < t < 1:
        np.testing.assert_allclose(value, ref[t], rtol=2e-4, err_msg=f"{name} at t={t}")
