"""muP (sd3_jax/models/mup.py): parameter roles, initialisation scales, attention scale, and that
muP at its base width is SP.

The init test measures each parameter's RMS at two widths and checks the exponent its role
prescribes, so the role rule (used for the learning rates) and the initialisers declared in the
model cannot disagree without failing.
"""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from sd3_jax.models import attention as A
from sd3_jax.models import backbones
from sd3_jax.models import mmdit as M
from sd3_jax.models import mup
from sd3_jax.scaling import cli

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.py")

BASE = dict(
  depth=1,
  num_heads=2,
  patch_size=2,
  in_channels=4,
  out_channels=4,
  pooled_dim=32,
  context_dim=48,
  pos_embed_max_size=8,
  qk_norm=True,
  dual_attention_layers=(0,),
)


M_WIDE = 8  # the wide model is 8x the base width 32


def _params(width, parametrization="sp", base=32, seed=0):
  cfg = M.MMDiTConfig(hidden_size=width, parametrization=parametrization, mup_base_width=base, **BASE)
  return cfg, jax.jit(lambda k: M.init_params(M.MMDiT(cfg), k))(jax.random.key(seed))


@pytest.fixture(scope="module")
def models():
  """(config, params) of SP and muP at the base width 32 and at 8x it (four inits, shared)."""
  return {(p, w): _params(w, p) for p in ("sp", "mup") for w in (32, 32 * M_WIDE)}


def _roles(params):
  return mup.roles(params, backbones.param_class)


def _rms(x):
  x = np.asarray(x, np.float64)
  return float(np.sqrt(np.mean(np.square(x))))


def test_every_parameter_has_the_class_of_its_layer():
  """The roles muP uses are backbones.param_class's (tests/test_mup_backbones.py checks them
  against the init and the optimizer of every backbone)."""
  cfg = M.MMDiTConfig(hidden_size=32, **BASE)
  params = nn.unbox(M.abstract_params(M.MMDiT(cfg)))
  roles = {"/".join(mup.path_names(p)): r for p, r in jax.tree_util.tree_flatten_with_path(_roles(params))[0]}
  assert roles["x_embedder/proj/kernel"] == mup.INPUT
  assert roles["context_embedder/kernel"] == mup.INPUT
  assert roles["t_embedder/mlp_0/kernel"] == mup.INPUT and roles["t_embedder/mlp_2/kernel"] == mup.HIDDEN
  assert roles["final_layer/linear/kernel"] == mup.OUTPUT
  assert roles["final_layer/linear/bias"] == mup.INPUT  # vectors go with the input weights (TP5)
  assert roles["joint_blocks_0/x_block/attn2/qkv/kernel"] == mup.HIDDEN
  assert roles["joint_blocks_0/x_block/attn/ln_q/scale"] == mup.INPUT
  assert roles["pos_embed"] == mup.FIXED
  assert set(roles.values()) == set(mup.ROLES) == set(backbones.PARAM_CLASSES)
  # The scanned layout has the same roles (its block kernels are stacked, still hidden).
  scanned = nn.unbox(M.abstract_params(M.MMDiT(cfg, scan_layers=True)))
  assert sorted(jax.tree.leaves(_roles(scanned))) == sorted(roles.values())
  # A classifier answering something else is refused.
  with pytest.raises(ValueError, match="parameter class 'vector' of .* is not one of"):
    mup.roles(params, lambda path: "vector")


def test_init_scales_with_width_as_each_role_prescribes(models):
  """Under muP: input weights keep their scale, hidden ones shrink as m^-1/2, output ones as
  m^-1 (zero-initialised ones stay 0); under SP the xavier input layers shrink too."""
  m = M_WIDE
  exponents = {}
  for parametrization in ("sp", "mup"):
    _, small = models[parametrization, 32]
    _, wide = models[parametrization, 32 * m]
    roles = _roles(small)
    for (path, a), b, role in zip(
      jax.tree_util.tree_flatten_with_path(small)[0], jax.tree.leaves(wide), jax.tree.leaves(roles)
    ):
      if role in (mup.INPUT, mup.HIDDEN, mup.OUTPUT) and _rms(a) > 0 and mup.path_names(path)[-1] == "kernel":
        exponents[parametrization, "/".join(mup.path_names(path))] = (role, math.log(_rms(b) / _rms(a), m))
  checked = {mup.INPUT: 0, mup.HIDDEN: 0}
  for (parametrization, name), (role, e) in exponents.items():
    if parametrization == "mup":
      assert e == pytest.approx(-mup.INIT_EXPONENT[role], abs=0.04), (name, role, e)
      checked[role] += 1
  assert checked[mup.INPUT] == 4 and checked[mup.HIDDEN] >= 8
  assert exponents["sp", "x_embedder/proj/kernel"][1] < -0.3  # SP's xavier input layer shrinks with width
  # The final layer is zero-initialised, so its muP output scale is checked on the initialiser.
  init = mup.Scaling(mup=True, width_mult=m).xavier_uniform(mup.OUTPUT)
  w_base = jax.nn.initializers.xavier_uniform()(jax.random.key(0), (256, 16))
  w_wide = init(jax.random.key(0), (256 * m, 16))
  assert math.log(_rms(w_wide) / _rms(w_base), m) == pytest.approx(-1.0, abs=0.04)


def test_mup_at_its_base_width_is_sp_bit_for_bit(models):
  _, sp = models["sp", 32]
  cfg_mu, mu = models["mup", 32]
  assert cfg_mu.attention_scale is None and cfg_mu.mup_scaling.width_mult == 1.0
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), sp, mu))
  # And above it the model does change (the check above could not pass by accident).
  _, sp_wide = models["sp", 32 * M_WIDE]
  _, mu_wide = models["mup", 32 * M_WIDE]
  assert not jnp.array_equal(sp_wide["x_embedder"]["proj"]["kernel"], mu_wide["x_embedder"]["proj"]["kernel"])


def test_attention_scale_is_applied_in_every_attention(models):
  """muP's sqrt(d_base)/d: the same output as SP with every q scaled by sqrt(d_base/d), which
  qk-norm's q gain expresses exactly (joint and dual attention alike)."""
  cfg_mu, params = models["mup", 32 * M_WIDE]  # 2 heads: head dim 128 against the base's 16
  assert cfg_mu.attention_scale == pytest.approx(math.sqrt(16) / 128)
  cfg_sp = M.MMDiTConfig(**{**cfg_mu.to_dict(), "parametrization": "sp"})
  ratio = math.sqrt(16 / 128)

  @jax.jit
  def randomized(params):  # random values everywhere (adaLN-Zero would make the blocks identities)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(treedef, [0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    return params, jax.tree_util.tree_map_with_path(
      lambda p, x: x * ratio if "ln_q" in mup.path_names(p) else x, params
    )

  params, scaled = randomized(params)
  rng = np.random.default_rng(0)
  inputs = [
    rng.standard_normal(x.shape, np.float32) for x in M.dummy_inputs(cfg_mu, batch=2, latent_size=4, context_len=3)
  ]
  out_mu = jax.jit(M.MMDiT(cfg_mu).apply)({"params": params}, *inputs)
  out_sp, out_sp_scaled = (jax.jit(M.MMDiT(cfg_sp).apply)({"params": p}, *inputs) for p in (params, scaled))
  np.testing.assert_allclose(out_mu, out_sp_scaled, rtol=2e-5, atol=2e-6)
  assert float(jnp.max(jnp.abs(out_mu - out_sp))) > 1e-3
  # The kernels take the scale as given.
  q, k, v = (jax.random.normal(jax.random.key(i), (1, 5, 2, 8)) for i in range(3))
  want = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) * 0.3), v)
  np.testing.assert_allclose(A.attention(q, k, v, "xla", scale=0.3), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
  "fields, message",
  [
    (dict(parametrization="mup", mup_base_width=None), "needs model.mup_base_width"),
    (dict(parametrization="mup", mup_base_width=33), "not divisible by num_heads"),
    (dict(parametrization="mu-p", mup_base_width=32), "parametrization must be one of"),
  ],
)
def test_bad_mup_settings_name_the_fix(fields, message):
  with pytest.raises(ValueError, match=message):
    M.MMDiTConfig(hidden_size=64, **{**BASE, **fields})
  # A base head dimension given explicitly lifts the divisibility requirement.
  if fields.get("mup_base_width") == 33:
    cfg = M.MMDiTConfig(hidden_size=64, mup_base_head_dim=16, **{**BASE, **fields})
    assert cfg.attention_scale == pytest.approx(4 / 32)


def test_coordinate_check_separates_mup_from_sp_and_agrees_at_the_base_width(tmp_path):
  """``sd3-scaling coord_check`` on a one-block model at widths 32, 64, 128 (heads fixed, so the head
  dimension grows too), three Adam steps at lr 1e-2: every layer's output and update size stays
  flat with width under muP and grows under SP; at the base width the two train identically."""
  out = tmp_path / "coord"
  cli.main(
    ["coord_check", "--config", TINY, "--widths", "32", "64", "128", "--steps", "3", "--out", str(out)]
    + ["--set", "model.depth=1", "--set", "model.num_heads=2", "--set", "optimizer.learning_rate=0.01"]
  )
  report = json.load(open(out / "coord_check.json"))
  mu, sp = report["summary"]["mup"], report["summary"]["sp"]
  assert mu["act"]["max_abs_slope"] < 0.3 and mu["delta"]["max_abs_slope"] < 0.3, mu
  assert sp["delta"]["max_abs_slope"] > 0.8, sp
  grows = [k for k, v in report["slopes"]["sp"].items() if v.get("delta", 0) > 0.4]
  assert len(grows) >= 10, report["slopes"]["sp"]  # many layers drift under SP, not one outlier
  data = {d["parametrization"]: d for d in report["data"]}
  for kind in ("act", "delta"):  # index 0: the base width, where muP is SP (optimizer included)
    assert {k: v[0] for k, v in data["mup"][kind].items()} == {k: v[0] for k, v in data["sp"][kind].items()}
  assert os.path.getsize(out / "coord_check.png") > 10_000


def test_a_mup_attention_scale_is_neither_exported_nor_fine_tuned_into_another(models, tmp_path):
  """The PyTorch formats compute 1/sqrt(d): a muP model off its base head dim is refused in one
  line before any tensor is written; init_from refuses a checkpoint whose attention differs."""
  from sd3_jax import convert
  from sd3_jax.storage import pretrained
  from sd3_jax.training import init_from

  cfg_wide, wide = models["mup", 32 * M_WIDE]
  with pytest.raises(ValueError, match="muP's attention scale sqrt\\(d_base\\)/d = 0.03125 .* 'diffusers' format"):
    convert.params_to_state_dict(wide, cfg_wide, "diffusers")
  cfg_base, base = models["mup", 32]  # at the base head dim the scale is SP's: it converts
  assert len(convert.params_to_state_dict(base, cfg_base, "sd3")) > 20
  pretrained.save_pretrained(tmp_path / "m", jax.tree.map(np.asarray, wide), cfg_wide)
  sp_wide = M.MMDiTConfig(**{**cfg_wide.to_dict(), "parametrization": "sp"})
  with pytest.raises(
    ValueError, match="attention with scale 0.03125 \\(parametrization 'mup'\\), this run's with the usual"
  ):
    init_from.check(str(tmp_path / "m"), sp_wide, (4, 4))
  assert init_from.check(str(tmp_path / "m"), cfg_wide, (4, 4)) == cfg_wide
