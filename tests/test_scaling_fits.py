"""Scaling-law fits (sd3_jax.scaling.fits / isoflop) and the family's accounting (family).

The fits must recover known parameters from noisy synthetic data with intervals that cover the
truth, ignore a single outlier (Huber on log residuals; a least-squares fit of the same data is
moved, so the check can fail), be deterministic for a seed, and refuse bad input by name.
"""

import numpy as np
import pytest

from sd3_jax import scaling
from sd3_jax.models import flops, mmdit
from sd3_jax.scaling import family, isoflop

B = 50  # bootstrap resamples: enough for 95% percentile intervals in a test


def _power_law_data(seed=0, noise=0.01, n=16):
  rng = np.random.default_rng(seed)
  c = np.logspace(15, 19, n)
  truth = dict(e=1.5, a=5e4, alpha=0.3)
  loss = (truth["e"] + truth["a"] * c ** -truth["alpha"]) * np.exp(rng.normal(0, noise, n))
  return c, loss, truth


def test_power_law_recovers_known_parameters_and_intervals_cover_them():
  c, loss, truth = _power_law_data()
  fit = scaling.fit_power_law(c, loss, num_bootstrap=B, seed=0)
  assert fit.e == pytest.approx(truth["e"], rel=0.05)
  assert fit.alpha == pytest.approx(truth["alpha"], rel=0.1)
  for name, value in truth.items():
    lo, hi = fit.ci[name]
    assert lo <= value <= hi, (name, value, fit.ci[name])
    assert lo < getattr(fit, name) < hi or np.isclose(lo, getattr(fit, name)) or np.isclose(hi, getattr(fit, name))
  assert fit.r2_log > 0.99
  # predict: arrays in, arrays out, the law's values.
  pred = fit.predict(np.array([1e16, 1e18]))
  assert pred.shape == (2,)
  np.testing.assert_allclose(pred, fit.e + fit.a * np.array([1e16, 1e18]) ** -fit.alpha)


def test_parametric_recovers_chinchilla_like_law():
  rng = np.random.default_rng(1)
  n = np.repeat(np.logspace(6, 8, 5), 6)
  d = np.tile(np.logspace(8, 10, 6), 5)
  truth = dict(e=1.69, a=406.4, b=410.7, alpha=0.34, beta=0.28)  # Hoffmann et al. 2022, approach 3
  loss = (truth["e"] + truth["a"] / n ** truth["alpha"] + truth["b"] / d ** truth["beta"]) * np.exp(
    rng.normal(0, 0.003, n.size)
  )
  fit = scaling.fit_parametric(n, d, loss, num_bootstrap=B, seed=0)
  for name, value in truth.items():
    lo, hi = fit.ci[name]
    assert lo <= value <= hi, (name, value, fit.ci[name])
  assert fit.e == pytest.approx(truth["e"], rel=0.05)
  assert fit.beta == pytest.approx(truth["beta"], rel=0.15)
  assert fit.predict(1e7, 1e9).shape == ()
  np.testing.assert_allclose(fit.predict(n, d), loss, rtol=0.02)


def test_a_single_outlier_does_not_move_the_huber_fit():
  c, loss, _ = _power_law_data(noise=0.002)
  bad = loss.copy()
  bad[7] *= 1.6
  clean = scaling.fit_power_law(c, loss, num_bootstrap=0)
  robust = scaling.fit_power_law(c, bad, num_bootstrap=0)
  for name in ("e", "alpha"):
    assert getattr(robust, name) == pytest.approx(getattr(clean, name), rel=0.02), name
  # The same data under (nearly) least squares: the outlier drags the fit (the check can fail).
  squares = scaling.fit_power_law(c, bad, num_bootstrap=0, huber_delta=10.0)
  assert abs(squares.alpha - clean.alpha) > 5 * abs(robust.alpha - clean.alpha)


def test_fits_are_deterministic_for_a_seed():
  c, loss, _ = _power_law_data(seed=3)
  a = scaling.fit_power_law(c, loss, num_bootstrap=8, seed=7)
  b = scaling.fit_power_law(c, loss, num_bootstrap=8, seed=7)
  other = scaling.fit_power_law(c, loss, num_bootstrap=8, seed=8)
  assert a == b
  assert a.ci != other.ci


@pytest.mark.parametrize(
  "args, message",
  [
    (([1e15, 1e16], [2.0, 1.9]), "only 2 points"),
    (([1e15, 0.0, 1e17], [2.0, 1.9, 1.8]), "compute must be positive"),
    (([1e15, 1e16, 1e17], [2.0, -1.0, 1.8]), "loss must be positive"),
    (([1e15, 1e16, 1e17], [2.0, float("nan"), 1.8]), "loss contains NaN"),
    (([1e15, 1e16, 1e17], [2.0, 1.8]), "loss has 2 values"),
    (([1e15, 1e15, 1e15], [2.0, 1.9, 1.8]), "two different values"),
  ],
)
def test_power_law_bad_input_names_the_problem(args, message):
  with pytest.raises(ValueError, match=message):
    scaling.fit_power_law(*args, num_bootstrap=0)


def test_parametric_bad_input_names_the_problem():
  n, d, y = [1e6, 1e7, 1e8, 1e6], [1e8, 1e9, 1e8, 1e9], [2.0, 1.9, 1.8, 1.95]
  with pytest.raises(ValueError, match="5 parameters but only 4 points"):
    scaling.fit_parametric(n, d, y, num_bootstrap=0)
  with pytest.raises(ValueError, match="d contains NaN"):
    scaling.fit_parametric(n + [1e7], d + [float("nan")], y + [1.9], num_bootstrap=0)
  with pytest.raises(ValueError, match="n must be positive"):
    scaling.fit_parametric([0.0] + n, [1e9] + d, [1.9] + y, num_bootstrap=0)


def test_isoflop_recovers_the_optimal_size_exponent():
  rng = np.random.default_rng(2)
  budgets, sizes, losses = [], [], []
  for c in (1e17, 1e18, 1e19, 1e20):
    n_opt = 0.05 * c**0.5
    for n in n_opt * np.logspace(-1, 1, 7):
      budgets.append(c)
      sizes.append(n)
      losses.append(3.0 * c**-0.05 * np.exp(0.02 * np.log(n / n_opt) ** 2 + rng.normal(0, 0.001)))
  fit = scaling.fit_isoflop(budgets, sizes, losses, num_bootstrap=B, seed=0)
  assert fit.a == pytest.approx(0.5, abs=0.03)
  assert fit.ci["a"][0] <= 0.5 <= fit.ci["a"][1]
  assert all(p["inside"] for p in fit.profiles) and len(fit.profiles) == 4
  np.testing.assert_allclose(fit.predict_n_opt(1e18), 0.05 * 1e9, rtol=0.15)
  with pytest.raises(ValueError, match="at least two budgets"):
    scaling.fit_isoflop(budgets[:7], sizes[:7], losses[:7], num_bootstrap=0)


def test_frontier_is_the_lower_envelope():
  c = [1, 2, 3, 4, 2, 5]
  y = [5.0, 4.0, 4.5, 3.0, 3.5, 3.2]
  assert isoflop.frontier(c, y).tolist() == [0, 4, 3]


# --------------------------------------------------------------------------------------------
# Family accounting


TOY = dict(
  patch_size=4, in_channels=3, out_channels=3, pooled_dim=64, context_dim=64, pos_embed_max_size=8, qk_norm=True
)


# Small members of each kind (count_params traces the model, slow at full size): the paper's
# family at d=2, SD3.5-medium's dual attention and a bigger grid, SD3.5-large's qk-norm, the toy's.
@pytest.mark.parametrize(
  "config",
  [
    family.family_config(2),
    family.family_config(3, qk_norm=True, dual_attention_layers=(0, 1), pos_embed_max_size=48),
    family.family_config(2, qk_norm=True),
    family.family_config(3, 16, **TOY),
    family.family_config(5, 8, dual_attention_layers=(0, 2), **TOY),
  ],
  ids=["paper-d2", "sd3.5-medium-like", "sd3.5-large-like", "toy-d3", "toy-dual"],
)
def test_param_counts_match_count_params(config):
  counts = family.param_counts(config)
  assert counts["total"] == mmdit.count_params(config)
  assert counts["total"] + counts["pos_embed"] == mmdit.count_params(config, include_pos_embed=True)
  assert counts["non_embedding"] + counts["embedding"] == counts["total"]


def test_family_width_rule_and_compute():
  cfg = family.family_config(24)  # the paper's rule: hidden 64 d, d heads
  assert (cfg.hidden_size, cfg.num_heads) == (1536, 24) and cfg == mmdit.get_config("d24")
  small = family.family_config(4, 16, **TOY)
  assert (small.hidden_size, small.num_heads, small.head_dim) == (64, 4, 16)
  with pytest.raises(ValueError, match="follow from the family"):
    family.family_config(4, 16, hidden_size=32)
  rc = family.run_compute(cfg, latent_size=32, context_len=154, batch_size=4096, steps=1000)
  assert rc.flops == 1000 * flops.train_step_flops(cfg, 32, 32, 154, 4096)
  assert rc.images == 4_096_000 and rc.tokens == rc.images * (256 + 154)
  assert rc.flops_6nd == 6 * family.param_counts(cfg)["total"] * rc.tokens
  # 6ND counts every parameter once per token, but a token passes through one stream's weights
  # only (half the blocks' attention and MLP) and the adaLN weights (a third of each block) act
  # once per image, not per token: about 3x too much at d=24, 256^2, less the attention it omits.
  assert 2.0 < rc.approx_ratio < 3.5
  per_step = flops.train_step_flops(small, 32, 32, 24, 16)
  assert family.steps_for_budget(per_step * 123.4, per_step) == 123
  with pytest.raises(ValueError, match="budget must be positive"):
    family.steps_for_budget(0, per_step)
