"""Crafted and damaged weight files through the converter (``sd3-convert``), under a memory limit.

Built at test time from a tiny valid MM-DiT: an original single .safetensors file, a diffusers
directory and our own checkpoint, then damaged one way per case (header lies, duplicates,
aliasing, a relabelled dtype, a pos_embed claiming a 4096x4096 grid, bad configs, flipped bytes).
All cases run in ONE subprocess with RLIMIT_AS = 4 GiB (the 4096-grid case would need ~6 GiB for
its sin-cos table if anything were allocated from the header before checking the file). Each
case must exit 2 with one line naming the file, the tensor or field and the problem, and leave
the existing output at --dst (replaced only with --overwrite on success) byte for byte as it was.
``SD3_FUZZ_SHOW=1 pytest -s`` prints every case's message.
"""

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

from sd3_jax.storage import pretrained
from sd3_jax.storage import trees
from sd3_jax.convert import formats
from sd3_jax.models import mmdit as M

MEMORY_LIMIT = 4 * 2**30
CFG = M.MMDiTConfig(
  depth=2,
  hidden_size=32,
  num_heads=4,
  in_channels=4,
  out_channels=4,
  pooled_dim=16,
  context_dim=24,
  pos_embed_max_size=8,
)
PRE = "model.diffusion_model."

DRIVER = r"""
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[2]), int(sys.argv[2])))  # before any import
import contextlib, io, json, traceback
from sd3_jax.convert.cli import main
results = {}
for name, argv in json.loads(sys.argv[1]):
  err = io.StringIO()
  try:
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
      rc = main(argv)
  except BaseException as e:  # a crash is a failure of the case, reported with its traceback
    rc, err = -1, io.StringIO(traceback.format_exc())
  results[name] = {"rc": rc, "stderr": err.getvalue()}
print("RESULTS" + json.dumps(results))
"""


def _read_st(path):
  raw = open(path, "rb").read()
  (n,) = struct.unpack("<Q", raw[:8])
  return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _write_st(path, header=None, data=b"", raw_header=None, length=None):
  raw = raw_header if raw_header is not None else json.dumps(header).encode()
  raw += b" " * (-len(raw) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
  return str(path)


def _tree_digest(path):
  h = hashlib.sha256()
  if os.path.isfile(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()
  for root, dirs, files in sorted(os.walk(path)):
    dirs.sort()
    for f in sorted(files):
      p = os.path.join(root, f)
      h.update(os.path.relpath(p, path).encode() + open(p, "rb").read())
  return h.hexdigest()


def _largest_data_file(ckpt):
  files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(ckpt, "params")) for f in fs if os.sep + "d" in r]
  return max(files, key=os.path.getsize)


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
  """A valid original file, diffusers directory and jax checkpoint of the same tiny model."""
  d = tmp_path_factory.mktemp("valid")
  rng = np.random.default_rng(0)
  flat = {k: (0.05 * rng.standard_normal(s)).astype(np.float32) for k, s in pretrained.expected_shapes(CFG).items()}
  src = formats.source_from_params(trees.unflatten(flat), CFG)
  formats.write_sd3(src, d / "m.safetensors")
  formats.write_diffusers(src, d / "df")
  pretrained.save_pretrained(d / "jax", trees.unflatten(flat), CFG)
  return d


def _cases(valid, d):
  """name -> (src, to, [substrings the one-line error must contain])."""
  header, data = _read_st(valid / "m.safetensors")
  a, b = PRE + "joint_blocks.0.x_block.mlp.fc2.bias", PRE + "joint_blocks.1.x_block.mlp.fc2.bias"
  pos = PRE + "pos_embed"

  def st(name, mutate=None, **kw):
    h = json.loads(json.dumps(header))
    if mutate:
      mutate(h)
    return _write_st(d / f"{name}.safetensors", h, kw.pop("data", data), **kw)

  def entry(name, **kv):
    return lambda h: h[name].update(kv)

  def shifted(h):
    s, e = h[a]["data_offsets"]
    h[a]["data_offsets"] = [s + 4, e + 4]

  def huge_grid(h):
    s = h[pos]["data_offsets"][0]
    h[pos]["shape"] = [1, 4096 * 4096, 32]
    h[pos]["data_offsets"] = [s, s + 4096 * 4096 * 32 * 4]

  def meta(value):
    return lambda h: h["__metadata__"].update({formats.SD3_METADATA_KEY: value})

  cfg = dict(CFG.to_dict())
  dup = json.dumps(header)[:-1] + f', "{a}": ' + json.dumps(header[a]) + "}"
  (d / "empty_file.safetensors").write_bytes(b"")
  cases = {
    "empty_file": (str(d / "empty_file.safetensors"), ["shorter than 8 bytes"]),
    "header_length_past_end": (st("header_length_past_end", length=10**6), ["header claims 1000000 bytes"]),
    "header_length_huge": (st("header_length_huge", length=2**40), ["header claims"]),
    "header_not_json": (st("header_not_json", raw_header=b"{not json"), ["not JSON"]),
    "header_is_list": (st("header_is_list", raw_header=b"[1, 2]"), ["JSON list"]),
    "header_is_number": (st("header_is_number", raw_header=b"7"), ["JSON int"]),
    "entry_is_string": (st("entry_is_string", lambda h: h.update({a: "x"})), [a, "not an object"]),
    "missing_data_offsets": (st("missing_data_offsets", lambda h: h[a].pop("data_offsets")), [a, "data_offsets"]),
    "string_shape": (st("string_shape", entry(a, shape=["32"])), [a, "shape"]),
    "negative_shape": (st("negative_shape", entry(a, shape=[-32])), [a, "non-negative"]),
    "unknown_dtype": (st("unknown_dtype", entry(a, dtype="F31")), [a, "unsupported dtype 'F31'"]),
    "duplicate_name": (st("duplicate_name", raw_header=dup.encode()), [a, "appears twice"]),
    "aliased_offsets": (st("aliased_offsets", entry(b, data_offsets=header[a]["data_offsets"])), ["overlap"]),
    "offsets_shifted_4": (st("offsets_shifted_4", shifted), [a, "data_offsets"]),
    "size_mismatch": (st("size_mismatch", entry(a, shape=[16])), [a, "needs 64"]),
    "truncated": (st("truncated", data=data[:-100]), ["truncated"]),
    "trailing_bytes": (st("trailing_bytes", data=data + b"\0" * 8), ["trailing data"]),
    "float_offsets": (
      st("float_offsets", entry(a, data_offsets=[float(o) for o in header[a]["data_offsets"]])),
      [a, "data_offsets"],
    ),
    "metadata_not_strings": (
      st("metadata_not_strings", lambda h: h["__metadata__"].update({"x": 1})),
      ["__metadata__"],
    ),
    "relabelled_f32_as_i32": (
      st("relabelled_f32_as_i32", entry(a, dtype="I32")),
      ["joint_blocks.0.x_block.mlp.fc2.bias", "int32", "floating point"],
    ),
    "pos_embed_4096_grid": (st("pos_embed_4096_grid", huge_grid), [pos, "run past the end"]),
    "metadata_config_not_json": (st("metadata_config_not_json", meta("{")), ["sd3_jax_config metadata"]),
    "metadata_qk_norm_string": (
      st("metadata_qk_norm_string", meta(json.dumps({**cfg, "qk_norm": "false"}))),
      ["qk_norm='false'"],
    ),
    "metadata_zero_scale": (
      st("metadata_zero_scale", meta(json.dumps({**cfg, "pos_embed_scale": 0}))),
      ["pos_embed_scale must be > 0"],
    ),
  }
  cases = {k: (src, "jax", want) for k, (src, want) in cases.items()}

  def df(name, config=None, index=None):
    p = d / name
    shutil.copytree(valid / "df", p)
    if config is not None:
      (p / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    if index is not None:
      (p / formats.DIFFUSERS_INDEX).write_text(json.dumps(index))
    return str(p)

  dcfg = json.loads((valid / "df" / "config.json").read_text())
  cases.update(
    {
      "diffusers_heads_string": (
        df("diffusers_heads_string", {**dcfg, "num_attention_heads": "4"}),
        "jax",
        ["num_attention_heads must be a positive integer"],
      ),
      "diffusers_layers_zero": (
        df("diffusers_layers_zero", {**dcfg, "num_layers": 0}),
        "jax",
        ["num_layers must be a positive integer"],
      ),
      "diffusers_qk_norm_string": (
        df("diffusers_qk_norm_string", {**dcfg, "qk_norm": "false"}),
        "jax",
        ["qk_norm='false'"],
      ),
      "diffusers_config_list": (df("diffusers_config_list", "[]"), "jax", ["config.json", "JSON object"]),
      "diffusers_index_bad_map": (df("diffusers_index_bad_map", index={"weight_map": ["x"]}), "jax", ["weight_map"]),
      "diffusers_index_escapes": (
        df("diffusers_index_escapes", index={"weight_map": {a: "../m.safetensors"}}),
        "jax",
        ["weight_map"],
      ),
    }
  )

  def jx(name, edit=None, flip=False):
    p = d / name
    shutil.copytree(valid / "jax", p)
    if edit is not None:
      meta_path = p / pretrained.CONFIG_FILE
      m = json.loads(meta_path.read_text())
      edit(m)
      meta_path.write_text(json.dumps(m))
    if flip:
      data_file = _largest_data_file(p)
      raw = bytearray(open(data_file, "rb").read())
      mid = len(raw) // 2
      raw[mid : mid + 64] = bytes(x ^ 0xFF for x in raw[mid : mid + 64])
      open(data_file, "wb").write(raw)
    return str(p)

  cases.update(
    {
      "jax_grid_4096": (
        jx("jax_grid_4096", lambda m: m["config"].update(pos_embed_max_size=4096)),
        "sd3",
        ["pos_embed is stored as (1, 64, 32)", "needs [1, 16777216, 32]"],
      ),
      "jax_qk_norm_string": (
        jx("jax_qk_norm_string", lambda m: m["config"].update(qk_norm="false")),
        "sd3",
        ["MMDiTConfig.qk_norm must be true or false"],
      ),
      "jax_heads_zero": (
        jx("jax_heads_zero", lambda m: m["config"].update(num_heads=0)),
        "sd3",
        ["MMDiTConfig.num_heads must be >= 1"],
      ),
      "jax_depth_string": (
        jx("jax_depth_string", lambda m: m["config"].update(depth="2")),
        "sd3",
        ["MMDiTConfig.depth must be an integer"],
      ),
      "jax_checksums_not_map": (jx("jax_checksums_not_map", lambda m: m.update(checksums=[1])), "sd3", ["checksums"]),
      "jax_flipped_bytes": (jx("jax_flipped_bytes", flip=True), "sd3", ["damaged parameter(s) ['"]),
    }
  )
  return cases


def _run_driver(cases_argv):
  # The driver sets RLIMIT_AS itself, first thing (a preexec_fn would fork this multithreaded
  # JAX process).
  env = dict(os.environ, MALLOC_ARENA_MAX="2", JAX_PLATFORMS="cpu")
  p = subprocess.run(
    [sys.executable, "-c", DRIVER, json.dumps(cases_argv), str(MEMORY_LIMIT)],
    capture_output=True,
    text=True,
    env=env,
    timeout=900,
  )
  assert p.returncode == 0 and "RESULTS" in p.stdout, p.stdout[-3000:] + p.stderr[-3000:]
  return json.loads(p.stdout.split("RESULTS", 1)[1])


def test_crafted_weight_files_are_refused_with_bounded_memory(valid, tmp_path):
  cases = _cases(valid, tmp_path)
  out = tmp_path / "out"
  out.mkdir()
  argv, before = [], {}
  for name, (src, to, _) in cases.items():
    dst = out / (name + (".safetensors" if to == "sd3" else ""))
    if to == "sd3":
      shutil.copy(valid / "m.safetensors", dst)  # an existing output that must survive
    else:
      shutil.copytree(valid / "jax", dst)
    before[name] = _tree_digest(dst)
    argv.append((name, ["--src", src, "--dst", str(dst), "--to", to, "--overwrite"]))
  # Controls: the same limit lets valid inputs convert, and --no-verify accepts the flipped bytes.
  argv.append(("control_sd3", ["--src", str(valid / "m.safetensors"), "--dst", str(out / "ok"), "--to", "jax"]))
  argv.append(
    (
      "control_no_verify",
      ["--src", cases["jax_flipped_bytes"][0], "--dst", str(out / "ok.safetensors"), "--to", "sd3", "--no-verify"],
    )
  )
  results = _run_driver(argv)
  if os.environ.get("SD3_FUZZ_SHOW"):
    print("\n".join(f"{k}: {v['rc']} {v['stderr'].strip()}" for k, v in results.items()))
  failures = []
  for name, (src, to, want) in cases.items():
    r = results[name]
    err = r["stderr"].strip()
    ok = (
      r["rc"] == 2
      and err.startswith("sd3-convert: error: ")
      and "\n" not in err
      and all(w in err for w in want)
      and os.path.basename(src) in err  # names the file or directory
      and _tree_digest(out / (name + (".safetensors" if to == "sd3" else ""))) == before[name]
    )
    if not ok:
      failures.append(f"{name}: rc={r['rc']} want {want}: {err[:600]}")
  assert not failures, "\n".join(failures)
  assert results["control_sd3"]["rc"] == 0, results["control_sd3"]
  assert results["control_no_verify"]["rc"] == 0, results["control_no_verify"]
  m = results["jax_flipped_bytes"]["stderr"]
  leaf = m.split("damaged parameter(s) ['", 1)[1].split("'", 1)[0]
  assert leaf in pretrained.stored_params(valid / "jax")  # the error names a real leaf
  # The counts quoted in docs/bad_input.md.
  assert len(cases) == 36
