"""Checkpoint conversion: key tables, bit-exact round trips, config inference, errors, streaming.

Model parity against diffusers is in test_mmdit_parity.py.
"""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import torch
from diffusers import SD3Transformer2DModel
from safetensors import safe_open

from sd3_jax.storage import pretrained
from sd3_jax.storage import trees
from sd3_jax.models import mmdit as M
from sd3_jax.convert import (
  convert,
  detect_format,
  mmdit_keys as K,
  open_source,
  params_to_state_dict,
  state_dict_to_params,
)
from sd3_jax.convert import formats, safetensors_io
from sd3_jax.convert.cli import main as cli_main

BF16 = np.dtype(ml_dtypes.bfloat16)
TINY = dict(
  hidden_size=32, num_heads=4, in_channels=4, out_channels=4, pooled_dim=16, context_dim=24, pos_embed_max_size=8
)
CONFIGS = {
  "plain": M.MMDiTConfig(depth=2, **TINY),
  "qk": M.MMDiTConfig(depth=2, qk_norm=True, **TINY),
  "dual": M.MMDiTConfig(
    depth=3, qk_norm=True, dual_attention_layers=(0, 2), pos_embed_base_size=4, pos_embed_scale=2.0, **TINY
  ),
}


def random_params(cfg, dtype=np.float32, seed=0):
  rng = np.random.default_rng(seed)
  shapes = pretrained.expected_shapes(cfg)
  flat = {k: (0.05 * rng.standard_normal(s)).astype(dtype) for k, s in shapes.items()}
  return trees.unflatten(flat)


def assert_trees_equal(a, b):
  fa, fb = trees.flatten(a), trees.flatten(b)
  assert sorted(fa) == sorted(fb)
  for k in fa:
    x, y = np.asarray(fa[k]), np.asarray(fb[k])
    assert x.dtype == y.dtype and x.shape == y.shape, k
    assert np.array_equal(x.view(np.uint8), y.view(np.uint8)), k  # bit-exact, NaN-safe


def diffusers_model(cfg):
  kw = {k: v for k, v in K.diffusers_config(cfg).items() if not k.startswith("_")}
  return SD3Transformer2DModel(**kw)


@pytest.fixture()
def ckpt(tmp_path):
  """A saved bf16 jax checkpoint of the 'dual' config."""
  cfg = CONFIGS["dual"]
  params = random_params(cfg, BF16)
  pretrained.save_pretrained(tmp_path / "jx", params, cfg)
  return tmp_path, cfg, params


# ---------------------------------------------------------------------------------------------
# Tables


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_tables_match_models(name):
  cfg = CONFIGS[name]
  ours = K.entries(cfg, "jax")
  assert {e.name: e.shape for e in ours} == pretrained.expected_shapes(cfg)
  sd = diffusers_model(cfg).state_dict()
  assert {e.name: e.shape for e in K.entries(cfg, "diffusers")} == {k: tuple(v.shape) for k, v in sd.items()}
  # Every original key appears once; the last context adaLN and the final layer are swapped.
  orig = [e.name for e in K.entries(cfg, "sd3")]
  assert len(orig) == len(set(orig)) == len(ours)
  swapped = sorted(e.name for e in K.entries(cfg, "diffusers") if e.op == "swap")
  last = cfg.depth - 1
  assert swapped == sorted(
    [
      f"transformer_blocks.{last}.norm1_context.linear.weight",
      f"transformer_blocks.{last}.norm1_context.linear.bias",
      "norm_out.linear.weight",
      "norm_out.linear.bias",
    ]
  )


def test_layout_transforms():
  cfg = CONFIGS["qk"]
  h, heads, dh = 32, 4, 8
  by = {e.name: e for e in K.entries(cfg, "jax")}
  w = np.arange(3 * h * h, dtype=np.float32).reshape(3 * h, h)  # qkv [3h, h]: rows q|k|v, heads contiguous
  k = K.to_native(by["joint_blocks_0/x_block/attn/qkv/kernel"], w)
  assert k.shape == (h, 3, heads, dh)
  np.testing.assert_array_equal(k[5, 1, 2, 3], w[h + 2 * dh + 3, 5])  # k, head 2, dim 3 <- input 5
  proj = np.arange(h * h, dtype=np.float32).reshape(h, h)
  kp = K.to_native(by["joint_blocks_0/x_block/attn/proj/kernel"], proj)
  np.testing.assert_array_equal(kp[1, 3, 7], proj[7, 1 * dh + 3])
  conv = np.arange(h * 4 * 2 * 2, dtype=np.float32).reshape(h, 4, 2, 2)
  kc = K.to_native(by["x_embedder/proj/kernel"], conv)
  np.testing.assert_array_equal(kc[1, 0, 3, 9], conv[9, 3, 1, 0])
  ln = by["joint_blocks_1/context_block/attn/ln_q/scale"]
  assert ln.orig == "joint_blocks.1.context_block.attn.ln_q.weight" and ln.op == "copy"
  df = {e.name: e for e in K.entries(cfg, "diffusers")}
  ada = np.arange(2 * h * h, dtype=np.float32).reshape(2 * h, h)
  np.testing.assert_array_equal(K.to_native(df["norm_out.linear.weight"], ada)[:h], ada[h:])
  np.testing.assert_array_equal(K.to_native(df["transformer_blocks.0.attn.to_v.weight"], w), w[2 * h :])


# ---------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("dtype", [np.float32, BF16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("name", ["plain", "dual"])
def test_round_trips_bit_exact(tmp_path, name, dtype):
  cfg = CONFIGS[name]
  params = random_params(cfg, dtype, seed=1)
  pretrained.save_pretrained(tmp_path / "a", params, cfg)
  # jax -> diffusers (sharded for one case) -> jax
  shard = "3KB" if name == "dual" else "10GB"
  convert(tmp_path / "a", tmp_path / "df", "diffusers", max_shard_size=shard)
  assert os.path.isfile(tmp_path / "df" / formats.DIFFUSERS_INDEX) == (name == "dual")
  assert convert(tmp_path / "df", tmp_path / "b", "jax") == cfg
  assert_trees_equal(pretrained.load_params(tmp_path / "b"), params)
  # jax -> sd3 -> jax
  convert(tmp_path / "a", tmp_path / "m.safetensors", "sd3")
  assert convert(tmp_path / "m.safetensors", tmp_path / "c", "jax") == cfg
  assert_trees_equal(pretrained.load_params(tmp_path / "c"), params)
  assert pretrained.read_config(tmp_path / "c") == cfg
  # sd3 -> diffusers equals jax -> diffusers
  convert(tmp_path / "m.safetensors", tmp_path / "df2", "diffusers")
  a, b = open_source(tmp_path / "df"), open_source(tmp_path / "df2")
  for e in a.entries:
    np.testing.assert_array_equal(a._read(e.name), b._read(e.name))


@pytest.mark.parametrize("shard", ["10GB", "4KB"])
def test_diffusers_output_loads_in_diffusers(tmp_path, shard):
  cfg = CONFIGS["dual"]
  params = random_params(cfg, seed=2)
  src = formats.source_from_params(params, cfg)
  formats.write_diffusers(src, tmp_path / "df", max_shard_bytes=safetensors_io.parse_size(shard))
  model, info = SD3Transformer2DModel.from_pretrained(tmp_path / "df", output_loading_info=True)
  assert not any(info.values()), info
  assert model.config.num_layers == 3 and model.config.qk_norm == "rms_norm"
  assert tuple(model.config.dual_attention_layers) == (0, 2)
  assert model.config.num_attention_heads == 4 and model.config.attention_head_dim == 8
  want = params_to_state_dict(params, cfg, "diffusers")
  got = model.state_dict()
  assert set(got) == set(want)
  for k, v in want.items():
    np.testing.assert_array_equal(got[k].numpy(), v, err_msg=k)
  # and diffusers' own save_pretrained output reads back to the same parameters
  model.save_pretrained(tmp_path / "resaved", max_shard_size=shard)
  assert convert(tmp_path / "resaved", tmp_path / "jx", "jax").depth == 3
  assert_trees_equal(pretrained.load_params(tmp_path / "jx"), params)


def test_conversion_keeps_the_sources_sample_size(tmp_path):
  """diffusers derives its default resolution from config.json's sample_size: a round trip
  through our format and the single file keeps the source's value instead of re-deriving it."""
  cfg = CONFIGS["dual"]
  params = random_params(cfg, seed=3)
  src = formats.source_from_params(params, cfg)
  formats.write_diffusers(src, tmp_path / "df")
  derived = json.loads((tmp_path / "df" / "config.json").read_text())["sample_size"]
  assert derived == cfg.default_sample_size
  cj = json.loads((tmp_path / "df" / "config.json").read_text())
  (tmp_path / "df" / "config.json").write_text(json.dumps({**cj, "sample_size": derived + 3}))
  assert convert(tmp_path / "df", tmp_path / "jx", "jax").sample_size == derived + 3
  convert(tmp_path / "jx", tmp_path / "m.safetensors", "sd3")
  convert(tmp_path / "m.safetensors", tmp_path / "jx2", "jax")
  convert(tmp_path / "jx2", tmp_path / "df2", "diffusers")
  assert json.loads((tmp_path / "df2" / "config.json").read_text())["sample_size"] == derived + 3
  assert SD3Transformer2DModel.from_pretrained(tmp_path / "df2").config.sample_size == derived + 3
  # the default stays implicit: a source with the derived value converts to sample_size=None
  assert convert(tmp_path / "m.safetensors", tmp_path / "jx3", "jax") != cfg
  formats.write_diffusers(src, tmp_path / "df3")
  assert convert(tmp_path / "df3", tmp_path / "jx4", "jax") == cfg


def test_dtype_cast_and_pipeline_dir(ckpt):
  tmp, cfg, params = ckpt
  convert(tmp / "jx", tmp / "pipe" / "transformer", "diffusers", dtype="float32")
  (tmp / "pipe" / "model_index.json").write_text("{}")
  assert detect_format(tmp / "pipe") == ("diffusers", str(tmp / "pipe" / "transformer"))
  convert(tmp / "pipe", tmp / "back", "jax", dtype="bfloat16")
  assert_trees_equal(pretrained.load_params(tmp / "back"), params)  # bf16 -> f32 -> bf16 is exact
  src = open_source(tmp / "pipe")
  assert all(src.original_dtype(k) == np.float32 for k in src.original_keys())


def test_in_memory_api_matches_torch(ckpt):
  _, cfg, params = ckpt
  model = diffusers_model(cfg)
  sd = params_to_state_dict(params, cfg, "diffusers", dtype="float32")
  model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
  cfg2, back = state_dict_to_params(model.state_dict(), diffusers_config=model.config, dtype=BF16)
  # diffusers drops our private '_sd3_jax' config fields; only the fresh-init table placement differs.
  assert cfg2 == dataclasses.replace(cfg, pos_embed_base_size=16, pos_embed_scale=1.0)
  assert_trees_equal(back, params)
  # torch bfloat16 tensors and the original layout
  bf = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
  _, back_bf = state_dict_to_params(bf, diffusers_config=model.config)
  assert_trees_equal(back_bf, params)
  sd3 = params_to_state_dict(params, cfg, "sd3")
  assert all(k.startswith(K.SD3_PREFIX) for k in sd3)
  assert_trees_equal(state_dict_to_params(sd3)[1], params)
  scanned = M.stack_block_params(jax.tree.map(jnp.asarray, params), cfg)
  assert params_to_state_dict(scanned, cfg, "sd3").keys() == sd3.keys()


# ---------------------------------------------------------------------------------------------
# The sd3 single file


def _write_sd3(path, tensors, metadata=None):
  safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), metadata=metadata)


def test_sd3_file_with_other_components_and_head_inference(tmp_path):
  cfg = M.MMDiTConfig(depth=2, **{**TINY, "hidden_size": 128, "num_heads": 2})  # head dim 64
  params = random_params(cfg, seed=3)
  sd = params_to_state_dict(params, cfg, "sd3")
  sd["first_stage_model.decoder.conv_in.weight"] = np.ones((2, 2), np.float32)
  sd["text_encoders.clip_l.transformer.x.weight"] = np.ones((3,), np.float32)
  _write_sd3(tmp_path / "full.safetensors", sd)  # no metadata: heads = hidden / 64 as the reference
  assert convert(tmp_path / "full.safetensors", tmp_path / "a", "jax") == cfg
  assert_trees_equal(pretrained.load_params(tmp_path / "a"), params)
  bare = {k[len(K.SD3_PREFIX) :]: v for k, v in sd.items() if k.startswith(K.SD3_PREFIX)}
  _write_sd3(tmp_path / "bare.safetensors", bare)
  assert open_source(tmp_path / "bare.safetensors").config == cfg
  # Tiny model without qk-norm and without metadata: the head count needs --num-heads.
  cfg4 = CONFIGS["plain"]
  _write_sd3(tmp_path / "tiny.safetensors", params_to_state_dict(random_params(cfg4), cfg4, "sd3"))
  with pytest.raises(ValueError, match="pass --num-heads"):
    open_source(tmp_path / "tiny.safetensors")
  assert open_source(tmp_path / "tiny.safetensors", num_heads=4).config == cfg4
  assert open_source(tmp_path / "tiny.safetensors", head_dim=8).config == cfg4
  with pytest.raises(ValueError, match="head_dim=5 does not divide"):
    open_source(tmp_path / "tiny.safetensors", head_dim=5)
  assert open_source(tmp_path / "tiny.safetensors", num_heads=2).config.num_heads == 2
  # Our own sd3 files carry the config, so the head count round-trips.
  convert(tmp_path / "a", tmp_path / "ours.safetensors", "sd3")
  with safe_open(str(tmp_path / "ours.safetensors"), "np") as f:
    assert json.loads(f.metadata()[formats.SD3_METADATA_KEY])["num_heads"] == 2


def test_qk_norm_head_inference_and_conflicts(tmp_path):
  cfg = CONFIGS["qk"]  # hidden 32, head dim 8 from ln_q
  _write_sd3(tmp_path / "m.safetensors", params_to_state_dict(random_params(cfg), cfg, "sd3"))
  assert open_source(tmp_path / "m.safetensors").config.num_heads == 4
  with pytest.raises(ValueError, match="conflicts with the qk-norm"):
    open_source(tmp_path / "m.safetensors", num_heads=2)


# ---------------------------------------------------------------------------------------------
# Errors


def test_shape_and_key_errors(tmp_path):
  cfg = CONFIGS["qk"]
  sd = params_to_state_dict(random_params(cfg), cfg, "sd3")
  p = K.SD3_PREFIX
  bad = dict(sd)
  bad[p + "joint_blocks.0.x_block.mlp.fc2.weight"] = sd[p + "joint_blocks.0.x_block.mlp.fc2.weight"].T
  del bad[p + "joint_blocks.1.x_block.attn.proj.bias"]
  bad[p + "joint_blocks.0.x_block.extra.weight"] = np.zeros(3, np.float32)
  _write_sd3(tmp_path / "bad.safetensors", bad)
  with pytest.raises(ValueError) as e:
    open_source(tmp_path / "bad.safetensors")
  msg = str(e.value)
  assert "joint_blocks.0.x_block.mlp.fc2.weight: found [128, 32], expected [32, 128]" in msg
  assert "missing (1): joint_blocks.1.x_block.attn.proj.bias" in msg
  assert "unexpected (1): joint_blocks.0.x_block.extra.weight" in msg
  # A diffusers config.json that disagrees with the tensors.
  formats.write_diffusers(formats.source_from_params(random_params(cfg), cfg), tmp_path / "df")
  cj = json.loads((tmp_path / "df" / "config.json").read_text())
  (tmp_path / "df" / "config.json").write_text(json.dumps({**cj, "num_layers": 5}))
  with pytest.raises(ValueError, match="depth=5"):
    open_source(tmp_path / "df")
  (tmp_path / "df" / "config.json").write_text(json.dumps({**cj, "qk_norm": None}))
  with pytest.raises(ValueError, match="qk_norm=False"):
    open_source(tmp_path / "df")


def test_jax_checkpoint_errors(ckpt):
  tmp, cfg, params = ckpt
  (tmp / "empty").mkdir()
  with pytest.raises(ValueError, match="not an sd3_jax checkpoint"):
    pretrained.load_pretrained(tmp / "empty")
  with pytest.raises(FileNotFoundError):
    pretrained.load_pretrained(tmp / "nope")
  convert(tmp / "jx", tmp / "df", "diffusers")
  with pytest.raises(ValueError, match="looks like a diffusers model"):
    pretrained.load_pretrained(tmp / "df")
  (tmp / "half").mkdir()
  (tmp / "half" / pretrained.CONFIG_FILE).write_text("{}")
  with pytest.raises(ValueError, match="not a complete sd3_jax checkpoint"):
    pretrained.load_pretrained(tmp / "half")
  # A stored config that does not match the tensors.
  meta = json.loads((tmp / "jx" / pretrained.CONFIG_FILE).read_text())
  meta["config"]["mlp_ratio"] = 2
  (tmp / "jx" / pretrained.CONFIG_FILE).write_text(json.dumps(meta))
  with pytest.raises(ValueError, match=r"mlp/fc1/kernel: found \[32, 128\], expected \[32, 64\]"):
    pretrained.load_pretrained(tmp / "jx")
  with pytest.raises(ValueError, match="cannot tell the format"):
    detect_format(tmp / "empty")
  with pytest.raises(FileExistsError):
    convert(tmp / "df", tmp / "jx", "jax")
  (tmp / "empty" / "notes.txt").write_text("keep me")
  with pytest.raises(FileExistsError, match="refusing to overwrite"):
    convert(tmp / "df", tmp / "empty", "jax", overwrite=True)
  with pytest.raises(FileExistsError, match="refusing to overwrite"):
    convert(tmp / "df", tmp / "empty", "diffusers", overwrite=True)
  assert (tmp / "empty" / "notes.txt").exists()


# ---------------------------------------------------------------------------------------------
# load_pretrained


def test_load_pretrained_options(ckpt):
  tmp, cfg, params = ckpt
  model, p32 = pretrained.load_pretrained(tmp / "jx")
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(p32)) and model.config == cfg
  _, pbf = pretrained.load_pretrained(tmp / "jx", param_dtype=None)
  assert_trees_equal(jax.tree.map(np.asarray, pbf), params)
  smodel, ps = pretrained.load_pretrained(
    tmp / "jx", scan_layers=True, dtype=jnp.bfloat16, shardings=jax.sharding.SingleDeviceSharding(jax.devices()[0])
  )
  assert smodel.scan_layers and smodel.dtype == jnp.bfloat16
  assert jax.tree.structure(ps) == jax.tree.structure(M.stack_block_params(p32, cfg))
  assert_trees_equal(jax.tree.map(np.asarray, M.unstack_block_params(ps, cfg)), jax.tree.map(np.asarray, p32))
  # A tree of shardings: replicated over the 8 fake devices, one stacked kernel split over them.
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("fsdp",))
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  tree = jax.tree.map(lambda _: rep, ps)
  tree["scan_blocks_1_2"]["x_block"]["mlp"]["fc1"]["kernel"] = jax.sharding.NamedSharding(
    mesh, jax.sharding.PartitionSpec(None, None, "fsdp")
  )
  _, pt = pretrained.load_pretrained(tmp / "jx", scan_layers=True, shardings=tree)
  fc1 = ("scan_blocks_1_2", "x_block", "mlp", "fc1", "kernel")
  assert trees.flatten(pt)["/".join(fc1)].sharding == trees.flatten(tree)["/".join(fc1)]
  assert_trees_equal(jax.tree.map(np.asarray, pt), jax.tree.map(np.asarray, ps))


# ---------------------------------------------------------------------------------------------
# Streaming


def test_sources_read_each_tensor_once(tmp_path, monkeypatch):
  cfg = CONFIGS["dual"]
  params = random_params(cfg, seed=4)
  pretrained.save_pretrained(tmp_path / "jx", params, cfg)
  groups = []
  real = pretrained.load_params
  monkeypatch.setattr(pretrained, "load_params", lambda p, g=None, **kw: groups.append(tuple(g)) or real(p, g, **kw))
  convert(tmp_path / "jx", tmp_path / "m.safetensors", "sd3")
  assert sorted(groups) == sorted((g,) for g in params)  # one top-level group at a time, once each
  monkeypatch.setattr(pretrained, "load_params", real)
  reads = []
  real_read = safetensors_io.SafetensorsReader.read
  monkeypatch.setattr(safetensors_io.SafetensorsReader, "read", lambda self, n: reads.append(n) or real_read(self, n))
  convert(tmp_path / "m.safetensors", tmp_path / "df", "diffusers", max_shard_size="5KB")
  n_tensors = len(K.entries(cfg, "sd3"))
  assert len(reads) == len(set(reads)) == n_tensors  # qkv read once for its three chunks
  reads.clear()
  convert(tmp_path / "df", tmp_path / "m2.safetensors", "sd3")
  assert len(reads) == len(set(reads)) == len(K.entries(cfg, "diffusers"))
  reads.clear()
  convert(tmp_path / "m2.safetensors", tmp_path / "jx2", "jax")
  assert len(reads) == len(set(reads)) == n_tensors
  assert_trees_equal(pretrained.load_params(tmp_path / "jx2"), params)


def test_safetensors_io_interoperates(tmp_path):
  rng = np.random.default_rng(0)
  t = {
    "a": rng.standard_normal((3, 5)).astype(BF16),
    "b": np.arange(7, dtype=np.float16),
    "c": rng.standard_normal((2, 2, 2)).astype(np.float32),
  }
  specs = [(k, v.dtype, v.shape) for k, v in t.items()]
  with safetensors_io.SafetensorsWriter(tmp_path / "x.safetensors", specs, {"k": "v"}) as w:
    for k, v in t.items():
      w.write(k, v)
  with safe_open(str(tmp_path / "x.safetensors"), "np") as f:
    assert f.metadata() == {"k": "v"}
    for k, v in t.items():
      assert np.array_equal(f.get_tensor(k).view(np.uint8), v.view(np.uint8))
  safetensors.numpy.save_file(t, str(tmp_path / "y.safetensors"))
  r = safetensors_io.SafetensorsReader(tmp_path / "y.safetensors")
  for k, v in t.items():
    assert r.dtype(k) == v.dtype and np.array_equal(r.read(k).view(np.uint8), v.view(np.uint8))
  w = safetensors_io.SafetensorsWriter(tmp_path / "z.safetensors", [("a", np.float32, (2,))])
  with pytest.raises(ValueError, match="header says float32"):
    w.write("a", np.zeros(3, np.float32))
  assert [len(s) for s in safetensors_io.plan_shards([("a", np.float32, (4,))] * 5, 33)] == [2, 2, 1]


# ---------------------------------------------------------------------------------------------
# CLI


def test_cli(ckpt, capsys):
  tmp, cfg, params = ckpt
  assert (
    cli_main(["--src", str(tmp / "jx"), "--dst", str(tmp / "m.safetensors"), "--to", "sd3", "--dtype", "float32"]) == 0
  )
  assert "depth 3" in capsys.readouterr().out
  assert cli_main(["--src", str(tmp / "m.safetensors"), "--dst", str(tmp / "jx"), "--to", "jax"]) == 2
  assert "exists; pass --overwrite" in capsys.readouterr().err
  assert (
    cli_main(
      [
        "--src",
        str(tmp / "m.safetensors"),
        "--dst",
        str(tmp / "jx"),
        "--to",
        "jax",
        "--overwrite",
        "--dtype",
        "bfloat16",
        "--head-dim",
        "8",
      ]
    )
    == 0
  )
  assert_trees_equal(pretrained.load_params(tmp / "jx"), params)
  out = subprocess.run(
    [sys.executable, "-m", "tools.convert_weights", "--help"],
    capture_output=True,
    text=True,
    cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
  )
  assert out.returncode == 0 and "--num-heads" in out.stdout and "pipeline" in out.stdout
