"""Reading and writing the checkpoint formats, one tensor at a time.

MM-DiT:
  jax        our directory (sd3_jax/pretrained.py): sd3_jax_config.json + params/ (orbax).
  sd3        one original .safetensors file, keys ``model.diffusion_model.*`` (other components
             of the file, ``first_stage_model.*`` and ``text_encoders.*``, are ignored).
  diffusers  a SD3Transformer2DModel directory: config.json + diffusion_pytorch_model.safetensors
             or shards with diffusion_pytorch_model.safetensors.index.json; a pipeline
             directory with transformer/ is accepted as a source.
VAE and text encoders: ``encoders.py``, with the same detection and directory helpers.

A ``Source`` validates every tensor name and shape against the inferred configuration on
opening and then hands out ORIGINAL-layout tensors by original key (``read_original``); the
writers pull those in order, convert each (mmdit_keys) and write it out before reading the
next, so memory stays at a few tensors (a jax source reads one block's group at a time).
"""

from __future__ import annotations

import json
import os
import threading
from typing import Callable, Mapping

import numpy as np

from sd3_jax.storage import fileutil, integrity, pretrained
from sd3_jax.storage import trees
from sd3_jax.models import mup
from sd3_jax.models.mmdit import MMDiTConfig
from sd3_jax.convert import mmdit_keys as K
from sd3_jax.convert import text_keys as TK
from sd3_jax.convert.safetensors_io import (
  SafetensorsReader,
  SafetensorsWriter,
  as_numpy,
  check_float_dtypes,
  plan_shards,
)

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
TRANSFORMERS_WEIGHTS = "model.safetensors"
TRANSFORMERS_INDEX = "model.safetensors.index.json"
SD3_METADATA_KEY = "sd3_jax_config"
DEFAULT_MAX_SHARD_BYTES = 10 * 10**9  # diffusers' save_pretrained default, "10GB"


# ---------------------------------------------------------------------------------------------
# Detection


def read_json(path: str, what: str) -> dict:
  try:
    with open(path) as f:
      d = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from None
  if not isinstance(d, dict):
    raise ValueError(f"{path}: expected a JSON object ({what})")
  return d


def detect_format(path) -> tuple[str, str]:
  """(format, resolved path) of a checkpoint: 'jax', 'sd3', 'diffusers' (an MM-DiT or a VAE)
  or 'transformers' (a text encoder); a pipeline directory resolves to transformer/."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"no such file or directory: {path}")
  if os.path.isfile(path):
    if path.endswith(".safetensors"):
      return "sd3", path
    raise ValueError(
      f"{path}: a single-file checkpoint must be a .safetensors file (pickled .ckpt/.pt files are not read)"
    )
  if pretrained.is_checkpoint(path):
    return "jax", path
  if os.path.isfile(os.path.join(path, "config.json")):
    names = os.listdir(path)
    if DIFFUSERS_WEIGHTS in names or DIFFUSERS_INDEX in names:
      return "diffusers", path
    hf = read_json(os.path.join(path, "config.json"), "a model config")
    if TK.model_kind(hf) is not None:
      if TRANSFORMERS_WEIGHTS in names or TRANSFORMERS_INDEX in names:
        return "transformers", path
      raise ValueError(
        f"{path} is a transformers {hf.get('model_type')} model without "
        f"{TRANSFORMERS_WEIGHTS} or {TRANSFORMERS_INDEX} (found "
        f"{sorted(n for n in names if n.startswith(('model', 'pytorch_model')))}); only "
        "safetensors weights are read"
      )
    raise ValueError(
      f"{path} has a config.json but no {DIFFUSERS_WEIGHTS} or {DIFFUSERS_INDEX} "
      f"(found {sorted(n for n in names if n.startswith('diffusion_pytorch_model'))}), "
      "and it is not a CLIP text model or T5 encoder; only unsuffixed safetensors "
      "weights are read"
    )
  sub = os.path.join(path, "transformer")
  if os.path.isdir(sub):
    return detect_format(sub)
  raise ValueError(
    f"cannot tell the format of {path}: expected an sd3_jax checkpoint directory "
    f"({pretrained.CONFIG_FILE}), a diffusers model directory (config.json + "
    f"{DIFFUSERS_WEIGHTS}), a diffusers pipeline (transformer/), a transformers text "
    f"encoder directory (config.json + {TRANSFORMERS_WEIGHTS}), or a .safetensors file"
  )


def detect_model(path) -> tuple[str, str, str]:
  """(model kind, format, resolved path); kind is 'mmdit', 'vae', 'clip_text' or 't5_encoder'."""
  fmt, path = detect_format(path)
  if fmt == "jax":
    name = pretrained.read_format(path).name
    return name.split(".", 1)[1], fmt, path
  if fmt == "transformers":
    return TK.model_kind(read_json(os.path.join(path, "config.json"), "a model config")), fmt, path
  if fmt == "diffusers":
    cfg = read_json(os.path.join(path, "config.json"), "a diffusers config")
    if cfg.get("_class_name") == "AutoencoderKL":
      return "vae", fmt, path
  return "mmdit", fmt, path


# ---------------------------------------------------------------------------------------------
# Sources


class Source:
  """Native tensors of one format plus the inferred config; serves original-layout tensors."""

  def __init__(
    self,
    fmt: str,
    config: MMDiTConfig,
    shapes: Mapping[str, tuple],
    dtypes: Mapping[str, np.dtype],
    read: Callable[[str], np.ndarray],
    description: str,
  ):
    self.format, self.config, self.description = fmt, config, description
    K.require_mmdit(config, description)
    self.entries = K.entries(config, fmt)
    trees.check_shapes(shapes, {e.name: e.shape for e in self.entries}, description)
    check_float_dtypes(dtypes, description)
    self._dtypes, self._read = dict(dtypes), read
    self.by_orig: dict[str, list[K.Entry]] = {}
    for e in self.entries:
      self.by_orig.setdefault(e.orig, []).append(e)

  def original_keys(self) -> list[str]:
    return list(self.by_orig)

  def original_dtype(self, key: str) -> np.dtype:
    return np.result_type(*[self._dtypes[e.name] for e in self.by_orig[key]])

  def read_original(self, key: str) -> np.ndarray:
    es = self.by_orig[key]
    return K.to_original(es, [self._read(e.name) for e in es])


def _sd3_prefix(keys, source: str) -> str:
  if any(k.startswith(K.SD3_PREFIX) for k in keys):
    return K.SD3_PREFIX
  if "x_embedder.proj.weight" in keys:
    return ""  # a bare MM-DiT state dict
  if "pos_embed.proj.weight" in keys or any(k.startswith("transformer_blocks.") for k in keys):
    raise ValueError(
      f"{source} holds diffusers key names; pass the diffusers model directory (config.json + safetensors) instead"
    )
  raise ValueError(f"{source} holds no MM-DiT tensors ({K.SD3_PREFIX}*)")


def _sd3_native(keys, prefix: str) -> dict[str, str]:
  """Original key (no prefix) -> stored name; other components are dropped, anything else is
  kept under its full name so that validation reports it as unexpected."""
  out = {}
  for k in keys:
    if prefix and k.startswith(prefix):
      name = k[len(prefix) :]
    elif not k.startswith(K.SD3_OTHER_PREFIXES):
      name = k
    else:
      continue
    if name in out:
      raise ValueError(f"tensor {name!r} is stored both as {out[name]!r} and as {k!r}")
    out[name] = k
  return out


def open_sd3(path, *, num_heads: int | None = None, head_dim: int | None = None) -> Source:
  reader = SafetensorsReader(path)
  desc = f"sd3 checkpoint {path}"
  prefix = _sd3_prefix(reader.keys(), desc)
  names = _sd3_native(reader.keys(), prefix)
  hints = {}
  if SD3_METADATA_KEY in reader.metadata:
    try:
      hints = json.loads(reader.metadata[SD3_METADATA_KEY])
    except json.JSONDecodeError as e:
      raise ValueError(f"{desc}: bad {SD3_METADATA_KEY} metadata: {e}") from None
    if not isinstance(hints, dict):
      raise ValueError(f"{desc}: {SD3_METADATA_KEY} metadata must be a JSON object, got {str(hints)[:100]}")
  shapes = {k: reader.shape(v) for k, v in names.items()}
  config = K.infer_config(shapes, "sd3", num_heads=num_heads, head_dim=head_dim, hints=hints, source=desc)
  return Source(
    "sd3", config, shapes, {k: reader.dtype(v) for k, v in names.items()}, lambda k: reader.read(names[k]), desc
  )


def open_weights_dir(path: str, single: str, index_name: str, desc: str) -> dict[str, SafetensorsReader]:
  """Tensor name -> reader for a huggingface weights directory (one file, or shards + index)."""
  index = os.path.join(path, index_name)
  if os.path.isfile(index):
    weight_map = read_json(index, "a safetensors index").get("weight_map")
    if not isinstance(weight_map, dict) or not all(
      isinstance(v, str) and v and os.path.basename(v) == v for v in weight_map.values()
    ):
      raise ValueError(
        f'{index}: "weight_map" must map tensor names to shard file names in {path}, got {str(weight_map)[:200]}'
      )
    readers = {fn: SafetensorsReader(os.path.join(path, fn)) for fn in sorted(set(weight_map.values()))}
    where = {}
    for fn, r in readers.items():
      for k in r.keys():
        if weight_map.get(k) != fn:
          raise ValueError(f"{desc}: tensor {k!r} is in {fn} but the index says {weight_map.get(k)}")
        where[k] = r
    missing = sorted(set(weight_map) - set(where))
    if missing:
      raise ValueError(f"{desc}: the index lists tensors that no shard holds: {missing[:10]}")
  else:
    r = SafetensorsReader(os.path.join(path, single))
    where = {k: r for k in r.keys()}
  return where


def open_diffusers(path, *, num_heads: int | None = None, head_dim: int | None = None) -> Source:
  desc = f"diffusers model {path}"
  cfg_path = os.path.join(path, "config.json")
  hints = K.hints_from_diffusers_config(read_json(cfg_path, "a diffusers config"), cfg_path)
  where = open_weights_dir(path, DIFFUSERS_WEIGHTS, DIFFUSERS_INDEX, desc)
  shapes = {k: r.shape(k) for k, r in where.items()}
  config = K.infer_config(shapes, "diffusers", num_heads=num_heads, head_dim=head_dim, hints=hints, source=desc)
  return Source(
    "diffusers", config, shapes, {k: r.dtype(k) for k, r in where.items()}, lambda k: where[k].read(k), desc
  )


def group_reader(path, verify: bool = True) -> Callable[[str], np.ndarray]:
  """Reads flat parameter names from our checkpoint, holding one top-level group at a time;
  verify: check each group against the checksums written with it."""
  sums = pretrained.read_checksums(path) if verify else None
  cache: dict = {"group": None, "leaves": {}}
  lock = threading.Lock()

  def read(name):
    group = name.split("/")[0]
    with lock:  # one top-level group (e.g. one joint block) in memory at a time
      if cache["group"] != group:
        cache["leaves"] = {}
        cache["leaves"] = trees.flatten(pretrained.load_params(path, [group], verify=verify, checksums=sums))
        cache["group"] = group
      return cache["leaves"][name]

  return read


def open_jax(path, verify: bool = True) -> Source:
  config = pretrained.read_config(path)
  stored = pretrained.stored_params(path)
  integrity.check_stored_grid(config, stored, path)
  read = group_reader(path, verify)
  return Source(
    "jax",
    config,
    {k: v[0] for k, v in stored.items()},
    {k: v[1] for k, v in stored.items()},
    read,
    f"sd3_jax checkpoint {path}",
  )


def open_source(path, *, num_heads: int | None = None, head_dim: int | None = None, verify: bool = True) -> Source:
  """Opens any of the three formats (detected automatically) and validates it.

  num_heads / head_dim: only needed for original files without qk-norm (and without our
  metadata) whose head dim is not 64; checked against the checkpoint otherwise. verify: our
  format only, check every leaf read against its checksum."""
  fmt, path = detect_format(path)
  if fmt == "jax":
    cfg = pretrained.read_config(path)
    if (num_heads is not None and num_heads != cfg.num_heads) or (head_dim is not None and head_dim != cfg.head_dim):
      raise ValueError(
        f"num_heads={num_heads} / head_dim={head_dim} conflict with {path} "
        f"(num_heads={cfg.num_heads}, head_dim={cfg.head_dim})"
      )
    return open_jax(path, verify)
  opener = open_sd3 if fmt == "sd3" else open_diffusers
  return opener(path, num_heads=num_heads, head_dim=head_dim)


def source_from_state_dict(
  state_dict: Mapping, *, num_heads: int | None = None, diffusers_config: Mapping | None = None
) -> Source:
  """An in-memory 'sd3' (prefixed or bare original keys) or 'diffusers' state dict as a Source."""
  arrays = {k: as_numpy(v) for k, v in state_dict.items()}
  if any(k.startswith("transformer_blocks.") for k in arrays):
    hints = K.hints_from_diffusers_config(diffusers_config, "diffusers config") if diffusers_config else {}
    config = K.infer_config(
      {k: a.shape for k, a in arrays.items()},
      "diffusers",
      num_heads=num_heads,
      hints=hints,
      source="diffusers state dict",
    )
    return Source(
      "diffusers",
      config,
      {k: a.shape for k, a in arrays.items()},
      {k: a.dtype for k, a in arrays.items()},
      arrays.__getitem__,
      "diffusers state dict",
    )
  names = _sd3_native(arrays, _sd3_prefix(arrays, "state dict"))
  shapes = {k: arrays[v].shape for k, v in names.items()}
  config = K.infer_config(shapes, "sd3", num_heads=num_heads, source="sd3 state dict")
  return Source(
    "sd3", config, shapes, {k: arrays[v].dtype for k, v in names.items()}, lambda k: arrays[names[k]], "sd3 state dict"
  )


def source_from_params(params: Mapping, config: MMDiTConfig) -> Source:
  """In-memory parameters (unscanned or scanned layout) as a 'jax' Source."""
  from sd3_jax.models import mmdit

  if any(k.startswith("scan_blocks_") for k in params):
    params = mmdit.unstack_block_params(params, config)
  flat = {k: as_numpy(v) for k, v in trees.flatten(params).items()}
  return Source(
    "jax",
    config,
    {k: a.shape for k, a in flat.items()},
    {k: a.dtype for k, a in flat.items()},
    flat.__getitem__,
    "parameters",
  )


# ---------------------------------------------------------------------------------------------
# Writing


class _Originals:
  """Original tensors in request order, keeping the last one (q, k, v chunks share it)."""

  def __init__(self, source: Source):
    self._source, self._key, self._value = source, None, None
    self._lock = threading.Lock()

  def __call__(self, key: str) -> np.ndarray:
    with self._lock:
      if key != self._key:
        self._key, self._value = None, None
        self._value = self._source.read_original(key)
        self._key = key
      return self._value


def _out_dtype(source: Source, e: K.Entry, dtype) -> np.dtype:
  return np.dtype(dtype) if dtype is not None else source.original_dtype(e.orig)


def iter_native(source: Source, fmt: str, dtype=None):
  """Yields (entry, array) for every tensor of ``fmt``, converted one at a time."""
  mup.check_exportable(source.config, fmt)  # before the first tensor, not at it
  originals = _Originals(source)
  return (
    (e, K.to_native(e, originals(e.orig)).astype(_out_dtype(source, e, dtype), copy=False))
    for e in K.entries(source.config, fmt)
  )


def check_dst(dst: str, overwrite: bool, is_ours: Callable[[str], bool], kind: str) -> None:
  """An existing output is replaced only with overwrite, and only if it is of the same kind."""
  if not os.path.exists(dst):
    return
  if not overwrite:
    raise FileExistsError(f"{dst} exists; pass --overwrite (overwrite=True) to replace it")
  if kind == "file":
    if not os.path.isfile(dst):
      raise FileExistsError(f"refusing to overwrite {dst}: it is not a file")
  elif not os.path.isdir(dst) or (os.listdir(dst) and not is_ours(dst)):
    raise FileExistsError(f"refusing to overwrite {dst}: it is not a {kind}")


def write_sd3(source: Source, dst, *, dtype=None, overwrite: bool = False) -> None:
  """One original single file with ``model.diffusion_model.`` keys (config in its metadata)."""
  mup.check_exportable(source.config, "sd3")
  dst = os.fspath(dst)
  if os.path.isdir(dst):
    raise IsADirectoryError(f"{dst} is a directory; --to sd3 writes one .safetensors file")
  check_dst(dst, overwrite, lambda p: False, "file")
  es = K.entries(source.config, "sd3")
  specs = [(K.SD3_PREFIX + e.name, _out_dtype(source, e, dtype), e.shape) for e in es]
  meta = {"format": "pt", SD3_METADATA_KEY: json.dumps(source.config.to_dict())}
  tmp = f"{dst}.tmp-{os.getpid()}"
  try:
    with SafetensorsWriter(tmp, specs, meta) as w:
      for e, a in iter_native(source, "sd3", dtype):
        w.write(K.SD3_PREFIX + e.name, a)
    os.replace(tmp, dst)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def is_diffusers_dir(p: str) -> bool:
  return os.path.isfile(os.path.join(p, "config.json")) and any(
    n.startswith("diffusion_pytorch_model") for n in os.listdir(p)
  )


def write_diffusers(
  source: Source, dst, *, dtype=None, overwrite: bool = False, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
) -> None:
  """A SD3Transformer2DModel directory, sharded with an index above ``max_shard_bytes``."""
  mup.check_exportable(source.config, "diffusers")
  dst = os.fspath(dst).rstrip("/")
  check_dst(dst, overwrite, is_diffusers_dir, "diffusers model directory")
  cfg_json = K.diffusers_config(source.config)
  es = K.entries(source.config, "diffusers")
  specs = [(e.name, _out_dtype(source, e, dtype), e.shape) for e in es]

  def write_config(tmp):
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(cfg_json, f, indent=2)
      f.write("\n")

  stream = ((e.name, a) for e, a in iter_native(source, "diffusers", dtype))
  write_weights_dir(
    dst,
    specs,
    stream,
    max_shard_bytes,
    DIFFUSERS_WEIGHTS,
    "diffusion_pytorch_model-{i:05d}-of-{n:05d}.safetensors",
    DIFFUSERS_INDEX,
    write_config,
  )


def write_jax(source: Source, dst, *, dtype=None, overwrite: bool = False) -> None:
  """Our checkpoint directory; leaves are produced lazily while orbax writes."""
  originals = _Originals(source)  # each original maps to one leaf; the cache only serialises reads
  leaves = {}
  for e in K.entries(source.config, "jax"):
    dt = _out_dtype(source, e, dtype)
    leaves[e.name] = pretrained.LazyArray(
      e.shape, dt, lambda e=e, dt=dt: K.to_native(e, originals(e.orig)).astype(dt, copy=False)
    )
  pretrained.write_checkpoint(dst, source.config, leaves, overwrite=overwrite)


WRITERS = {"jax": write_jax, "sd3": write_sd3, "diffusers": write_diffusers}


def write_weights_dir(
  dst: str,
  specs,
  stream,
  max_shard_bytes: int,
  single: str,
  pattern: str,
  index_name: str,
  write_config: Callable[[str], None],
) -> None:
  """A huggingface weights directory written tensor by tensor into a temporary sibling, then
  renamed: ``single`` or shards named ``pattern`` with an index."""
  shards = plan_shards(specs, max_shard_bytes)
  n = len(shards)
  files = [single] if n == 1 else [pattern.format(i=i + 1, n=n) for i in range(n)]
  with fileutil.atomic_directory(dst) as tmp:
    write_config(tmp)
    for fn, shard in zip(files, shards):
      with SafetensorsWriter(os.path.join(tmp, fn), shard, {"format": "pt"}) as w:
        for _ in shard:
          name, a = next(stream)
          w.write(name, a)
    if n > 1:
      total = sum(int(np.prod(s[2], dtype=np.int64)) * np.dtype(s[1]).itemsize for s in specs)
      index = {
        "metadata": {"total_size": total},
        "weight_map": {name: fn for fn, shard in zip(files, shards) for name, _, _ in shard},
      }
      with open(os.path.join(tmp, index_name), "w") as f:
        json.dump(index, f, indent=2)
        f.write("\n")
