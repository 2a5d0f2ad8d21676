"""Sampling (pure JAX; diffusers parity is in test_sampling_parity.py): schedule, CFG/SLG algebra, exact landing on a point
mass, sharded == unsharded. The sample CLI and write_sample_grid on a tiny trained workdir: test_sample_cli.py."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax import linen as nn

from sd3_jax.inference import sampling
from sd3_jax import sharding
from sd3_jax.models import mmdit

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
