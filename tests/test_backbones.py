"""The backbones of the paper's study (DiT, CrossDiT, UViT, MM-DiT with three weight sets) as
modules: shapes, zero output at init, finite gradients, scan == unrolled, remat, sharded ==
unsharded, logical axes, closed-form parameter counts, exact FLOPs against the traced and the
compiled program, the parameter classes, and the equalities that hold by construction (DiT =
MM-DiT with tied streams; MM-DiT3 with tied text streams = MM-DiT)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from sd3_jax import sharding
from sd3_jax.models import backbones as B
from sd3_jax.models import flops as F
from sd3_jax.models import mmdit as M
from sd3_jax.models import param_counts as PC
from tools import hlo_flops

NEW = ("mmdit3", "dit", "crossdit", "uvit")
HW, LC = (8, 12), 6


def _cfg(backbone, **kw):
  base = dict(
    depth=2,
    hidden_size=32,
    num_heads=2,
    in_channels=4,
    out_channels=4,
    pooled_dim=8,
    context_dim=16,
    pos_embed_max_size=8,
    qk_norm=True,
    clip_tokens=2,
    uvit_res_blocks=1,
    backbone=backbone,
  )
  return M.MMDiTConfig(**{**base, **kw})


def _inputs(cfg, b=4, seed=1):
  ks = jax.random.split(jax.random.key(seed), 3)
  return (
    jax.random.normal(ks[0], (b, *HW, cfg.in_channels)),
    jnp.linspace(0.1, 0.9, b),
    jax.random.normal(ks[1], (b, cfg.pooled_dim)),
    jax.random.normal(ks[2], (b, LC, cfg.context_dim)),
  )


def _randomize(params, seed=0, std=0.2):
  """Random values everywhere (adaLN-Zero would make every block an identity and hide bugs);
  numpy draws: no XLA op per leaf."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: (std * rng.standard_normal(x.shape)).astype(np.float32), params)


def _init(cfg):
  # An 'rbg' key: the same initialisers, a quarter of the compile time of threefry's
  return jax.jit(functools.partial(M.init_params, B.build(cfg)))(jax.random.key(0, impl="rbg"))


def _loss(model):
  def loss(p, *a):
    out = model.apply({"params": p}, *a)
    return jnp.mean((out - 1.0) ** 2), out

  return loss


@pytest.fixture(scope="module", params=NEW)
def plain(request):
  """Per backbone, two compiled programs: the unscanned forward sharded on a (data 2, fsdp 2,
  tensor 2) mesh (for the outputs), and the scanned gradient program on one device (its HLO is
  counted, its output and gradients compared). Equal outputs show both sharded == unsharded and
  scanned == unrolled at the cost of two compiles instead of three."""
  cfg = _cfg(request.param)
  fresh = _init(cfg)
  params = _randomize(fresh)
  inputs = _inputs(cfg)
  model = B.build(cfg)
  mesh = sharding.make_mesh(2, 2, 2)
  shardings = sharding.logical_to_mesh_shardings(sharding.logical_specs(M.abstract_params(model)), mesh)
  batch = tuple(sharding.batch_sharding(mesh, a.ndim) for a in inputs)

  def apply(p, *a):
    with sharding.logical_axes(mesh):
      return model.apply({"params": p}, *a)

  fwd = jax.jit(apply, in_shardings=(shardings, *batch))
  scanned = M.stack_block_params(params, cfg)
  compiled = jax.jit(jax.value_and_grad(_loss(B.build(cfg, scan_layers=True)), has_aux=True))
  compiled = compiled.lower(scanned, *inputs).compile()
  (_, out_scanned), grads = compiled(scanned, *inputs)
  return dict(
    cfg=cfg,
    fresh=fresh,
    params=params,
    inputs=inputs,
    fwd=fwd,
    out=fwd(params, *inputs),
    out_scanned=out_scanned,
    grads=M.unstack_block_params(grads, cfg),
    hlo=compiled.as_text(),
  )


def _close(tree_a, tree_b, rtol=1e-5, atol=1e-5):
  for a, b in zip(jax.tree.leaves(tree_a), jax.tree.leaves(tree_b)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


def test_shapes_zero_init_and_finite_gradients(plain):
  cfg, inputs, out, fwd = plain["cfg"], plain["inputs"], plain["out"], plain["fwd"]
  assert out.shape == inputs[0].shape and out.dtype == jnp.float32 and float(jnp.std(out)) > 0
  # adaLN-Zero and zero final layers: a fresh model predicts exactly zero velocity.
  assert not np.any(np.asarray(fwd(plain["fresh"], *inputs)))
  # the text reaches the image: another context changes the velocity
  assert not np.allclose(np.asarray(fwd(plain["params"], *inputs[:3], inputs[3][::-1])), np.asarray(out))
  flat = {jax.tree_util.keystr(k): np.asarray(g) for k, g in jax.tree_util.tree_flatten_with_path(plain["grads"])[0]}
  assert all(np.all(np.isfinite(g)) for g in flat.values())
  # Zero only where nothing depends on it: the frozen table, and the query norm of the last
  # block's text streams (pre-only: their queries' outputs are discarded).
  zero = {k for k, g in flat.items() if not np.any(g)}
  last = f"['joint_blocks_{cfg.depth - 1}']"
  assert zero <= {"['pos_embed']"} | {f"{last}['{s}']['attn']['ln_q']['scale']" for s in cfg.text_streams}, zero
  assert "['pos_embed']" in zero


def test_scan_remat_and_flops_against_the_compiled_program(plain):
  """The scanned layout is what the scanned module creates; with a named remat policy the
  scanned model has the same gradients; the FLOP formula is exact
  against the traced forward and against XLA's compiled gradient program (scanned layers
  counted per layer): the 3x convention less the input gradients nobody needs (latents,
  t features, pooled, text)."""
  cfg, params, inputs = plain["cfg"], plain["params"], plain["inputs"]
  scanned = M.stack_block_params(params, cfg)
  assert any(k.startswith("scan_blocks_") for k in scanned)
  abstract = nn.unbox(M.abstract_params(B.build(cfg, scan_layers=True)))
  assert jax.tree.structure(abstract) == jax.tree.structure(scanned)
  assert [a.shape for a in jax.tree.leaves(abstract)] == [b.shape for b in jax.tree.leaves(scanned)]
  back = M.unstack_block_params(scanned, cfg)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)))
  with pytest.raises(ValueError, match="unscanned"):
    B.build(cfg, scan_layers=True).apply({"params": scanned}, *inputs, skip_layers=(0,))

  b = inputs[0].shape[0]
  model = B.build(cfg, scan_layers=True)
  apply = lambda p, *a: model.apply({"params": p}, *a)  # noqa: E731
  assert F.count_matmul_flops(apply, scanned, *inputs) == b * F.forward_flops(cfg, *HW, LC)
  counted = hlo_flops.matmul_flops(plain["hlo"])
  terms = F.forward_flops_breakdown(cfg, *HW, LC)
  no_input_grad = b * sum(terms.get(k, 0) for k in F.INPUT_TERMS)
  assert counted["unknown_trip_counts"] == 0
  assert counted["flops"] == F.train_step_flops(cfg, *HW, LC, b) - no_input_grad

  # The checkpoint names tagged in blocks of their own (cross-attention; the UViT's conv blocks
  # under remat); the DiT and MM-DiT3 blocks are the MM-DiT's stream blocks (tests/test_remat.py).
  if cfg.backbone in ("crossdit", "uvit"):
    remat = B.build(cfg, scan_layers=True, remat="save_qkv_attn_mlp")
    grads, _ = jax.jit(jax.grad(_loss(remat), has_aux=True))(scanned, *inputs)
    _close(M.unstack_block_params(grads, cfg), plain["grads"])


def test_sharded_unrolled_equals_unsharded_scanned(plain):
  out, ref = plain["out"], plain["out_scanned"]
  rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
  assert rel < 1e-5, rel


def test_logical_axes_counts_and_param_classes(plain):
  cfg = plain["cfg"]
  boxed = M.abstract_params(B.build(cfg, scan_layers=True))
  for leaf in jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)):
    assert isinstance(leaf, nn.Partitioned) and len(leaf.names) == leaf.value.ndim, leaf
  # Closed form == the module's tree, also for other depths, widths and options (UViT: two stages).
  # And the FLOP formula == the traced forward (abstract parameters: nothing runs).
  for kw in ({}, dict(depth=3, hidden_size=64, num_heads=4, qk_norm=False, uvit_res_blocks=2, patch_size=4)):
    c = _cfg(cfg.backbone, **kw)
    assert PC.param_counts(c)["total"] == B.count_params(c), kw
    model = B.build(c)
    shapes = nn.unbox(M.abstract_params(model))
    traced = F.count_matmul_flops(lambda p, *a: model.apply({"params": p}, *a), shapes, *_inputs(c, b=1))
    assert traced == F.forward_flops(c, *HW, LC), kw
  # Classes from names agree with how shapes grow with width: hidden kernels grow in fan-in and
  # fan-out (x4 when the width doubles), input kernels in fan-out only, output ones in fan-in only.
  small, wide = (nn.unbox(M.abstract_params(B.build(_cfg(cfg.backbone, hidden_size=w)))) for w in (32, 64))
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(small)[0], jax.tree.leaves(wide)):
    name = "/".join(k.key for k in path)
    cls, growth = B.param_class(name), b.size / a.size
    if cls == "hidden":
      assert growth == 4, name
    elif cls == "input" and a.ndim > 1:
      assert growth == 2 and b.shape[-1] == 2 * a.shape[-1], name
    elif cls == "output":
      assert growth == 2 and b.shape[-1] == a.shape[-1], name
    else:
      assert a.ndim == 1 or name == "pos_embed", name


def test_dit_is_mmdit_with_tied_streams():
  """Tie the MM-DiT's context and image streams to the DiT's blocks (the last context stream
  keeps its q/k/v and its first two modulations, shift and scale): the same function."""
  dit_cfg = _cfg("dit", qk_norm=True)
  dit = _randomize(nn.unbox(M.abstract_params(B.build(dit_cfg))))
  mm = {k: v for k, v in dit.items() if not k.startswith("blocks_")}
  h, last = dit_cfg.hidden_size, dit_cfg.depth - 1
  for i in range(dit_cfg.depth):
    blk = dit[f"blocks_{i}"]
    ctx = blk
    if i == last:
      ada = blk["adaLN_modulation"]
      attn = {k: v for k, v in blk["attn"].items() if k != "proj"}
      ctx = {"adaLN_modulation": {"kernel": ada["kernel"][:, : 2 * h], "bias": ada["bias"][: 2 * h]}, "attn": attn}
    mm[f"joint_blocks_{i}"] = {"x_block": blk, "context_block": ctx}
  inputs = _inputs(dit_cfg)
  want = jax.jit(B.build(dit_cfg).apply)({"params": dit}, *inputs)
  got = jax.jit(B.build(_cfg("mmdit", qk_norm=True)).apply)({"params": mm}, *inputs)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_mmdit3_with_tied_text_streams_is_mmdit():
  cfg = _cfg("mmdit", dual_attention_layers=(0,))
  mm = _randomize(nn.unbox(M.abstract_params(B.build(cfg))))
  three = {k: v for k, v in mm.items() if k != "context_embedder"}
  three["clip_embedder"] = three["t5_embedder"] = mm["context_embedder"]
  for i in range(cfg.depth):
    blk = dict(mm[f"joint_blocks_{i}"])
    blk["clip_block"] = blk["t5_block"] = blk.pop("context_block")
    three[f"joint_blocks_{i}"] = blk
  inputs = _inputs(cfg)
  want = jax.jit(B.build(cfg).apply)({"params": mm}, *inputs)
  cfg3 = _cfg("mmdit3", dual_attention_layers=(0,))
  got = jax.jit(B.build(cfg3).apply)({"params": three}, *inputs)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  assert jax.tree.structure(three) == jax.tree.structure(nn.unbox(M.abstract_params(B.build(cfg3))))


def test_config_errors_name_the_fix():
  with pytest.raises(ValueError, match="backbone must be one of"):
    _cfg("unet")
  with pytest.raises(ValueError, match="MM-DiT backbones only"):
    _cfg("dit", dual_attention_layers=(0,))
  with pytest.raises(ValueError, match="power of 2"):
    _cfg("uvit", patch_size=3)
  with pytest.raises(ValueError, match="divisible by 8"):
    _cfg("uvit", hidden_size=36, num_heads=2, patch_size=4)
  cfg = _cfg("mmdit3", clip_tokens=6)
  with pytest.raises(ValueError, match="CLIP tokens and the rest as T5"):
    B.build(cfg).init(jax.random.key(0), *_inputs(cfg))
  with pytest.raises(ValueError, match="use backbones.build"):
    M.MMDiT(_cfg("dit")).init(jax.random.key(0), *_inputs(_cfg("dit")))
  assert M.MMDiTConfig.from_dict(_cfg("uvit").to_dict()) == _cfg("uvit")
  old = {
    k: v for k, v in M.get_config("d2").to_dict().items() if k not in ("backbone", "clip_tokens", "uvit_res_blocks")
  }
  assert M.MMDiTConfig.from_dict(old).backbone == "mmdit"  # checkpoints from before the field
  with pytest.raises(ValueError, match="holds a DiT .*'dit'.*builds a CrossDiT .*'crossdit'"):
    B.check_backbone("dit", "crossdit", "checkpoint X")
