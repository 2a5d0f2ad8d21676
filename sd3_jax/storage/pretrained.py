"""Our checkpoint format for every model (MM-DiT, CLIP text / vision / two-tower, T5, VAE):
``save_pretrained`` / ``load_pretrained``, the format registry, and streamed writes
(``LazyArray`` leaves are produced a couple at a time while orbax writes, so exporting an 8B
model never holds it whole). Every leaf's checksum is stored and checked on load
(``sd3_jax.storage.integrity``; ``verify=False`` skips it). The directory layout is in
docs/conversion.md.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import importlib
import json
import logging
import os
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from etils import epath

from sd3_jax.storage import fileutil, integrity, trees
from sd3_jax.models import mmdit

CONFIG_FILE = "sd3_jax_config.json"
PARAMS_DIR = "params"
# The format of the MM-DiT and of the other backbones of the study (its config's 'backbone' says
# which; the default of read_config).
FORMAT = "sd3_jax.mmdit"
FORMAT_VERSION = 1
_MAX_LOADS_IN_FLIGHT = 2
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ModelFormat:
  """One kind of model our directory format holds. Classes are named by import path and
  resolved on use, so a format's module is imported only when a checkpoint needs it.

  ``module`` must define ``config_class`` (a dataclass with ``to_dict`` / ``from_dict``),
  ``model_class`` (a flax module built as ``model_class(config, dtype=..., **kwargs)``) and
  ``abstract_params(model)`` (the boxed parameter shapes, via ``jax.eval_shape``).
  """

  name: str
  module: str
  config_class: str
  model_class: str
  description: str
  config_module: str | None = None  # where config_class is defined, when not in ``module``

  def _module(self):
    return importlib.import_module(self.module)

  @property
  def config_module_name(self) -> str:
    return self.config_module or self.module

  def config_type(self) -> type:
    return getattr(importlib.import_module(self.config_module_name), self.config_class)

  def config_from_dict(self, d: Mapping):
    return self.config_type().from_dict(d)

  def build(self, config, **kwargs) -> nn.Module:
    return getattr(self._module(), self.model_class)(config, **kwargs)

  def abstract_params(self, config):
    return self._module().abstract_params(self.build(config))


FORMATS: dict[str, ModelFormat] = {}


def register_format(fmt: ModelFormat) -> ModelFormat:
  """Adds (or replaces) a model kind; returns it."""
  FORMATS[fmt.name] = fmt
  return fmt


register_format(
  ModelFormat(
    FORMAT,
    "sd3_jax.models.backbones",
    "MMDiTConfig",
    "build",
    "diffusion backbone (MM-DiT, DiT, CrossDiT, UViT)",
    config_module="sd3_jax.models.mmdit_config",
  )
)
register_format(
  ModelFormat(
    "sd3_jax.clip_text", "sd3_jax.models.text_encoders", "CLIPTextConfig", "CLIPTextEncoder", "CLIP text encoder"
  )
)
register_format(
  ModelFormat(
    "sd3_jax.t5_encoder",
    "sd3_jax.models.text_encoders",
    "T5EncoderConfig",
    "T5Encoder",
    "T5 encoder",
    config_module="sd3_jax.models.t5",
  )
)
register_format(ModelFormat("sd3_jax.vae", "sd3_jax.models.vae", "VAEConfig", "AutoencoderKL", "autoencoder (VAE)"))
register_format(
  ModelFormat(
    "sd3_jax.clip_vision", "sd3_jax.models.clip_vision", "CLIPVisionConfig", "CLIPVisionEncoder", "CLIP image tower"
  )
)
register_format(
  ModelFormat(
    "sd3_jax.clip", "sd3_jax.models.clip_vision", "CLIPConfig", "CLIPModel", "CLIP model (image and text towers)"
  )
)


def format_of_config(config) -> ModelFormat:
  """The registered format whose config class ``config`` is an instance of."""
  for fmt in FORMATS.values():
    if type(config).__module__ != fmt.config_module_name:
      continue  # avoid importing unrelated model modules
    if isinstance(config, fmt.config_type()):
      return fmt
  raise TypeError(
    f"no sd3_jax checkpoint format stores a {type(config).__module__}."
    f"{type(config).__name__}; known formats: {sorted(FORMATS)}"
  )


class LazyArray:
  """A leaf whose data is produced on demand by ``load()`` (used for streaming writes)."""

  def __init__(self, shape, dtype, load: Callable[[], np.ndarray]):
    self.shape = tuple(int(s) for s in shape)
    self.dtype = np.dtype(dtype)
    self.load = load

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64))

  @property
  def nbytes(self) -> int:
    return self.size * self.dtype.itemsize

  def __repr__(self):
    return f"LazyArray({self.shape}, {self.dtype})"


def expected_shapes(config) -> dict[str, tuple[int, ...]]:
  """Flat name -> shape of every parameter of the (unscanned) model of ``config`` (any
  registered format; no allocation)."""
  return dict(_expected_shapes(config))


@functools.lru_cache(maxsize=16)
def _expected_shapes(config) -> dict[str, tuple[int, ...]]:
  abstract = nn.unbox(format_of_config(config).abstract_params(config))  # traces: ~1-5 s
  return {k: tuple(v.shape) for k, v in trees.flatten(abstract).items()}


# ---------------------------------------------------------------------------------------------
# Reading


def _ocp():
  import orbax.checkpoint as ocp  # imported lazily: orbax is slow to import

  return ocp


def is_checkpoint(path) -> bool:
  return (fileutil.as_epath(path) / CONFIG_FILE).is_file()


def _require_checkpoint(path) -> epath.Path:
  """The checkpoint directory (local or a URL that etils.epath opens) after checking its files."""
  path = fileutil.as_epath(path)
  if not path.exists():
    raise FileNotFoundError(f"no such checkpoint directory: {path}")
  if not path.is_dir():
    raise ValueError(
      f"{path} is a file, not an sd3_jax checkpoint directory; convert PyTorch "
      "weights with `sd3-convert --src SRC --dst DIR --to jax`"
    )
  if not is_checkpoint(path):
    hint = ""
    if (path / "config.json").is_file() or (path / "transformer").is_dir():
      hint = " It looks like a diffusers model;"
    raise ValueError(
      f"{path} is not an sd3_jax checkpoint (no {CONFIG_FILE}).{hint} convert PyTorch "
      "weights with `sd3-convert --src SRC --dst DIR --to jax`"
    )
  params = path / PARAMS_DIR
  if not (params / "_METADATA").is_file():
    raise ValueError(
      f"{path} is not a complete sd3_jax checkpoint: {params} is missing or is not an orbax checkpoint (no _METADATA)"
    )
  return path


def read_format(path) -> ModelFormat:
  """The ModelFormat of a checkpoint directory (validates the metadata file)."""
  return _read_meta(path)[0]


def _read_meta(path) -> tuple[ModelFormat, dict, str]:
  path = _require_checkpoint(path)
  cfg_path = path / CONFIG_FILE
  try:
    meta = json.loads(cfg_path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{cfg_path} is not valid JSON: {e}") from None
  name = meta.get("format") if isinstance(meta, dict) else None
  if name not in FORMATS:
    raise ValueError(
      f"{cfg_path} does not describe an sd3_jax checkpoint (format {name!r}, expected one of {sorted(FORMATS)})"
    )
  if meta.get("format_version") != FORMAT_VERSION:
    raise ValueError(
      f"{cfg_path}: format_version {meta.get('format_version')} is not supported "
      f"(this code reads version {FORMAT_VERSION})"
    )
  if meta.get("layout", "unscanned") != "unscanned":
    raise ValueError(f"{cfg_path}: layout {meta.get('layout')!r} is not supported (only 'unscanned')")
  if not isinstance(meta.get("config"), dict):
    raise ValueError(f'{cfg_path} has no "config" object')
  sums = meta.get("checksums")
  if sums is not None and (
    not isinstance(sums, dict)
    or not all(isinstance(v, str) and v.startswith(integrity.ALGORITHM + ":") for v in sums.values())
  ):
    raise ValueError(f'{cfg_path}: "checksums" must map parameter names to "{integrity.ALGORITHM}:<hex>" strings')
  return FORMATS[name], meta, cfg_path


def read_checksums(path) -> dict[str, str]:
  """Per-leaf checksums recorded in the metadata; {} (and a warning in the log) for a checkpoint
  written before checksums existed."""
  _, meta, cfg_path = _read_meta(path)
  if meta.get("checksums") is None:
    log.warning("%s has no parameter checksums (written by an older sd3_jax); its integrity is not verified", cfg_path)
    return {}
  return meta["checksums"]


def read_config(path, expected_format: str | None = FORMAT):
  """The config stored in a checkpoint directory.

  expected_format: the format the caller expects (default the MM-DiT's, so that MM-DiT code gets an
  MMDiTConfig or a clear error); None accepts any registered format.
  """
  fmt, meta, cfg_path = _read_meta(path)
  if expected_format is not None and fmt.name != expected_format:
    want = FORMATS[expected_format].description if expected_format in FORMATS else expected_format
    raise ValueError(
      f"{cfg_path} does not describe an sd3_jax {want} checkpoint: it holds a "
      f"{fmt.description} (format {fmt.name!r}, expected {expected_format!r})"
    )
  try:
    return fmt.config_from_dict(meta["config"])
  except (TypeError, ValueError) as e:
    raise ValueError(f"{cfg_path}: bad {fmt.config_class}: {e}") from None


def stored_params(path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """Flat name -> (shape, dtype) of the stored parameters, from orbax metadata (no data read)."""
  path = _require_checkpoint(path)
  meta = _ocp().PyTreeCheckpointer().metadata(path / PARAMS_DIR)
  tree = meta.item_metadata.tree
  return {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in trees.flatten(tree).items()}


def load_params(
  path, groups: list[str] | None = None, *, verify: bool = True, checksums: Mapping[str, str] | None = None
) -> dict:
  """Restores the top-level groups (e.g. 'joint_blocks_3', 'pos_embed'; all when None) as a
  nested dict of numpy arrays in their stored dtypes. Reading one group at a time keeps the
  memory to that group. verify: check every leaf read against its checksum (``checksums``, read
  from the metadata when None; callers reading many groups pass ``read_checksums`` once)."""
  path = _require_checkpoint(path)
  if verify and checksums is None:
    checksums = read_checksums(path)
  ocp = _ocp()
  stored = stored_params(path)
  tree = trees.unflatten({k: 0 for k in stored})
  if groups is not None:
    unknown = sorted(set(groups) - set(tree))
    if unknown:
      raise KeyError(f"{path} has no parameter groups {unknown}; it has {sorted(tree)}")
    tree = {g: tree[g] for g in groups}
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  try:
    out = ocp.PyTreeCheckpointer().restore(
      path / PARAMS_DIR,
      args=ocp.args.PyTreeRestore(item=tree, restore_args=restore_args, partial_restore=groups is not None),
    )
  except (ValueError, RuntimeError, OSError) as e:  # tensorstore: undecodable chunk, short file
    raise ValueError(
      f"{path}: cannot read parameter group(s) {groups or sorted(tree)}: the data in "
      f"{PARAMS_DIR}/ is damaged or incomplete ({' '.join(str(e).split())[:300]})"
    ) from None
  if verify and checksums:
    integrity.check_checksums(trees.flatten(out), checksums, f"checkpoint {path}")
  return out


def load_pretrained(
  path,
  *,
  dtype=jnp.float32,
  param_dtype=jnp.float32,
  scan_layers: bool = False,
  shardings=None,
  verify: bool = True,
  **model_kwargs,
):
  """Loads a checkpoint directory of any format: returns ``(model, params)``.

  Args:
    path: a directory written by ``save_pretrained`` or ``sd3-convert --to jax``.
    dtype: compute dtype of the returned module (bfloat16 on accelerators).
    param_dtype: cast every parameter to this dtype (None keeps the stored dtypes). Parameters
      are float32 by default, as the models and the trainer expect.
    scan_layers: MM-DiT and the other backbones only: return the scanned layout
      (``mmdit.stack_block_params``) and a model with ``scan_layers=True``.
    shardings: None (default device), one ``jax.sharding.Sharding`` for every leaf, or a tree
      of shardings with the structure of the returned params.
    verify: check every leaf against the checksum written with it (an error names a damaged
      leaf); False skips the hashing (SHA-256: 0.42 GiB/s per core measured on a 2-core CPU
      machine; the leaves of a group are hashed on up to 8 threads).
    **model_kwargs: other module options (MMDiT: remat, attention_impl; AutoencoderKL:
      attention_impl).

  The module is ``MMDiT`` (or the config's other backbone: ``backbones.build``), ``CLIPTextEncoder``, ``T5Encoder``, ``AutoencoderKL``,
  ``CLIPVisionEncoder`` or ``CLIPModel`` as the checkpoint's format says (``read_format``). Parameters are read one top-level group (one
  block, or one run of blocks when scanned) at a time and placed on device before the next is
  read, so host memory holds only that group besides the result.
  """
  fmt = read_format(path)
  config = read_config(path, expected_format=None)
  if scan_layers and fmt.name != FORMAT:
    raise ValueError(
      f"scan_layers is only supported for MM-DiT (and the other diffusion backbones') checkpoints; "
      f"{path} holds a {fmt.description}"
    )
  stored = stored_params(path)
  integrity.check_stored_grid(config, stored, path)
  trees.check_shapes({k: v[0] for k, v in stored.items()}, expected_shapes(config), f"checkpoint {path}")
  sums = read_checksums(path) if verify else None

  def place(name, tree):
    if param_dtype is not None:
      tree = jax.tree.map(lambda a: a.astype(param_dtype, copy=False), tree)
    if shardings is None:
      return jax.tree.map(jnp.asarray, tree)
    sh = shardings if isinstance(shardings, jax.sharding.Sharding) else shardings[name]
    if isinstance(sh, jax.sharding.Sharding):
      return jax.tree.map(lambda a: jax.device_put(a, sh), tree)
    return jax.tree.map(jax.device_put, tree, sh)

  groups = sorted({k.split("/")[0] for k in stored})
  params = {}
  if scan_layers:
    prefix, runs = mmdit.scan_segments(config)
    for start, stop in runs:
      names = [f"{prefix}{i}" for i in range(start, stop)]
      blocks = load_params(path, names, verify=verify, checksums=sums)
      stacked = jax.tree.map(lambda *xs: np.stack(xs), *[blocks.pop(n) for n in names])
      params[f"scan_blocks_{start}_{stop}"] = place(f"scan_blocks_{start}_{stop}", stacked)
      groups = [g for g in groups if g not in names]
  for g in groups:
    params[g] = place(g, load_params(path, [g], verify=verify, checksums=sums)[g])
  if fmt.name == FORMAT:
    model_kwargs["scan_layers"] = scan_layers
  return fmt.build(config, dtype=dtype, **model_kwargs), params


# ---------------------------------------------------------------------------------------------
# Writing


def _streaming_handler_registry():
  """Orbax type handlers for LazyArray and numpy leaves that load/write a few at a time
  (orbax's own numpy handler deep-copies every leaf up front)."""
  ocp = _ocp()
  import tensorstore as ts

  class _StreamingNumpyHandler(ocp.type_handlers.NumpyHandler):
    def __init__(self):
      super().__init__(deepcopy_host_arrays=False)
      self._sem = None

    async def _open_and_write(self, value, tspec, ts_context):  # overrides orbax's per-leaf write
      if self._sem is None:
        self._sem = asyncio.Semaphore(_MAX_LOADS_IN_FLIGHT)
      async with self._sem:
        arr = await asyncio.to_thread(value.load) if isinstance(value, LazyArray) else value
        if arr.shape != value.shape or arr.dtype != value.dtype:
          raise ValueError(
            f"lazy leaf produced {arr.dtype}{list(arr.shape)}, declared {value.dtype}{list(value.shape)}"
          )
        t = await ts.open(ts.Spec(tspec), create=True, open=True, context=ts_context)
        await t.write(np.ascontiguousarray(arr).reshape(arr.shape))  # 0-d stays 0-d
        del arr

  if not hasattr(ocp.type_handlers.NumpyHandler, "_open_and_write"):
    raise RuntimeError(
      "this orbax version has no NumpyHandler._open_and_write; streaming writes need orbax-checkpoint 0.12.x"
    )
  handler = _StreamingNumpyHandler()
  return ocp.type_handlers.create_type_handler_registry(
    (LazyArray, handler), (np.ndarray, handler), (jax.Array, ocp.type_handlers.ArrayHandler())
  )


def _dtype_name(dtypes) -> str:
  names = sorted({np.dtype(d).name for d in dtypes})
  return names[0] if len(names) == 1 else "mixed"


def write_checkpoint(path, config, leaves: Mapping[str, Any], *, overwrite: bool = False) -> None:
  """Writes a checkpoint directory from flat leaves (numpy arrays or LazyArray), validating
  names and shapes against ``config`` (any registered format's config) first. Written to a
  temporary sibling and renamed, so an interrupted write never leaves a half checkpoint under
  ``path``."""
  fmt = format_of_config(config)
  path = os.path.abspath(os.fspath(path))  # orbax takes absolute paths only
  trees.check_shapes({k: v.shape for k, v in leaves.items()}, expected_shapes(config), "parameters")
  if os.path.exists(path):
    if not overwrite:
      raise FileExistsError(f"{path} exists; pass --overwrite (overwrite=True) to replace it")
    if not os.path.isdir(path) or (os.listdir(path) and not is_checkpoint(path)):
      raise FileExistsError(f"refusing to overwrite {path}: it is not an sd3_jax checkpoint")
  sums: dict[str, str] = {}  # each leaf is hashed as it is written (no second pass)
  hashed = {
    k: LazyArray(
      v.shape, v.dtype, integrity.recording(sums, k, v.load if isinstance(v, LazyArray) else (lambda v=v: v))
    )
    for k, v in leaves.items()
  }
  with fileutil.atomic_directory(path) as tmp:
    ocp = _ocp()
    handler = ocp.PyTreeCheckpointHandler(type_handler_registry=_streaming_handler_registry())
    ocp.Checkpointer(handler).save(os.path.join(tmp, PARAMS_DIR), args=ocp.args.PyTreeSave(trees.unflatten(hashed)))
    if set(sums) != set(leaves):
      raise RuntimeError(f"checksums missing for {sorted(set(leaves) - set(sums))[:5]}")
    meta = {
      "format": fmt.name,
      "format_version": FORMAT_VERSION,
      "layout": "unscanned",
      "param_dtype": _dtype_name(v.dtype for v in leaves.values()),
      "config": config.to_dict(),
      "checksums": dict(sorted(sums.items())),
    }
    with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
      json.dump(meta, f, indent=2)
      f.write("\n")


def save_pretrained(path, params: Mapping, config, *, dtype=None, overwrite: bool = False) -> None:
  """Saves parameters (jax or numpy arrays; a backbone's may be in the scanned layout) with
  their config (MMDiTConfig, CLIPTextConfig, T5EncoderConfig, VAEConfig, CLIPVisionConfig or
  CLIPConfig).

  ``dtype`` casts every leaf (e.g. jnp.bfloat16 for a compact export); None keeps each leaf's
  dtype. Leaves are copied to host one at a time while writing. Single-process only: every
  array must be fully addressable.
  """
  if isinstance(config, mmdit.MMDiTConfig) and any(k.startswith("scan_blocks_") for k in params):
    params = mmdit.unstack_block_params(params, config)
  leaves = {}
  for name, x in trees.flatten(params).items():
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      raise ValueError(f"parameter {name} is not fully addressable; gather it before saving")
    out_dtype = np.dtype(dtype) if dtype is not None else np.dtype(x.dtype)
    leaves[name] = LazyArray(
      x.shape, out_dtype, lambda x=x, d=out_dtype: np.asarray(jax.device_get(x)).astype(d, copy=False)
    )
  write_checkpoint(path, config, leaves, overwrite=overwrite)
