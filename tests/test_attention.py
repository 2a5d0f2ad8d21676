"""Attention kernels: the splash kernel (Pallas interpret mode on CPU) equals the XLA path,
forward and gradients, padded and unpadded, sharded; 'auto' resolution and its errors."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from sd3_jax import sharding
from sd3_jax.models import attention as A
from sd3_jax.models import mmdit

BLOCKS = A.SplashBlocks(128, 128)


def _qkv(length, batch=2, heads=2, dh=64, seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  return [jax.random.normal(k, (batch, length, heads, dh), jnp.float32) for k in ks]


def _loss(impl, ct):
  return lambda q, k, v: jnp.sum(A.attention(q, k, v, impl, BLOCKS) * ct)


# Both paths are float32 with float32 softmax statistics; they differ by summation order and
# the online-softmax rescaling only (~1e-6 of values of order 1).
@pytest.mark.parametrize("length", [200, 256])  # padded to 256 / exactly two blocks
def test_splash_matches_xla_forward_and_gradients(length):
  q, k, v, ct = _qkv(length)
  ref = A.attention(q, k, v, "xla")
  got = A.attention(q, k, v, "splash_interpret", BLOCKS)
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=2e-5, rtol=1e-5)
  g_ref = jax.grad(_loss("xla", ct), (0, 1, 2))(q, k, v)
  g_got = jax.grad(_loss("splash_interpret", ct), (0, 1, 2))(q, k, v)
  for a, b in zip(g_got, g_ref):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-5, rtol=1e-4)


def test_splash_cross_attention_matches_xla():
  """Queries and keys of different lengths (CrossDiT): 200 image queries padded to 256, 77 text
  keys padded to 128 and masked; forward and gradients."""
  q, _, _, ct = _qkv(200)
  _, k, v, _ = _qkv(77, seed=1)
  ref = A.attention(q, k, v, "xla")
  np.testing.assert_allclose(np.asarray(A.attention(q, k, v, "splash_interpret", BLOCKS)), np.asarray(ref), atol=2e-5)
  g_ref = jax.grad(_loss("xla", ct), (0, 1, 2))(q, k, v)
  g_got = jax.grad(_loss("splash_interpret", ct), (0, 1, 2))(q, k, v)
  for a, b in zip(g_got, g_ref):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-5, rtol=1e-4)
  assert A.SplashBlocks().resolve(256 + 0, 154) == (256, 256)  # blocks by each side's length


def test_splash_padding_is_masked():
  """Padded keys must get zero weight: the output of a length-130 sequence (padded to 256)
  equals attention over those 130 tokens only, whatever the zeros pad would have added."""
  q, k, v, _ = _qkv(130, batch=1, heads=1)
  got = A.attention(q, k, v, "splash_interpret", BLOCKS)
  ref = A.attention(q, k, v, "xla")
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=2e-5, rtol=1e-5)


def test_splash_sharded_over_batch_and_heads():
  q, k, v, ct = _qkv(200, batch=4, heads=4)
  g_ref = jax.grad(_loss("xla", ct), (0, 1, 2))(q, k, v)
  mesh = sharding.make_mesh(1, 4, 2)
  s = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor"))

  def grads(q, k, v):
    with sharding.logical_axes(mesh):
      return jax.grad(_loss("splash_interpret", ct), (0, 1, 2))(q, k, v)

  fn = jax.jit(grads, in_shardings=(s,) * 3, out_shardings=(s,) * 3)
  for a, b in zip(fn(*jax.device_put((q, k, v), s)), g_ref):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-5, rtol=1e-4)


def test_mmdit_with_splash_equals_xla():
  cfg = mmdit.MMDiTConfig(
    depth=2,
    hidden_size=128,
    num_heads=2,
    in_channels=4,
    out_channels=4,
    pooled_dim=16,
    context_dim=16,
    pos_embed_max_size=8,
    qk_norm=True,
  )
  x, t, pooled, ctx = mmdit.dummy_inputs(cfg, batch=2, latent_size=8, context_len=5)
  keys = jax.random.split(jax.random.key(3), 3)
  x, pooled, ctx = (jax.random.normal(k, a.shape) for k, a in zip(keys, (x, pooled, ctx)))
  t = jnp.array([0.3, 0.8])
  params = mmdit.init_params(mmdit.MMDiT(cfg), jax.random.key(0))
  leaves, tree = jax.tree.flatten(params)  # randomise the adaLN-Zero layers too
  ks = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(tree, [0.1 * jax.random.normal(k, a.shape) for k, a in zip(ks, leaves)])
  ref = mmdit.MMDiT(cfg, attention_impl="xla").apply({"params": params}, x, t, pooled, ctx)
  got = mmdit.MMDiT(cfg, attention_impl="splash_interpret", attention_blocks=BLOCKS).apply(
    {"params": params}, x, t, pooled, ctx
  )
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-4, rtol=1e-4)


def test_default_blocks_for_the_sd3_lengths():
  assert A.default_block(256 + 154) == 512  # 256^2: one block of 512
  assert A.default_block(4096 + 154) == 256  # 1024^2: 4352 padded, not 4608
  assert A.default_block(1024 + 154) == 256 or A.default_block(1024 + 154) == 128
  with pytest.raises(ValueError, match="multiple of 128"):
    A.SplashBlocks(100, 128).resolve(410)


def test_auto_resolution_and_errors(caplog):
  assert A.resolve_impl("auto", "tpu", jnp.bfloat16) == "splash"
  assert A.resolve_impl("auto", "gpu", jnp.bfloat16) == "cudnn"
  assert A.resolve_impl("auto", "cuda", jnp.float16) == "cudnn"
  assert A.resolve_impl("auto", "cpu", jnp.bfloat16) == "xla"
  with caplog.at_level(logging.INFO, logger=A.__name__):
    assert A.resolve_impl("auto", "gpu", jnp.float32) == "xla"
  assert "cuDNN flash attention needs bfloat16/float16" in caplog.text
  with pytest.raises(ValueError, match="needs bfloat16 or float16 compute"):
    A.resolve_impl("cudnn", "gpu", jnp.float32)
  with pytest.raises(ValueError, match="is a TPU kernel"):
    A.resolve_impl("splash", "cpu", jnp.bfloat16)
  with pytest.raises(ValueError, match="needs NVIDIA GPUs"):
    A.resolve_impl("cudnn", "cpu", jnp.bfloat16)
  with pytest.raises(ValueError, match="attention_impl must be one of"):
    A.resolve_impl("flash", "tpu", jnp.bfloat16)
  q = jnp.zeros((1, 8, 1, 64), jnp.float32)
  with pytest.raises(ValueError, match="needs bfloat16 or float16 inputs"):
    A.attention(q, q, q, "cudnn")
