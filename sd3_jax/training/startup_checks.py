"""Start-up checks of a training run: everything that can be wrong with the config, the data
and the mesh is found before anything is compiled, with the key, both values and the fix.

* ``check_model_and_data_config``: the model's input widths and positional grid against the
  config's data shapes (config.model vs config.data).
* ``check_element_spec``: a dataset's ``dataset_info.json`` element spec against the config's
  data shapes (latent size and channels, context length and width, pooled width).
* ``check_batching``: global batch, gradient-accumulation microbatch, batch shards of the mesh
  and process count together.
* ``check_storage``: a gs:// workdir has the packages that write there, and record paths are
  not URLs (ArrayRecord reads through the local file API).

Each function takes plain values (the trainer reads the config) and raises ``ValueError``
listing every problem at once.
"""

from __future__ import annotations

import importlib.util
from typing import Mapping, Sequence


def _fail(problems: Sequence[str], what: str) -> None:
  if problems:
    raise ValueError(f"{what}: " + "; ".join(problems))


def check_model_and_data_config(
  *,
  latent_hw: Sequence[int],
  latent_channels: int,
  context_dim: int,
  pooled_dim: int,
  model_in_channels: int,
  model_context_dim: int,
  model_pooled_dim: int,
  patch_size: int,
  pos_embed_max_size: int,
) -> None:
  """config.data shapes against the MM-DiT's input widths and positional grid."""
  problems = []
  if latent_channels != model_in_channels:
    problems.append(
      f"config.data.latent_channels={latent_channels} but the model's in_channels is "
      f"{model_in_channels} (set --config.model.in_channels={latent_channels} and "
      f"out_channels, or use data with {model_in_channels} latent channels)"
    )
  if context_dim != model_context_dim:
    problems.append(
      f"config.data.context_dim={context_dim} but the model's context_dim is "
      f"{model_context_dim} (set --config.model.context_dim={context_dim})"
    )
  if pooled_dim != model_pooled_dim:
    problems.append(
      f"config.data.pooled_dim={pooled_dim} but the model's pooled_dim is "
      f"{model_pooled_dim} (set --config.model.pooled_dim={pooled_dim})"
    )
  h, w = latent_hw
  if h % patch_size or w % patch_size:
    problems.append(f"latent {h}x{w} is not divisible by the patch size {patch_size}")
  grid = max(h, w) // patch_size
  if grid > pos_embed_max_size:
    problems.append(
      f"latent {h}x{w} with patch {patch_size} needs a {grid}x{grid} positional grid "
      f"but config.model.pos_embed_max_size is {pos_embed_max_size} (raise "
      f"--config.model.pos_embed_max_size to at least {grid}, or train at a smaller "
      "resolution)"
    )
  _fail(problems, "config.model does not fit config.data")


def check_element_spec(
  spec: Mapping[str, tuple],
  *,
  where: str,
  latent_hw: Sequence[int],
  latent_channels: int,
  context_len: int,
  context_dim: int,
  pooled_dim: int,
  size_key: str = "config.data.latent_size",
) -> None:
  """A dataset's element spec ({name: (shape, dtype)}, from its dataset_info.json) against the
  shapes the config trains on; ``where`` names the dataset in the message."""
  latent = tuple(spec["latent"][0])
  context = tuple(spec["context"][0])
  pooled = tuple(spec["pooled"][0])
  problems = []
  h, w = latent_hw
  if latent[:2] != (h, w):
    fix = (
      f"set --{size_key}={latent[0]}"
      if latent[0] == latent[1]
      else "non-square latents belong in an aspect bucket (config.data.buckets)"
    )
    problems.append(
      f"{size_key} gives latents {h}x{w} but the records hold {latent[0]}x{latent[1]} "
      f"({fix}, or rebuild the dataset at that resolution)"
    )
  if latent[2] != latent_channels:
    problems.append(
      f"config.data.latent_channels={latent_channels} but the records have "
      f"{latent[2]} (set --config.data.latent_channels={latent[2]} and the model's "
      "in/out channels)"
    )
  if context[0] != context_len:
    problems.append(
      f"config.data.context_len={context_len} but the records hold {context[0]} text "
      f"tokens (set --config.data.context_len={context[0]})"
    )
  if context[1] != context_dim:
    problems.append(
      f"config.data.context_dim={context_dim} but the records' context is "
      f"{context[1]} wide (set --config.data.context_dim={context[1]} and "
      "config.model.context_dim)"
    )
  if pooled[0] != pooled_dim:
    problems.append(
      f"config.data.pooled_dim={pooled_dim} but the records' pooled vectors have "
      f"{pooled[0]} (set --config.data.pooled_dim={pooled[0]} and config.model.pooled_dim)"
    )
  _fail(problems, f"config does not match the dataset {where}")


def check_batching(*, global_batch_size: int, grad_accum_steps: int, batch_shards: int, process_count: int) -> int:
  """The global batch, its gradient-accumulation microbatch and the mesh's batch shards
  (data * fsdp) together; returns the microbatch size."""
  problems = []
  if global_batch_size < 1 or grad_accum_steps < 1:
    _fail(
      [f"global_batch_size={global_batch_size} and grad_accum_steps={grad_accum_steps} must be positive"], "batching"
    )
  if global_batch_size % grad_accum_steps:
    problems.append(f"global_batch_size={global_batch_size} is not divisible by grad_accum_steps={grad_accum_steps}")
  micro = global_batch_size // grad_accum_steps
  if global_batch_size % batch_shards:
    problems.append(
      f"global_batch_size={global_batch_size} is not divisible by the mesh's batch shards data*fsdp={batch_shards}"
    )
  elif not global_batch_size % grad_accum_steps and micro % batch_shards:
    problems.append(
      f"the microbatch global_batch_size/grad_accum_steps={micro} is not divisible by "
      f"the batch shards data*fsdp={batch_shards}, so every microbatch would be "
      f"resharded across devices (choose grad_accum_steps so that "
      f"{global_batch_size}/grad_accum_steps is a multiple of {batch_shards})"
    )
  if global_batch_size % process_count:
    problems.append(
      f"global_batch_size={global_batch_size} is not divisible by the process count "
      f"{process_count} (every process feeds global_batch_size/processes examples)"
    )
  _fail(problems, "batching")
  return micro


def _importable(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except ModuleNotFoundError:  # a missing parent package (google.cloud)
    return False


def check_storage(*, workdir: str, record_paths: Mapping[str, str]) -> None:
  """The workdir's and the data's storage. A gs:// workdir needs gcsfs (etils.epath's gs://
  file system) and google-cloud-storage (orbax asks the bucket's layout before listing steps);
  ``record_paths`` ({config key: path}) must be local or mounted paths: ArrayRecord shards are
  read with the local file API, so a bucket is mounted (gcsfuse) rather than given as a URL."""
  problems = []
  scheme = str(workdir).split("://", 1)[0] if "://" in str(workdir) else ""
  if scheme in ("gs", "gcs"):
    missing = [
      pkg for mod, pkg in (("gcsfs", "gcsfs"), ("google.cloud.storage", "google-cloud-storage")) if not _importable(mod)
    ]
    if missing:
      problems.append(
        f"the workdir {workdir} is on GCS but {', '.join(missing)} is not installed (pip install 'sd3_jax[gcs]')"
      )
  for key, path in record_paths.items():
    if path and "://" in str(path):
      problems.append(
        f"config.{key}={path!r} is a URL, but ArrayRecord shards are read with the "
        "local file API; mount the bucket (e.g. gcsfuse --implicit-dirs BUCKET "
        "/gcs/BUCKET) and give the mounted path"
      )
  _fail(problems, "storage")
