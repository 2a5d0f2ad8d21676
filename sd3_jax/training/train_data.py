"""The trainer's data side, read from the experiment config: the latent size of every aspect
bucket, the shapes of a training batch, the record source of each split and bucket (validation
never falls back to training records), and the start-up checks of config, data and mesh that
run before anything compiles."""

from __future__ import annotations

import jax
import ml_collections
from etils import epath

from sd3_jax.data import buckets, records, sources
from sd3_jax.training import init_from, startup_checks
from sd3_jax.models import mmdit


def latent_sizes(config: ml_collections.ConfigDict) -> list[tuple[int, int]]:
  """The latent (h, w) of every aspect bucket (data.buckets), or the one square latent_size."""
  d = config.data
  return [tuple(int(x) for x in hw) for hw in d.buckets] or [(d.latent_size, d.latent_size)]


def batch_shapes(config: ml_collections.ConfigDict, latent_hw=None) -> dict[str, tuple[int, ...]]:
  """Global shapes of one training batch (of the bucket with latent size ``latent_hw``)."""
  d, b = config.data, config.global_batch_size
  h, w = latent_hw or latent_sizes(config)[0]
  return {
    "latent": (b, h, w, d.latent_channels),
    "context": (b, d.context_len, d.context_dim),
    "pooled": (b, d.pooled_dim),
  }


def make_source(config: ml_collections.ConfigDict, split: str = "train", latent_hw=None):
  """The record source of 'train' or 'val' (of the aspect bucket ``latent_hw``: the
  subdirectory buckets.bucket_dir of data.path / data.val_path). Validation never falls back to
  the training records: it reads data.val_path, or the last data.val_holdout training records
  (then not trained on)."""
  d = config.data
  hw = tuple(latent_hw or latent_sizes(config)[0])
  if d.source == "synthetic":
    n = d.num_synthetic if split == "train" else config.val.num_examples
    return sources.SyntheticSource(
      num_records=n,
      latent_shape=(*hw, d.latent_channels),
      context_len=d.context_len,
      context_dim=d.context_dim,
      pooled_dim=d.pooled_dim,
      seed=config.seed + (0 if split == "train" else 1) + 2 * latent_sizes(config).index(hw),
    )
  if d.source != "records":
    raise ValueError(f"config.data.source must be 'synthetic' or 'records', got {d.source!r}")
  if not d.path:
    raise ValueError(
      "config.data.source='records' needs config.data.path (a directory of "
      "*.array_record shards written by sd3_jax.data.records.RecordWriter)"
    )
  holdout = int(d.val_holdout)
  if holdout < 0 or (holdout and d.val_path):
    raise ValueError(
      f"config.data.val_holdout={holdout} with val_path={d.val_path!r}: give either "
      "val_path (separate validation records) or val_holdout=N > 0 (the last N "
      "training records), not both"
    )
  if split == "val" and not d.val_path and not holdout:
    raise ValueError(
      "validation needs records of its own: set config.data.val_path=DIR, or "
      "config.data.val_holdout=N to hold out the last N records of data.path (they "
      "are then excluded from training), or config.val.every=0 to skip validation"
    )
  sub = (
    (lambda root: str(epath.Path(root) / buckets.latent_bucket_dir(hw, d.bucket_pixels_per_latent)))
    if d.buckets
    else str
  )
  if split == "val" and d.val_path:
    return sources.RecordSource(sub(d.val_path))
  source = sources.RecordSource(sub(d.path))
  if holdout >= len(source):
    raise ValueError(
      f"config.data.val_holdout={holdout} leaves no training records in {d.path} ({len(source)} records)"
    )
  if not holdout:
    return source
  cut = len(source) - holdout
  return sources.SliceSource(source, 0, cut) if split == "train" else sources.SliceSource(source, cut, len(source))


def check_config_and_data(config: ml_collections.ConfigDict, mesh, sources: dict) -> None:
  """Fail fast, before anything compiles: model vs data shapes, batching vs the mesh, and every
  record source's dataset_info.json vs the config (startup_checks). ``sources``: split ->
  {latent (h, w): source} or None."""
  d, m = config.data, mmdit.config_from_preset(**config.model)
  size_key = "config.data.buckets" if d.buckets else "config.data.latent_size"
  if m.backbone == "mmdit3" and (m.clip_tokens != config.text.clip_tokens or d.context_len <= m.clip_tokens):
    raise ValueError(
      f"backbone 'mmdit3' reads context rows [0, model.clip_tokens={m.clip_tokens}) as CLIP tokens and the rest "
      f"as T5 tokens: set config.model.clip_tokens to config.text.clip_tokens={config.text.clip_tokens}, below "
      f"config.data.context_len={d.context_len}"
    )
  for hw in latent_sizes(config):
    if config.init_from:  # its positional grid and leaves first: the most specific messages
      init_from.check(config.init_from, m, hw)
    startup_checks.check_model_and_data_config(
      latent_hw=hw,
      latent_channels=d.latent_channels,
      context_dim=d.context_dim,
      pooled_dim=d.pooled_dim,
      model_in_channels=m.in_channels,
      model_context_dim=m.context_dim,
      model_pooled_dim=m.pooled_dim,
      patch_size=m.patch_size,
      pos_embed_max_size=m.pos_embed_max_size,
    )
    for split, source in sources.items():
      source = source and source.get(hw)
      if source is not None and getattr(source, "directory", None) is not None:
        startup_checks.check_element_spec(
          source.element_spec,
          where=f"{source.directory}/{records.INFO_FILE} ({split})",
          latent_hw=hw,
          latent_channels=d.latent_channels,
          context_len=d.context_len,
          context_dim=d.context_dim,
          pooled_dim=d.pooled_dim,
          size_key=size_key,
        )
  startup_checks.check_batching(
    global_batch_size=config.global_batch_size,
    grad_accum_steps=config.grad_accum_steps,
    batch_shards=mesh.shape["data"] * mesh.shape["fsdp"],
    process_count=jax.process_count(),
  )
