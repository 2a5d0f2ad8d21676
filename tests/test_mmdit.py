"""MM-DiT structure: presets, scan/remat/bf16 equivalence, input validation, init."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from sd3_jax.models import layers as L
from sd3_jax.models import mmdit as M

TINY = M.MMDiTConfig(
  depth=4,
  hidden_size=32,
  num_heads=4,
  in_channels=4,
  out_channels=4,
  pooled_dim=16,
  context_dim=24,
  pos_embed_max_size=8,
  qk_norm=True,
  dual_attention_layers=(0, 1),
)


def _randomize(params, seed=0, std=0.1):
  """Random values everywhere (the adaLN-Zero init would make every block an identity)."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [std * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def _inputs(cfg, b=2, h=8, w=12, lc=5, seed=1):
  ks = jax.random.split(jax.random.key(seed), 3)
  return (
    jax.random.normal(ks[0], (b, h, w, cfg.in_channels)),
    jnp.linspace(0.05, 0.95, b),
    jax.random.normal(ks[1], (b, cfg.pooled_dim)),
    jax.random.normal(ks[2], (b, lc, cfg.context_dim)),
  )


@pytest.fixture(scope="module")
def plain():
  params = _randomize(M.init_params(M.MMDiT(TINY), jax.random.key(0)))
  inputs = _inputs(TINY)
  out = M.MMDiT(TINY).apply({"params": params}, *inputs)
  return params, inputs, out


def test_preset_parameter_counts_match_spec():
  # The tensor sizes of the released SD3-medium and SD3.5-large transformer checkpoints summed,
  # pos_embed excluded (the same totals diffusers' SD3Transformer2DModel gives for their configs);
  # count_params counts our tree with eval_shape. test_family_formula derives them in closed form.
  assert M.count_params(M.get_config("sd3-medium")) == 2_028_328_000
  assert M.count_params(M.get_config("sd3.5-large")) == 8_056_627_520
  assert M.get_config("d38") == M.MMDiTConfig(depth=38)
  assert M.get_config("sd3.5-medium").pos_embed_max_size == 384


def test_family_formula():
  # Per full stream 18h^2+15h; last context stream 5h^2+5h (from the block's layers), plus embedders/final.
  for d in (2, 3):
    cfg = M.MMDiTConfig(depth=d)
    h = cfg.hidden_size
    blocks = (2 * d - 1) * (18 * h * h + 15 * h) + (5 * h * h + 5 * h)
    emb = (4 * 16 * h + h) + (256 * h + h + h * h + h) + (2048 * h + h + h * h + h) + (4096 * h + h)
    final = (2 * h * h + 2 * h) + (h * 64 + 64)
    assert M.count_params(cfg) == blocks + emb + final


def test_output_shape_and_dtype(plain):
  _, inputs, out = plain
  assert out.shape == inputs[0].shape and out.dtype == jnp.float32
  assert float(jnp.std(out)) > 0


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_identical(plain, remat):
  params, inputs, out = plain
  got = M.MMDiT(TINY, remat=remat).apply({"params": params}, *inputs)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(out))


def test_remat_gradients_identical(plain):
  params, inputs, _ = plain

  def loss(p, model):
    return jnp.mean(model.apply({"params": p}, *inputs) ** 2)

  g0 = jax.grad(loss)(params, M.MMDiT(TINY))
  g1 = jax.grad(loss)(params, M.MMDiT(TINY, remat="full"))
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_scan_identical_and_layout_roundtrip(plain):
  params, inputs, out = plain
  scanned = M.stack_block_params(params, TINY)
  assert set(scanned) >= {"scan_blocks_0_2", "scan_blocks_2_3", "joint_blocks_3"}
  assert "joint_blocks_0" not in scanned
  # The stacked layout is exactly what the scanned module creates.
  abstract = nn.unbox(M.abstract_params(M.MMDiT(TINY, scan_layers=True)))
  assert jax.tree.structure(abstract) == jax.tree.structure(scanned)
  for a, b in zip(jax.tree.leaves(abstract), jax.tree.leaves(scanned)):
    assert a.shape == b.shape
  for remat in ("none", "full"):
    got = M.MMDiT(TINY, scan_layers=True, remat=remat).apply({"params": scanned}, *inputs)
    np.testing.assert_allclose(np.asarray(got), np.asarray(out), rtol=1e-6, atol=1e-6)
  back = M.unstack_block_params(scanned, TINY)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bf16_close_to_float32(plain):
  params, inputs, out = plain
  got = M.MMDiT(TINY, dtype=jnp.bfloat16).apply({"params": params}, *inputs)
  assert got.dtype == jnp.float32
  # bf16 has an 8-bit mantissa (relative rounding 2^-9 ~ 0.2% per op); through 4 blocks of
  # matmuls with f32 accumulation the relative error stays at the percent level.
  rel = float(jnp.linalg.norm(got - out) / jnp.linalg.norm(out))
  assert rel < 3e-2, rel
  assert rel > 0  # it really ran in bf16


def test_logical_axes_on_every_parameter():
  boxed = M.abstract_params(M.MMDiT(TINY, scan_layers=True))
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  for leaf in leaves:
    assert isinstance(leaf, nn.Partitioned), leaf
    assert len(leaf.names) == leaf.value.ndim
  specs = nn.get_partition_spec(boxed)
  assert specs["scan_blocks_0_2"]["x_block"]["mlp"]["fc1"]["kernel"] == jax.sharding.PartitionSpec(
    "layers", "embed", "mlp"
  )


def test_adaln_zero_init_and_pos_table():
  params = M.init_params(M.MMDiT(TINY), jax.random.key(0))
  for i in range(TINY.depth):
    for stream in ("x_block", "context_block"):
      ada = params[f"joint_blocks_{i}"][stream]["adaLN_modulation"]
      assert not np.any(ada["kernel"]) and not np.any(ada["bias"])
  assert not np.any(params["final_layer"]["linear"]["kernel"])
  # adaLN-Zero: a freshly initialised model predicts exactly zero velocity.
  out = M.MMDiT(TINY).apply({"params": params}, *_inputs(TINY))
  assert not np.any(np.asarray(out))
  table = np.asarray(params["pos_embed"])[0]
  np.testing.assert_allclose(table, L.sincos_2d_table(TINY.hidden_size, 8, 16, 1.0), rtol=1e-6, atol=1e-6)


def test_pos_table_geometry():
  # First half of channels encodes the column, second half the row; centre crop of 16 spans 0..15.
  t = L.sincos_2d_table(8, 20, base_size=16, scale=1.0).reshape(20, 20, 8)
  # position 0 sits at index 2 on each axis: sin(0)=0, cos(0)=1 in both halves.
  np.testing.assert_allclose(t[2, 2], [0, 0, 1, 1, 0, 0, 1, 1], atol=1e-12)
  np.testing.assert_allclose(t[5, 2, :4], [0, 0, 1, 1], atol=1e-12)  # same column -> same x half
  np.testing.assert_allclose(t[2, 5, 4:], [0, 0, 1, 1], atol=1e-12)  # same row -> same y half
  # The paper's 1024^2 grid: (p - 64)/4 for M=192, scale 4.
  t4 = L.sincos_2d_table(4, 192, base_size=16, scale=4.0).reshape(192, 192, 4)
  np.testing.assert_allclose(t4[0, 68, :2], [np.sin(1.0), np.cos(1.0)], atol=1e-12)


def test_cropping_uses_centre_of_grid(plain):
  params, _, _ = plain
  crop = L.crop_pos_embed(params["pos_embed"], 8, 4, 6)
  full = np.asarray(params["pos_embed"]).reshape(8, 8, -1)
  np.testing.assert_array_equal(np.asarray(crop).reshape(4, 6, -1), full[2:6, 1:7])


def test_skip_layers_changes_output(plain):
  params, inputs, out = plain
  got = M.MMDiT(TINY).apply({"params": params}, *inputs, skip_layers=(1,))
  assert not np.allclose(np.asarray(got), np.asarray(out))


@pytest.mark.parametrize(
  "bad, match",
  [
    (lambda x, t, y, c: (x[..., :3], t, y, c), "NHWC"),
    (lambda x, t, y, c: (x[:, :7], t, y, c), "divisible by the patch size"),
    (lambda x, t, y, c: (jnp.zeros((2, 18, 8, 4)), t, y, c), "larger than the positional grid"),
    (lambda x, t, y, c: (x, t[:1], y, c), "flow times"),
    (lambda x, t, y, c: (x, t, y[:, :3], c), "pooled"),
    (lambda x, t, y, c: (x, t, y, c[..., :5]), "context"),
  ],
)
def test_bad_inputs_have_clear_errors(plain, bad, match):
  params, inputs, _ = plain
  with pytest.raises(ValueError, match=match):
    M.MMDiT(TINY).apply({"params": params}, *bad(*inputs))


def test_config_validation_and_dict_roundtrip():
  assert M.MMDiTConfig.from_dict(TINY.to_dict()) == TINY
  with pytest.raises(ValueError, match="unknown MMDiTConfig keys"):
    M.MMDiTConfig.from_dict({"depth": 2, "widht": 3})
  with pytest.raises(ValueError, match="dual_attention_layers"):
    M.MMDiTConfig(depth=2, dual_attention_layers=(5,))
  with pytest.raises(ValueError, match="unknown model"):
    M.get_config("sd4")
