"""The chunked dataset builder behind ``sd3-build-dataset``: images and captions -> encoded
latents and text -> latent records (``data.records``), resumable and split over processes.

Work is cut into fixed chunks of ``chunk_size`` source examples; process p of P takes chunks
c with c % P == p. A finished chunk's shards are renamed into ``<out>[/<bucket>]`` and a marker
``<out>/.build/chunk-NNNNNN.json`` is written atomically; a rerun skips marked chunks and redoes
unmarked ones from scratch, so an interrupted run resumes without duplicates or losses. When every
chunk is marked, ``dataset_info.json`` is written for each output directory (by the run that
finishes last; rerunning the same command after all processes ended also does it).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
import warnings
from typing import Any, Callable, Sequence

import numpy as np

from sd3_jax.data import buckets as bucket_lib
from sd3_jax.data import image_sources, records
from sd3_jax.storage import fileutil

BUILD_DIR = ".build"
SUMMARY_FILE = "build_summary.json"
ImageEncoder = Callable[[np.ndarray, np.ndarray], Any]  # (images [B,H,W,3] in [-1,1], seeds [B] uint32) -> latents
TextEncoderFn = Callable[[Sequence[str]], tuple[Any, Any]]  # prompts -> (context [B,L,D], pooled [B,P])


# ----------------------------------------------------------------------------- determinism


def _hash64(*parts) -> int:
  return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little")


def example_seed(seed: int, example_id: str) -> int:
  """Per-example uint32 seed (posterior sampling), from (seed, id) only."""
  return _hash64(seed, "latent", example_id) & 0xFFFFFFFF


def choose_caption(seed: int, example_id: str, caption: str, caption2: str | None) -> tuple[str, str]:
  """(caption, which): 50/50 between two captions, deterministic in (seed, id)."""
  if not caption2:
    return caption, "caption"
  return (caption2, "caption2") if _hash64(seed, "caption", example_id) & 1 else (caption, "caption")


# ----------------------------------------------------------------------------- encoders


def identity_image_encoder(images: np.ndarray, seeds: np.ndarray | None = None) -> np.ndarray:
  """Pixel-space models: the [-1, 1] image is the "latent"."""
  return np.asarray(images, np.float32)


def make_vae_encoder(model, params, *, sample: bool, seed: int = 0) -> ImageEncoder:
  """A jitted (images, seeds) -> normalised latents; posterior sample per example key, or mean."""
  import jax
  import jax.numpy as jnp

  base = jax.random.PRNGKey(seed)

  @jax.jit
  def encode(params, images, seeds):
    mean, logvar = model.apply({"params": params}, images, method=model.encode)
    z = mean
    if sample:
      keys = jax.vmap(lambda s: jax.random.fold_in(base, s))(seeds)
      eps = jax.vmap(lambda k: jax.random.normal(k, mean.shape[1:], jnp.float32))(keys)
      z = mean + jnp.exp(0.5 * logvar) * eps
    return (z - model.config.shift_factor) * model.config.scaling_factor

  return lambda images, seeds: encode(params, jnp.asarray(images), jnp.asarray(seeds, jnp.uint32))


def load_vae_encoder(path: str, *, sample: bool, seed: int = 0, dtype: str = "float32") -> ImageEncoder:
  import jax.numpy as jnp
  from sd3_jax.storage import pretrained
  from sd3_jax.models import vae

  model, params = pretrained.load_pretrained(path, dtype=jnp.dtype(dtype))
  if not isinstance(model, vae.AutoencoderKL):
    raise ValueError(f"{path} does not hold an AutoencoderKL checkpoint ({type(model).__name__})")
  return make_vae_encoder(model, params, sample=sample, seed=seed)


# ----------------------------------------------------------------------------- building


def _pad_batch(arrays: list, batch_size: int) -> list:
  return arrays + [arrays[-1]] * (batch_size - len(arrays))


class _Progress:
  def __init__(self, total: int, desc: str):
    try:
      from tqdm import tqdm

      self._bar = tqdm(total=total, desc=desc, unit="img")
    except ImportError:
      self._bar = None
    self.total, self.done, self.desc, self._last = total, 0, desc, 0.0

  def update(self, n: int) -> None:
    self.done += n
    if self._bar is not None:
      self._bar.update(n)
    elif time.time() - self._last > 10 or self.done == self.total:
      self._last = time.time()
      print(f"{self.desc}: {self.done}/{self.total}", file=sys.stderr, flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


def _chunk_marker(out_dir: str, chunk: int) -> str:
  return os.path.join(out_dir, BUILD_DIR, f"chunk-{chunk:06d}.json")


def _build_chunk(
  source,
  chunk: int,
  lo: int,
  hi: int,
  *,
  out_dir: str,
  image_encoder: ImageEncoder,
  text_encoder: TextEncoderFn,
  resolution: int,
  buckets,
  batch_size: int,
  seed: int,
  records_per_shard: int,
  prefix: str,
  latent_dtype,
  progress: _Progress,
) -> dict:
  """Encodes source[lo:hi] and moves its shards into place; returns the marker dict."""
  work = os.path.join(out_dir, BUILD_DIR, f"work-{chunk:06d}")
  shutil.rmtree(work, ignore_errors=True)  # leftovers of an interrupted try of this chunk
  groups: dict[str, list] = {}
  skipped = []
  for i in range(lo, hi):
    try:
      ex = source[i]
      hw = (
        image_sources.choose_bucket(ex["image"].height, ex["image"].width, buckets)
        if buckets
        else (resolution, resolution)
      )
      pixels = image_sources.crop_resize(ex["image"], *hw)
    except Exception as e:  # unreadable / corrupt image or record
      warnings.warn(f"skipping example {i}: {type(e).__name__}: {e}")
      skipped.append(str(i))
      progress.update(1)
      continue
    caption, which = choose_caption(seed, ex["id"], ex["caption"], ex.get("caption2"))
    key = bucket_lib.bucket_dir(hw) if buckets else ""
    groups.setdefault(key, []).append((ex["id"], pixels, caption, which))
  marker = {"chunk": chunk, "range": [lo, hi], "skipped": skipped, "buckets": {}}
  for key, items in sorted(groups.items()):
    part = os.path.join(work, key or "_")
    with records.RecordWriter(part, prefix=prefix, records_per_shard=records_per_shard) as writer:
      for b in range(0, len(items), batch_size):
        batch = items[b : b + batch_size]
        n = len(batch)
        images = np.stack(_pad_batch([x[1] for x in batch], batch_size))
        seeds = np.asarray(_pad_batch([example_seed(seed, x[0]) for x in batch], batch_size), np.uint32)
        latents = np.asarray(image_encoder(images, seeds), np.float32)[:n]
        context, pooled = text_encoder(_pad_batch([x[2] for x in batch], batch_size))
        context = np.asarray(context, np.float32)[:n].astype(np.float16)
        pooled = np.asarray(pooled, np.float32)[:n].astype(np.float16)
        for j, (eid, _, caption, which) in enumerate(batch):
          writer.write(
            latents[j].astype(latent_dtype),
            context[j],
            pooled[j],
            {"id": eid, "caption": caption, "caption_source": which},
          )
        progress.update(n)
    info = json.load(open(os.path.join(part, records.INFO_FILE)))
    dest = os.path.join(out_dir, key) if key else out_dir
    os.makedirs(dest, exist_ok=True)
    shards = []
    for s in info["shards"]:
      name = f"{prefix}-c{chunk:06d}-{s['file'][len(prefix) + 1 :]}"
      shards.append({"file": name, "num_records": s["num_records"], "src": os.path.join(part, s["file"])})
    marker["buckets"][key] = {
      "element_spec": info["element_spec"],
      "compression": info["compression"],
      "shards": shards,
    }
  # move shards (a crash here leaves no marker; the rerun overwrites the same final names)
  for key, b in marker["buckets"].items():
    dest = os.path.join(out_dir, key) if key else out_dir
    for s in b["shards"]:
      os.replace(s.pop("src"), os.path.join(dest, s["file"]))
  fileutil.atomic_json(_chunk_marker(out_dir, chunk), marker)
  shutil.rmtree(work, ignore_errors=True)
  return marker


def finalize(out_dir: str, num_chunks: int, metadata: dict | None = None) -> dict | None:
  """Writes dataset_info.json per output directory once every chunk is marked; else None."""
  markers = []
  for c in range(num_chunks):
    path = _chunk_marker(out_dir, c)
    if not os.path.exists(path):
      return None
    with open(path) as f:
      markers.append(json.load(f))
  skipped = [s for m in markers for s in m["skipped"]]
  per_bucket: dict[str, dict] = {}
  for m in markers:
    for key, b in m["buckets"].items():
      d = per_bucket.setdefault(key, {"element_spec": b["element_spec"], "compression": b["compression"], "shards": []})
      if d["element_spec"] != b["element_spec"]:
        raise records.RecordError(
          f"chunk {m['chunk']} bucket {key!r} has spec {b['element_spec']}, others {d['element_spec']}"
        )
      d["shards"].extend(b["shards"])
  meta = dict(metadata or {}, skipped_examples=len(skipped), skipped_indices=skipped[:1000])
  summary = {"num_records": 0, "skipped_examples": len(skipped), "directories": {}}
  for key, d in sorted(per_bucket.items()):
    n = sum(s["num_records"] for s in d["shards"])
    info = {
      "format": records.DATASET_FORMAT,
      "version": records.DATASET_VERSION,
      "num_records": n,
      "compression": d["compression"],
      "element_spec": d["element_spec"],
      "shards": d["shards"],
      "metadata": dict(meta, bucket=key or None),
    }
    fileutil.atomic_json(
      os.path.join(out_dir, key, records.INFO_FILE) if key else os.path.join(out_dir, records.INFO_FILE), info
    )
    summary["num_records"] += n
    summary["directories"][key or "."] = n
  fileutil.atomic_json(os.path.join(out_dir, SUMMARY_FILE), dict(summary, metadata=meta))
  return summary


def build(
  source,
  out_dir: str,
  *,
  image_encoder: ImageEncoder,
  text_encoder: TextEncoderFn,
  resolution: int = 256,
  buckets: Sequence[tuple[int, int]] | None = None,
  batch_size: int = 8,
  chunk_size: int = 1000,
  records_per_shard: int = 1000,
  seed: int = 0,
  prefix: str = "data",
  latent_dtype="float16",
  process_index: int = 0,
  process_count: int = 1,
  metadata: dict | None = None,
) -> dict:
  """Builds (or resumes) this process's chunks, then finalizes if all chunks are done.

  Returns {"processed_chunks", "skipped_chunks", "skipped_examples" (this call), "summary"
  (finalize's result, None while other processes' chunks are missing)}.
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  os.makedirs(os.path.join(out_dir, BUILD_DIR), exist_ok=True)
  num_chunks = max(1, math.ceil(len(source) / chunk_size))
  mine = [c for c in range(num_chunks) if c % process_count == process_index]
  todo = [c for c in mine if not os.path.exists(_chunk_marker(out_dir, c))]
  total = sum(min(len(source), (c + 1) * chunk_size) - c * chunk_size for c in todo)
  progress = _Progress(total, f"build_dataset[{process_index}/{process_count}]")
  skipped = 0
  try:
    for c in todo:
      m = _build_chunk(
        source,
        c,
        c * chunk_size,
        min(len(source), (c + 1) * chunk_size),
        out_dir=out_dir,
        image_encoder=image_encoder,
        text_encoder=text_encoder,
        resolution=resolution,
        buckets=buckets,
        batch_size=batch_size,
        seed=seed,
        records_per_shard=records_per_shard,
        prefix=prefix,
        latent_dtype=np.dtype(latent_dtype),
        progress=progress,
      )
      skipped += len(m["skipped"])
  finally:
    progress.close()
  meta = dict(
    metadata or {},
    num_source_examples=len(source),
    resolution=resolution,
    seed=seed,
    buckets=[list(b) for b in buckets] if buckets else None,
    chunk_size=chunk_size,
  )
  summary = finalize(out_dir, num_chunks, meta)
  return {
    "processed_chunks": todo,
    "skipped_chunks": sorted(set(mine) - set(todo)),
    "skipped_examples": skipped,
    "summary": summary,
  }
