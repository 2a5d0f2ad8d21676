"""Named remat policies change memory, not results; the HLO matmul counter that measures their
recomputation counts a scanned body once per layer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sd3_jax.models import flops, mmdit
from sd3_jax.models import remat as R
from tools import hlo_flops

TINY = mmdit.MMDiTConfig(
  depth=2,
  hidden_size=64,
  num_heads=2,
  in_channels=4,
  out_channels=4,
  pooled_dim=16,
  context_dim=16,
  pos_embed_max_size=8,
  qk_norm=True,
  dual_attention_layers=(0,),
)


@pytest.fixture(scope="module")
def setup():
  x, t, pooled, ctx = mmdit.dummy_inputs(TINY, batch=2, latent_size=8, context_len=5)
  keys = jax.random.split(jax.random.key(3), 3)
  x, pooled, ctx = (jax.random.normal(k, a.shape) for k, a in zip(keys, (x, pooled, ctx)))
  t = jnp.array([0.3, 0.8])
  params = mmdit.init_params(mmdit.MMDiT(TINY), jax.random.key(0))
  leaves, tree = jax.tree.flatten(params)
  ks = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(tree, [0.1 * jax.random.normal(k, a.shape) for k, a in zip(ks, leaves)])
  inputs = (x, t, pooled, ctx)

  def loss(p, model):
    return jnp.mean(model.apply({"params": p}, *inputs) ** 2)

  ref = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, mmdit.MMDiT(TINY))
  return params, loss, ref


@pytest.mark.parametrize("name", [n for n in R.POLICIES if n not in R.OFFLOAD_POLICIES and n != "none"])
def test_policy_gives_the_same_loss_and_gradients(setup, name):
  params, loss, (l0, g0) = setup
  l1, g1 = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, mmdit.MMDiT(TINY, remat=name))
  np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_unknown_policy_is_a_clear_error():
  with pytest.raises(ValueError, match="remat must be one of"):
    mmdit.MMDiT(TINY, remat="sometimes").init(jax.random.key(0), *mmdit.dummy_inputs(TINY, latent_size=4))


def _hlo(fn, *args):
  return jax.jit(fn).lower(*args).compile().as_text()


def test_hlo_flops_counts_scanned_layers_once_per_layer():
  x = jnp.ones((16, 32), jnp.float32)
  ws = jnp.ones((7, 32, 32), jnp.float32)

  def f(x, ws):
    y, _ = jax.lax.scan(lambda c, w: (jnp.tanh(c @ w), None), x, ws)
    return jnp.sum(y)

  fwd = hlo_flops.matmul_flops(_hlo(f, x, ws))
  assert fwd["flops"] == 7 * 2 * 16 * 32 * 32 and fwd["flops_loops_once"] == 2 * 16 * 32 * 32
  assert fwd["unknown_trip_counts"] == 0
  # Backward of a scan: two matmuls per layer (dx and dw) plus the forward; with the body
  # rematerialised (below) the forward matmul runs twice.
  plain = hlo_flops.matmul_flops(_hlo(jax.grad(f, argnums=1), x, ws))["flops"]
  assert plain == 3 * 7 * 2 * 16 * 32 * 32

  def g(x, ws):
    body = jax.checkpoint(lambda c, w: (jnp.tanh(c @ w), None))
    y, _ = jax.lax.scan(body, x, ws)
    return jnp.sum(y)

  assert hlo_flops.matmul_flops(_hlo(jax.grad(g, argnums=1), x, ws))["flops"] == 4 * 7 * 2 * 16 * 32 * 32


def test_hlo_flops_of_the_scanned_mmdit_equal_the_model_count():
  cfg = mmdit.MMDiTConfig(
    depth=4,
    hidden_size=64,
    num_heads=2,
    in_channels=4,
    out_channels=4,
    pooled_dim=16,
    context_dim=16,
    pos_embed_max_size=8,
  )
  model = mmdit.MMDiT(cfg, scan_layers=True)
  inputs = mmdit.dummy_inputs(cfg, batch=2, latent_size=8, context_len=5)
  params = mmdit.init_params(model, jax.random.key(0))
  counted = hlo_flops.matmul_flops(_hlo(lambda p, *a: model.apply({"params": p}, *a), params, *inputs))
  expected = 2 * flops.mmdit_forward_flops(cfg, 8, 8, 5)
  assert counted["flops"] == expected
  assert counted["flops_loops_once"] < expected  # what cost_analysis would see
