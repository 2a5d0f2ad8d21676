"""Rectified flow (t-samplers vs analytic laws, shift, noising identities), text dropout, validation loss."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from sd3_jax import flow
from sd3_jax.flow import conditioning as C
from sd3_jax.flow import levels as L
from sd3_jax.flow import rectified as R

N_SAMPLES = 1 << 16
# Dvoretzky-Kiefer-Wolfowitz: P(sup|F_n - F| > eps) <= 2 exp(-2 n eps^2). With n = 65536 and a
# false-failure probability of 1e-6 the bound is eps = 0.0105 (the keys are fixed anyway, so
# the test is deterministic; the bound says the tolerance is not tuned to one lucky draw).
KS_EPS = math.sqrt(math.log(2 / 1e-6) / (2 * N_SAMPLES))


def _logit(t):
  t = np.clip(t, 1e-12, 1 - 1e-12)
  return np.log(t) - np.log1p(-t)


def _logit_normal_cdf(m, s):
  return lambda t: stats.norm.cdf((_logit(t) - m) / s)


def _cosmap_cdf(t):
  # Integral of the density 2 / (pi (1 - 2t + 2t^2)) from 0: (2/pi) arctan(t / (1 - t)).
  return 2 / np.pi * np.arctan2(t, 1 - t)


def _mode_cdf(scale):
  # t = f(u) with f decreasing from f(0)=1 to f(1)=0, u ~ U(0,1), so P(T <= t) = 1 - f^-1(t).
  f = lambda u: 1 - u - scale * (np.cos(np.pi / 2 * u) ** 2 - 1 + u)

  def cdf(t):
    lo, hi = np.zeros_like(t, np.float64), np.ones_like(t, np.float64)
    for _ in range(60):  # bisection for f(u) = t
      mid = 0.5 * (lo + hi)
      above = f(mid) > t
      lo, hi = np.where(above, mid, lo), np.where(above, hi, mid)
    return 1 - 0.5 * (lo + hi)

  return cdf


def _shifted_uniform_cdf(alpha):
  # t' = a t / (1 + (a-1) t)  <=>  t = t' / (a - (a-1) t'), and P(T' <= t') = t for uniform t.
  return lambda tp: tp / (alpha - (alpha - 1) * tp)


def _ks(samples, cdf):
  return stats.kstest(np.asarray(samples, np.float64), cdf).statistic


@pytest.mark.parametrize(
  "sampler,kwargs,cdf",
  [
    ("logit_normal", {}, _logit_normal_cdf(0.0, 1.0)),
    ("logit_normal", dict(m=0.5, s=0.8), _logit_normal_cdf(0.5, 0.8)),
    ("logit_normal", dict(shift=3.0), _logit_normal_cdf(math.log(3.0), 1.0)),  # logit shifts by log a
    ("mode", {}, _mode_cdf(1.29)),
    ("mode", dict(mode_scale=-0.5), _mode_cdf(-0.5)),
    ("mode", dict(mode_scale=0.0), lambda t: t),  # s = 0 is uniform
    ("cosmap", {}, _cosmap_cdf),
    ("uniform", {}, lambda t: t),
    ("uniform", dict(shift=3.0), _shifted_uniform_cdf(3.0)),
  ],
)
def test_sampler_matches_analytic_distribution(sampler, kwargs, cdf):
  t = R.sample_t(jax.random.key(1), (N_SAMPLES,), sampler, **kwargs)
  assert t.shape == (N_SAMPLES,) and t.dtype == jnp.float32
  t = np.asarray(t)
  assert t.min() >= 0.0 and t.max() <= 1.0
  assert _ks(t, cdf) < KS_EPS


def test_ks_tolerance_detects_small_errors():
  # The bound used above is tight enough to notice a 0.05 error in m or a 3 -> 2.5 shift.
  t = np.asarray(R.sample_t(jax.random.key(1), N_SAMPLES, "logit_normal"))
  assert _ks(t, _logit_normal_cdf(0.05, 1.0)) > KS_EPS
  assert _ks(t, _logit_normal_cdf(0.0, 1.1)) > KS_EPS
  u = np.asarray(R.sample_t(jax.random.key(2), N_SAMPLES, "uniform", shift=3.0))
  assert _ks(u, _shifted_uniform_cdf(2.5)) > KS_EPS
  c = np.asarray(R.sample_t(jax.random.key(3), N_SAMPLES, "cosmap"))
  assert _ks(c, lambda x: x) > KS_EPS  # cosmap is not uniform


def test_sampler_errors_and_jit():
  with pytest.raises(ValueError, match="logit_normal, mode, cosmap, uniform"):
    R.sample_t(jax.random.key(0), 4, "lognorm")
  with pytest.raises(ValueError, match="mode_scale"):
    R.sample_t(jax.random.key(0), 4, "mode", mode_scale=2.0)
  with pytest.raises(ValueError, match="> 0"):
    R.sample_t(jax.random.key(0), 4, shift=0.0)
  f = jax.jit(lambda k: R.sample_t(k, (2, 3), "cosmap", shift=3.0))
  np.testing.assert_array_equal(f(jax.random.key(5)), R.sample_t(jax.random.key(5), (2, 3), "cosmap", shift=3.0))
  assert not np.array_equal(f(jax.random.key(5)), f(jax.random.key(6)))


def test_shift_formula_and_monotonicity():
  t = np.linspace(0, 1, 1001, dtype=np.float32)
  np.testing.assert_array_equal(R.shift_t(t, 1.0), t)
  np.testing.assert_allclose(R.shift_t(0.5, 3.0), 0.75, rtol=1e-7)  # 1.5 / 2
  prev = None
  for alpha in (0.5, 1.0, 2.0, 3.0, 4.0):
    s = np.asarray(R.shift_t(t, alpha))
    assert s[0] == 0.0 and s[-1] == 1.0
    assert np.all(np.diff(s) > 0), alpha  # strictly increasing in t
    inner = slice(1, -1)
    np.testing.assert_allclose(_logit(s[inner]), _logit(t[inner]) + math.log(alpha), atol=2e-4)
    if prev is not None:
      assert np.all(s[inner] > prev[inner])  # increasing in alpha: more mass near noise
    prev = s


def test_noising_and_target_identities():
  k1, k2 = jax.random.split(jax.random.key(0))
  x0 = jax.random.normal(k1, (3, 4, 6, 2))
  eps = jax.random.normal(k2, (3, 4, 6, 2))
  t = jnp.array([0.0, 0.3, 1.0])
  z = R.noised(x0, eps, t)
  v = R.velocity_target(x0, eps)
  np.testing.assert_allclose(z[0], x0[0], rtol=0, atol=0)
  np.testing.assert_allclose(z[2], eps[2], rtol=0, atol=0)
  np.testing.assert_allclose(z[1], 0.7 * x0[1] + 0.3 * eps[1], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(z - t[:, None, None, None] * v, x0, atol=1e-6)  # x0 = z_t - t v
  np.testing.assert_allclose(R.denoised(z, v, t), x0, atol=1e-6)
  np.testing.assert_allclose(z + (1 - t[:, None, None, None]) * v, eps, atol=1e-6)
  np.testing.assert_allclose(R.noised(x0, eps, 0.25), 0.75 * x0 + 0.25 * eps, atol=1e-6)  # scalar t
  with pytest.raises(ValueError, match=r"\[B\]"):
    R.noised(x0, eps, jnp.ones((2,)))


def test_per_example_loss_is_float32_mse():
  k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
  x0, eps, vp = (jax.random.normal(k, (2, 3, 5, 4)).astype(jnp.bfloat16) for k in (k1, k2, k3))
  loss = R.per_example_loss(vp, x0, eps)
  assert loss.shape == (2,) and loss.dtype == jnp.float32
  ref = ((np.float32(vp) - (np.float32(eps) - np.float32(x0))) ** 2).mean(axis=(1, 2, 3))
  np.testing.assert_allclose(loss, ref, rtol=1e-6)
  np.testing.assert_array_equal(R.per_example_loss(R.velocity_target(x0, eps), x0, eps), [0.0, 0.0])


LAYOUT = C.TextLayout(clip_l_dim=3, clip_g_dim=5, clip_tokens=4)


def _parts(ctx, pooled):
  """Per-example views of each encoder's share (and of the untouched zero-padding channels)."""
  lo, hi, tc = LAYOUT.clip_l_dim, LAYOUT.pooled_dim, LAYOUT.clip_tokens
  b = ctx.shape[0]
  return {
    "clip_l": np.concatenate([ctx[:, :tc, :lo].reshape(b, -1), pooled[:, :lo]], 1),
    "clip_g": np.concatenate([ctx[:, :tc, lo:hi].reshape(b, -1), pooled[:, lo:hi]], 1),
    "t5": ctx[:, tc:, :].reshape(b, -1),
    "pad": ctx[:, :tc, hi:].reshape(b, -1),
  }


def test_text_dropout_rates_independence_and_exact_zeros():
  b, p = 20_000, 0.464
  k1, k2 = jax.random.split(jax.random.key(0))
  ctx = jax.random.uniform(k1, (b, 10, 12), minval=0.5, maxval=1.5)  # never zero
  pooled = jax.random.uniform(k2, (b, LAYOUT.pooled_dim), minval=0.5, maxval=1.5)
  out_ctx, out_pooled = jax.jit(C.drop_text_conditioning, static_argnums=(3, 4))(
    jax.random.key(7), ctx, pooled, p, LAYOUT
  )
  before, after = _parts(np.asarray(ctx), np.asarray(pooled)), _parts(np.asarray(out_ctx), np.asarray(out_pooled))
  np.testing.assert_array_equal(after["pad"], before["pad"])  # padding channels belong to no encoder
  dropped = {}
  for name in ("clip_l", "clip_g", "t5"):
    zero = np.all(after[name] == 0, axis=1)
    same = np.all(after[name] == before[name], axis=1)
    assert np.all(zero ^ same), name  # each example: the whole share (tokens + pooled) or nothing
    dropped[name] = zero
  # Binomial std at p = 0.464, n = 20000 is 0.0035 (pairs 0.0029, triples 0.0021): 5 sigma bounds.
  for name, d in dropped.items():
    assert abs(d.mean() - p) < 0.018, (name, d.mean())
  names = list(dropped)
  for i in range(3):
    for j in range(i + 1, 3):
      assert abs((dropped[names[i]] & dropped[names[j]]).mean() - p * p) < 0.015
  assert abs((dropped["clip_l"] & dropped["clip_g"] & dropped["t5"]).mean() - p**3) < 0.011


def test_text_dropout_edges_and_errors():
  ctx, pooled = jnp.ones((3, 6, 9)), jnp.ones((3, 8))
  c0, p0 = C.drop_text_conditioning(jax.random.key(0), ctx, pooled, 0.0, LAYOUT)
  np.testing.assert_array_equal(c0, ctx)
  np.testing.assert_array_equal(p0, pooled)
  c1, p1 = C.drop_text_conditioning(jax.random.key(0), ctx, pooled, 1.0, LAYOUT)
  np.testing.assert_array_equal(p1, 0)
  np.testing.assert_array_equal(c1[:, :, :8], 0)
  np.testing.assert_array_equal(c1[:, :4, 8:], 1)  # zero padding region of CLIP tokens: untouched
  np.testing.assert_array_equal(c1[:, 4:, 8:], 0)  # T5 tokens: all channels
  assert c1.dtype == ctx.dtype
  with pytest.raises(ValueError, match="pooled"):
    C.drop_text_conditioning(jax.random.key(0), ctx, jnp.ones((3, 7)), 0.5, LAYOUT)
  with pytest.raises(ValueError, match="too small"):
    C.drop_text_conditioning(jax.random.key(0), jnp.ones((3, 3, 9)), pooled, 0.5, LAYOUT)
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    C.drop_text_conditioning(jax.random.key(0), ctx, pooled, 1.5, LAYOUT)


def test_assemble_conditioning_layout():
  rng = np.random.default_rng(0)
  l_seq, g_seq = rng.normal(size=(2, 4, 3)), rng.normal(size=(2, 4, 5))
  t5 = rng.normal(size=(2, 6, 12))
  l_pool, g_pool = rng.normal(size=(2, 3)), rng.normal(size=(2, 5))
  ctx, pooled = C.assemble_conditioning(l_seq, g_seq, t5, l_pool, g_pool, context_dim=12)
  assert ctx.shape == (2, 10, 12) and pooled.shape == (2, 8)
  np.testing.assert_allclose(ctx[:, :4, :3], l_seq, rtol=1e-6)
  np.testing.assert_allclose(ctx[:, :4, 3:8], g_seq, rtol=1e-6)
  np.testing.assert_array_equal(ctx[:, :4, 8:], 0)
  np.testing.assert_allclose(ctx[:, 4:], t5, rtol=1e-6)
  np.testing.assert_allclose(pooled, np.concatenate([l_pool, g_pool], -1), rtol=1e-6)
  # Composes with the dropout layout of the same sizes.
  out, _ = C.drop_text_conditioning(jax.random.key(0), ctx, pooled, 1.0, LAYOUT)
  np.testing.assert_array_equal(out, 0)
  with pytest.raises(ValueError, match="context_dim"):
    C.assemble_conditioning(l_seq, g_seq, t5, l_pool, g_pool, context_dim=7)
  with pytest.raises(ValueError, match="t5_seq"):
    C.assemble_conditioning(l_seq, g_seq, t5[..., :11], l_pool, g_pool, context_dim=12)
  with pytest.raises(ValueError, match="pooled"):
    C.assemble_conditioning(l_seq, g_seq, t5, g_pool, l_pool, context_dim=12)


RF = flow.get_formulation("rf")


def _toy_velocity(z, t):
  """A per-example stand-in for the model (no mixing across the batch)."""
  return 0.5 * jnp.tanh(z) - t[:, None, None, None] * z + 0.1


def test_validation_noise_depends_only_on_seed_and_id():
  shape = (4, 4, 3)
  a = L.fixed_validation_noise(3, np.array([0, 1, 2, 3, 4, 5]), shape)
  b = L.fixed_validation_noise(3, np.array([5, 2]), shape)
  np.testing.assert_array_equal(b, a[np.array([5, 2])])
  c = jax.jit(lambda ids: L.fixed_validation_noise(3, ids, shape))(jnp.array([4, 0], jnp.int32))
  np.testing.assert_array_equal(c, a[np.array([4, 0])])
  assert not np.allclose(a[0], a[1])
  assert not np.allclose(L.fixed_validation_noise(4, np.array([0]), shape)[0], a[0])
  assert abs(float(jnp.std(L.fixed_validation_noise(0, np.arange(64), (32,)))) - 1) < 0.05
  with pytest.raises(ValueError, match="integer"):
    L.fixed_validation_noise(3, np.array([0.5]), shape)
  with pytest.raises(ValueError, match="2\\^32"):
    L.fixed_validation_noise(3, np.array([2**32]), shape)


def _means(x0, eps, levels, mask=None, predict=_toy_velocity):
  own, rf, count = L.loss_sums(predict, RF, x0, eps, levels, mask)
  np.testing.assert_array_equal(own, rf)  # for rectified flow the yardstick is the loss itself
  return np.asarray(own) / float(count)


def test_validation_losses_values_and_batch_independence():
  levels = L.val_t_levels()
  np.testing.assert_allclose(levels, np.arange(8) / 7, rtol=1e-6)
  shape = (4, 6, 3)
  ids = np.arange(10)
  x0 = jax.random.normal(jax.random.key(9), (10,) + shape)
  eps = L.fixed_validation_noise(0, ids, shape)
  full = _means(x0, eps, levels)
  assert full.shape == (8,)
  # Reference in float64 numpy, one level at a time.
  x0n, epsn = np.float64(x0), np.float64(eps)
  ref = []
  for t in np.arange(8) / 7:
    z = (1 - t) * x0n + t * epsn
    ref.append(np.mean((0.5 * np.tanh(z) - t * z + 0.1 - (epsn - x0n)) ** 2))
  np.testing.assert_allclose(full, ref, rtol=1e-5)
  # Any other batching (sizes 3 + 7, shuffled, noise regenerated from ids) sums to the same.
  perm = np.random.default_rng(0).permutation(10)
  sums, count = np.zeros(8), 0.0
  for part in (perm[:3], perm[3:]):
    s, _, c = L.loss_sums(_toy_velocity, RF, x0[part], L.fixed_validation_noise(0, ids[part], shape), levels)
    sums, count = sums + np.asarray(s), count + float(c)
  np.testing.assert_allclose(sums / count, full, rtol=1e-5)
  # Padding rows with mask 0 do not count.
  xp = jnp.concatenate([x0, 100 * jnp.ones((2,) + shape)])
  ep = L.fixed_validation_noise(0, np.concatenate([ids, [-1, -1]]), shape)
  np.testing.assert_allclose(_means(xp, ep, levels, mask=np.r_[np.ones(10), np.zeros(2)]), full, rtol=1e-5)

  # The same operations as the validation loss before formulations (validation_loss_sums),
  # so the same numbers for rectified flow.
  def todays(x0, eps):
    def one(t):
      tb = jnp.full((x0.shape[0],), t, jnp.float32)
      return jnp.sum(R.per_example_loss(_toy_velocity(R.noised(x0, eps, tb), tb), x0, eps))

    return jax.lax.map(one, levels)

  own = jax.jit(lambda x0, eps: L.loss_sums(_toy_velocity, RF, x0, eps, levels)[0])(x0, eps)
  np.testing.assert_array_equal(own, jax.jit(todays)(x0, eps))
  # A zero predictor has loss mean((eps - x0)^2) at every level.
  zero = _means(x0, eps, levels, predict=lambda z, t: jnp.zeros_like(z))
  np.testing.assert_allclose(zero, np.full(8, float(jnp.mean((eps - x0) ** 2))), rtol=1e-5)


def test_summarize_validation_excludes_only_t1():
  out = L.summarize_validation(np.arange(8.0))
  assert out["val/loss"] == pytest.approx(3.0)  # mean of levels 0..6: t=0 included, t=1 excluded
  assert out["val/loss_t0.000"] == 0.0 and out["val/loss_t1.000"] == 7.0
  assert len(out) == 9
  out = L.summarize_validation([2.0, 4.0, 100.0], levels=[0.25, 0.5, 1.0], prefix="eval")
  assert out == {"eval/loss_t0.250": 2.0, "eval/loss_t0.500": 4.0, "eval/loss_t1.000": 100.0, "eval/loss": 3.0}
  with pytest.raises(ValueError, match="1-D"):
    L.summarize_validation(np.zeros(3), levels=np.linspace(0, 1, 4))
