"""Text encoders and the VAE <-> our checkpoints, on top of the detection and directory helpers
of ``formats``: a text encoder (CLIP-L, CLIP-G, T5; ``text_keys``) is read from or written to a
transformers model directory (config.json + model.safetensors or shards with an index), e.g.
text_encoder{,_2,_3}/ of a diffusers pipeline; the VAE (``vae_keys``; small, converted in memory)
from or to a diffusers AutoencoderKL directory, e.g. vae/."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np

from sd3_jax.storage import pretrained
from sd3_jax.storage import trees
from sd3_jax.convert import text_keys as TK
from sd3_jax.convert.safetensors_io import check_float_dtypes
from sd3_jax.convert.formats import (
  DEFAULT_MAX_SHARD_BYTES,
  DIFFUSERS_INDEX,
  DIFFUSERS_WEIGHTS,
  TRANSFORMERS_INDEX,
  TRANSFORMERS_WEIGHTS,
  check_dst,
  detect_format,
  group_reader,
  is_diffusers_dir,
  open_weights_dir,
  read_json,
  write_weights_dir,
)


TEXT_AND_CLIP_CONFIGS = (TK.CLIPTextConfig, TK.T5EncoderConfig, TK.CLIPVisionConfig, TK.CLIPConfig)
# The tokenizer files of a transformers CLIP directory (hub CLIPModel repositories ship them).
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def open_text_source(path, verify: bool = True) -> TK.TextSource:
  """A text encoder or CLIP model as a TextSource: our checkpoint (sd3_jax.clip_text /
  t5_encoder / clip / clip_vision) or a transformers directory (names, shapes and the config
  validated on opening)."""
  fmt, path = detect_format(path)
  if fmt == "jax":
    config = pretrained.read_config(path, expected_format=None)
    if not isinstance(config, TEXT_AND_CLIP_CONFIGS):
      raise ValueError(f"{path} holds a {pretrained.read_format(path).description}, not a text encoder or CLIP model")
    stored = pretrained.stored_params(path)
    return TK.TextSource(
      config,
      ours_shapes={k: v[0] for k, v in stored.items()},
      ours_dtypes={k: v[1] for k, v in stored.items()},
      read_ours=group_reader(path, verify),
      description=f"sd3_jax checkpoint {path}",
    )
  if fmt != "transformers":
    raise ValueError(f"{path} is a {fmt} MM-DiT checkpoint, not a text encoder")
  cfg_path = os.path.join(path, "config.json")
  hf = read_json(cfg_path, "a transformers config")
  config = TK.config_from_hf(hf, cfg_path)
  desc = f"transformers model {path}"
  where = open_weights_dir(path, TRANSFORMERS_WEIGHTS, TRANSFORMERS_INDEX, desc)
  return TK.source_from_hf_tensors(
    config,
    {k: r.shape(k) for k, r in where.items()},
    {k: r.dtype(k) for k, r in where.items()},
    lambda k: where[k].read(k),
    projection=TK.has_projection(hf),
    description=desc,
  )


def load_text_encoder(path, *, dtype=np.float32):
  """(flax module, float32 parameters) of a transformers text-encoder directory, converted in
  memory one tensor at a time (our own checkpoints load with ``pretrained.load_pretrained``)."""
  import jax.numpy as jnp

  from sd3_jax.models import text_encoders as te

  source = open_text_source(path)
  flat = {e.ours: jnp.asarray(source.read_ours(e.ours).astype(np.float32)) for e in source.entries}
  return te.build(source.config, dtype), trees.unflatten(flat)


def _text_dtype(source: TK.TextSource, e: TK.Entry, dtype) -> np.dtype:
  return np.dtype(dtype) if dtype is not None else source.dtype(e.ours)


def write_text_jax(source: TK.TextSource, dst, *, dtype=None, overwrite: bool = False) -> None:
  """Our checkpoint directory (sd3_jax.clip_text / sd3_jax.t5_encoder), streamed."""
  leaves = {}
  for e in source.entries:
    dt = _text_dtype(source, e, dtype)
    leaves[e.ours] = pretrained.LazyArray(
      e.ours_shape, dt, lambda e=e, dt=dt: source.read_ours(e.ours).astype(dt, copy=False)
    )
  pretrained.write_checkpoint(dst, source.config, leaves, overwrite=overwrite)


def _is_transformers_dir(p: str) -> bool:
  return os.path.isfile(os.path.join(p, "config.json")) and any(
    n.startswith("model") and n.endswith((".safetensors", ".json")) for n in os.listdir(p)
  )


def write_text_transformers(
  source: TK.TextSource, dst, *, dtype=None, overwrite: bool = False, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
) -> None:
  """A transformers directory (CLIPTextModelWithProjection / T5EncoderModel: config.json +
  model.safetensors, sharded with model.safetensors.index.json above max_shard_bytes)."""
  dst = os.fspath(dst).rstrip("/")
  check_dst(dst, overwrite, _is_transformers_dir, "transformers model directory")
  specs = [(e.hf, _text_dtype(source, e, dtype), e.hf_shape) for e in source.entries]

  def stream():
    for name, dt, _ in specs:
      yield name, source.read_hf(name).astype(dt, copy=False)

  def write_config(tmp):
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(source.config.to_hf_config(), f, indent=2)
      f.write("\n")

  write_weights_dir(
    dst,
    specs,
    stream(),
    max_shard_bytes,
    TRANSFORMERS_WEIGHTS,
    "model-{i:05d}-of-{n:05d}.safetensors",
    TRANSFORMERS_INDEX,
    write_config,
  )


TEXT_WRITERS = {"jax": write_text_jax, "transformers": write_text_transformers}


def copy_tokenizer(src, dst, target: str) -> bool:
  """Copies a CLIP tokenizer along with a converted CLIPModel: from a transformers directory's
  top level into our checkpoint's ``tokenizer/`` (where ``sd3_jax.evaluation.load_clip`` looks),
  and back. Returns whether there was one."""
  src, dst = os.fspath(src), os.fspath(dst)
  from_dir = src if target == "jax" else os.path.join(src, "tokenizer")
  to_dir = os.path.join(dst, "tokenizer") if target == "jax" else dst
  names = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(from_dir, n))]
  if not names:
    return False
  os.makedirs(to_dir, exist_ok=True)
  for n in names:
    shutil.copyfile(os.path.join(from_dir, n), os.path.join(to_dir, n))
  return True


# ---------------------------------------------------------------------------------------------
# VAE: diffusers AutoencoderKL directories <-> our checkpoints (in memory: ~84M parameters)


def convert_vae(
  src,
  dst,
  to: str,
  *,
  dtype=None,
  overwrite: bool = False,
  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
  verify: bool = True,
):
  """diffusers AutoencoderKL directory -> our sd3_jax.vae checkpoint ('jax'), or back
  ('diffusers'). Returns the VAEConfig."""
  from sd3_jax.convert import vae_keys  # imports the VAE model only when needed

  fmt, path = detect_format(src)
  dtype = None if dtype is None else np.dtype(dtype)
  if to == "jax":
    if fmt != "diffusers":
      raise ValueError(f"{src} is already an sd3_jax checkpoint; a VAE converts to 'diffusers'")
    config_json = read_json(os.path.join(path, "config.json"), "a diffusers config")
    try:  # validate the config before reading any tensor
      vae_keys.VAEConfig.from_diffusers_config(config_json)
    except ValueError as e:
      raise ValueError(f"{path}/config.json: {e}") from None
    where = open_weights_dir(path, DIFFUSERS_WEIGHTS, DIFFUSERS_INDEX, f"diffusers VAE {path}")
    check_float_dtypes({k: r.dtype(k) for k, r in where.items()}, f"diffusers VAE {path}")
    state_dict = {k: r.read(k) for k, r in where.items()}
    config, params = vae_keys.diffusers_state_dict_to_vae_params(state_dict, config_json, dtype=dtype)
    pretrained.save_pretrained(dst, params, config, overwrite=overwrite)
    return config
  if to != "diffusers":
    raise ValueError(f"{src} is a VAE; it converts to 'jax' or 'diffusers', not {to!r}")
  if fmt != "jax":
    raise ValueError(f"{src} is already a diffusers VAE; a VAE converts to 'jax'")
  config = pretrained.read_config(path, expected_format="sd3_jax.vae")
  state_dict = vae_keys.vae_params_to_diffusers_state_dict(pretrained.load_params(path, verify=verify), config)
  if dtype is not None:
    state_dict = {k: v.astype(dtype) for k, v in state_dict.items()}
  dst = os.fspath(dst).rstrip("/")
  check_dst(dst, overwrite, is_diffusers_dir, "diffusers model directory")

  def write_config(tmp):
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(vae_keys.diffusers_vae_config(config), f, indent=2)
      f.write("\n")

  specs = [(k, v.dtype, v.shape) for k, v in state_dict.items()]
  write_weights_dir(
    dst,
    specs,
    iter(state_dict.items()),
    max_shard_bytes,
    DIFFUSERS_WEIGHTS,
    "diffusion_pytorch_model-{i:05d}-of-{n:05d}.safetensors",
    DIFFUSERS_INDEX,
    write_config,
  )
  return config
