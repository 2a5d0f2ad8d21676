"""Builds latent-record datasets (``sd3_jax.records`` format) from images and captions.

  # folder of images + JSONL {"file": "a/b.jpg", "caption": "...", "caption2": "..." (optional)}
  python -m sd3_jax.build_dataset --images DIR --captions caps.jsonl --out data/train \
      --vae ckpt/vae --text_encoders ckpt/text --resolution 512 [--buckets] [--latent_sample sample]
  # any tensorflow-datasets dataset with an image and a text feature (read without TensorFlow)
  python -m sd3_jax.build_dataset --tfds NAME --tfds_data_dir DIR --split train \
      --image_key image --text_key caption --out data/train --vae ckpt/vae --text_encoders ckpt/text
  # pixel-space demo models: store the [-1, 1] image itself as the "latent"
  python -m sd3_jax.build_dataset ... --identity_vae

Work is cut into fixed chunks of ``--chunk_size`` source examples; process p of P takes chunks
c with c % P == p. A finished chunk's shards are renamed into ``<out>[/<bucket>]`` and a marker
``<out>/.build/chunk-NNNNNN.json`` is written atomically; a rerun skips marked chunks and redoes
unmarked ones from scratch, so an interrupted run resumes without duplicates or losses. When every
chunk is marked, ``dataset_info.json`` is written for each output directory (by the run that
finishes last; rerunning the same command after all processes ended also does it).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import shutil
import sys
import time
import warnings
from typing import Any, Callable, Sequence

import numpy as np

from sd3_jax import command, fileutil
from sd3_jax import records

BUILD_DIR = ".build"
SUMMARY_FILE = "build_summary.json"
ImageEncoder = Callable[[np.ndarray, np.ndarray], Any]  # (images [B,H,W,3] in [-1,1], seeds [B] uint32) -> latents
TextEncoderFn = Callable[[Sequence[str]], tuple[Any, Any]]  # prompts -> (context [B,L,D], pooled [B,P])


# ----------------------------------------------------------------------------- sources


class OutsideImageDirError(PermissionError):
  """A captions row names a file that resolves outside --images (``..``, an absolute path or a
  symlink pointing out); such examples are skipped and counted like unreadable images."""


class FolderSource:
  """Images under ``image_dir`` listed in a JSONL file: {"file", "caption"[, "caption2"][, "id"]}.

  A malformed line is an error naming the file and line; so is a repeated id (or file, when ids
  are not given), naming both lines. A ``file`` that resolves outside ``image_dir`` (symlinks
  included) is never opened: reading it raises ``OutsideImageDirError`` (the builder skips it).
  """

  def __init__(self, image_dir: str, captions_jsonl: str):
    if not os.path.isdir(image_dir):
      raise FileNotFoundError(f"image folder {image_dir} does not exist (--images)")
    if not os.path.isfile(captions_jsonl):
      raise FileNotFoundError(
        f"captions file {captions_jsonl} does not exist: --captions takes a JSONL "
        f'file of {{"file": ..., "caption": ...}} lines'
      )
    self.image_dir = image_dir
    self._root = os.path.realpath(image_dir)
    self.rows = []
    first_line: dict[str, int] = {}
    with open(captions_jsonl) as f:
      for n, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          row = json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f"{captions_jsonl}:{n}: not a JSON object ({e})") from None
        if not isinstance(row, dict):
          raise ValueError(f"{captions_jsonl}:{n}: expected a JSON object, got {type(row).__name__}")
        if not isinstance(row.get("file"), str) or not isinstance(row.get("caption"), str):
          raise ValueError(f"{captions_jsonl}:{n}: need string 'file' and 'caption', got {row!r}")
        for k in ("caption2", "id"):
          if row.get(k) is not None and not isinstance(row[k], str):
            raise ValueError(f"{captions_jsonl}:{n}: {k!r} must be a string, got {row[k]!r}")
        eid = str(row.get("id", row["file"]))
        if eid in first_line:
          what = "id" if "id" in row else "file"
          raise ValueError(
            f"{captions_jsonl}:{n}: duplicate {what} {eid!r} (first on line "
            f"{first_line[eid]}); every example needs a unique id"
          )
        first_line[eid] = n
        self.rows.append(row)
    outside = sum(not self._inside(r["file"]) for r in self.rows)
    if outside:
      warnings.warn(
        f"{captions_jsonl}: {outside} file(s) resolve outside {image_dir}; they are "
        "skipped and counted with the unreadable images"
      )

  def _inside(self, file: str) -> bool:
    real = os.path.realpath(os.path.join(self._root, file))
    return os.path.commonpath([real, self._root]) == self._root and real != self._root

  def __len__(self) -> int:
    return len(self.rows)

  def __getitem__(self, i: int) -> dict:
    """{'id', 'caption', 'caption2' (or None), 'image': PIL RGB image} (raises if unreadable)."""
    from PIL import Image

    row = self.rows[i]
    if not self._inside(row["file"]):
      raise OutsideImageDirError(f"{row['file']!r} resolves outside the image folder {self.image_dir}")
    with open(os.path.join(self._root, row["file"]), "rb") as f:
      img = Image.open(io.BytesIO(f.read()))
      img.load()
    return {
      "id": str(row.get("id", row["file"])),
      "caption": row["caption"],
      "caption2": row.get("caption2"),
      "image": img.convert("RGB"),
    }


class TfdsSource:
  """A tfds data source (array_record datasets, no TensorFlow) with image and text features."""

  def __init__(
    self,
    source,
    *,
    name: str,
    split: str,
    image_key: str = "image",
    text_key: str = "caption",
    text_key2: str | None = None,
  ):
    self.source, self.name, self.split = source, name, split
    self.image_key, self.text_key, self.text_key2 = image_key, text_key, text_key2

  @classmethod
  def from_name(cls, name: str, data_dir: str | None, split: str, **kwargs) -> "TfdsSource":
    import tensorflow_datasets as tfds

    return cls(tfds.data_source(name, data_dir=data_dir, split=split), name=name, split=split, **kwargs)

  def __len__(self) -> int:
    return len(self.source)

  @staticmethod
  def _text(v) -> str:
    if isinstance(v, np.ndarray):
      v = v.item()
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)

  def __getitem__(self, i: int) -> dict:
    from PIL import Image

    ex = self.source[i]
    img = np.asarray(ex[self.image_key])
    if img.ndim == 3 and img.shape[-1] == 1:
      img = img[..., 0]
    return {
      "id": f"{self.name}/{self.split}/{i}",
      "caption": self._text(ex[self.text_key]),
      "caption2": self._text(ex[self.text_key2]) if self.text_key2 else None,
      "image": Image.fromarray(img.astype(np.uint8)).convert("RGB"),
    }


# ----------------------------------------------------------------------------- images


def aspect_buckets(resolution: int, multiple: int = 64, max_aspect: float = 2.0) -> list[tuple[int, int]]:
  """Equal-area (h, w) buckets, sides multiples of ``multiple``, area ~ resolution^2."""
  area, out = resolution * resolution, set()
  w = multiple
  while w <= resolution * max_aspect + 1e-9:
    h = max(multiple, int(round(area / w / multiple)) * multiple)
    if max(h / w, w / h) <= max_aspect + 1e-9:
      out.add((h, w))
    w += multiple
  return sorted(out, key=lambda hw: hw[1] / hw[0])


def choose_bucket(height: int, width: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
  r = math.log(width / height)
  return min(buckets, key=lambda hw: abs(math.log(hw[1] / hw[0]) - r))


def crop_resize(img, height: int, width: int) -> np.ndarray:
  """Centre crop to the target aspect, bicubic resize; float32 [height, width, 3] in [-1, 1]."""
  from PIL import Image

  w0, h0 = img.size
  target = width / height
  if w0 / h0 > target:  # too wide
    cw, ch = max(1, round(h0 * target)), h0
  else:
    cw, ch = w0, max(1, round(w0 / target))
  left, top = (w0 - cw) // 2, (h0 - ch) // 2
  img = img.crop((left, top, left + cw, top + ch)).resize((width, height), Image.BICUBIC)
  return np.asarray(img, np.float32) / 127.5 - 1.0


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
  from sd3_jax import pretrained
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
      hw = choose_bucket(ex["image"].height, ex["image"].width, buckets) if buckets else (resolution, resolution)
      pixels = crop_resize(ex["image"], *hw)
    except Exception as e:  # unreadable / corrupt image or record
      warnings.warn(f"skipping example {i}: {type(e).__name__}: {e}")
      skipped.append(str(i))
      progress.update(1)
      continue
    caption, which = choose_caption(seed, ex["id"], ex["caption"], ex.get("caption2"))
    key = f"{hw[0]}x{hw[1]}" if buckets else ""
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


# ----------------------------------------------------------------------------- CLI


def main(argv=None, *, image_encoder: ImageEncoder | None = None, text_encoder: TextEncoderFn | None = None) -> dict:
  p = argparse.ArgumentParser(
    prog="sd3-build-dataset", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--out", required=True)
  p.add_argument("--images", help="image folder (with --captions JSONL)")
  p.add_argument("--captions", help="JSONL: {file, caption[, caption2][, id]}")
  p.add_argument("--tfds", help="tensorflow-datasets name (array_record format)")
  p.add_argument("--tfds_data_dir")
  p.add_argument("--split", default="train")
  p.add_argument("--image_key", default="image")
  p.add_argument("--text_key", default="caption")
  p.add_argument("--text_key2", help="second caption feature, mixed 50/50")
  p.add_argument("--resolution", type=int, default=256)
  p.add_argument("--buckets", action="store_true", help="equal-area aspect buckets, one subdirectory each")
  p.add_argument("--bucket_multiple", type=int, default=64)
  p.add_argument("--max_aspect", type=float, default=2.0)
  p.add_argument("--vae", help="our converted SD3 VAE checkpoint")
  p.add_argument(
    "--identity_vae",
    "--pixel_space",
    dest="identity_vae",
    action="store_true",
    help="store the [-1, 1] image as the latent (pixel-space models)",
  )
  p.add_argument("--latent_sample", choices=["mean", "sample"], default="mean")
  p.add_argument("--latent_dtype", choices=["float16", "bfloat16", "float32"], default="float16")
  p.add_argument("--text_encoders", help="directory for SD3TextConditioner.from_pretrained")
  p.add_argument("--no_t5", action="store_true")
  p.add_argument("--t5_length", type=int, default=77)
  p.add_argument("--clip_length", type=int, default=77, help="CLIP tokens (77 as SD3)")
  p.add_argument(
    "--project_clip_l",
    action="store_true",
    help="store CLIP-L's projected pooled vector (as diffusers) instead of the reference's "
    "un-projected one; identical when its text_projection is the identity (SD3)",
  )
  p.add_argument("--dtype", default="float32", help="encoder compute dtype")
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--chunk_size", type=int, default=1000)
  p.add_argument("--records_per_shard", type=int, default=1000)
  p.add_argument("--prefix", default="data")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--process_index", type=int)
  p.add_argument("--process_count", type=int)
  args = p.parse_args(argv)

  if bool(args.tfds) == bool(args.images or args.captions):
    p.error("give either --images and --captions, or --tfds")
  if args.tfds:
    source = TfdsSource.from_name(
      args.tfds,
      args.tfds_data_dir,
      args.split,
      image_key=args.image_key,
      text_key=args.text_key,
      text_key2=args.text_key2,
    )
  else:
    if not (args.images and args.captions):
      p.error("--images and --captions go together")
    source = FolderSource(args.images, args.captions)
  if image_encoder is None:
    if args.identity_vae:
      image_encoder = identity_image_encoder
    elif args.vae:
      image_encoder = load_vae_encoder(
        args.vae, sample=args.latent_sample == "sample", seed=args.seed, dtype=args.dtype
      )
    else:
      p.error("give --vae DIR, or --identity_vae for pixel-space models")
  if text_encoder is None:
    if not args.text_encoders:
      p.error("give --text_encoders DIR")
    from sd3_jax import text_conditioning

    text_encoder = text_conditioning.load_conditioner(
      args.text_encoders,
      dtype=args.dtype,
      use_t5=not args.no_t5,
      t5_length=args.t5_length,
      clip_length=args.clip_length,
      project_clip_l=args.project_clip_l,
    ).encode
  if args.process_index is None or args.process_count is None:
    import jax

    args.process_index = jax.process_index() if args.process_index is None else args.process_index
    args.process_count = jax.process_count() if args.process_count is None else args.process_count
  buckets = aspect_buckets(args.resolution, args.bucket_multiple, args.max_aspect) if args.buckets else None
  metadata = {
    "source": f"tfds:{args.tfds}/{args.split}" if args.tfds else f"folder:{args.captions}",
    "vae": "identity" if args.identity_vae else args.vae,
    "latent_sample": args.latent_sample,
    "text_encoders": args.text_encoders,
    "caption_mixing": "50/50 by (seed, id)",
    "clip_l_pooled": "projected" if args.project_clip_l else "un-projected (reference)",
  }
  result = build(
    source,
    args.out,
    image_encoder=image_encoder,
    text_encoder=text_encoder,
    resolution=args.resolution,
    buckets=buckets,
    batch_size=args.batch_size,
    chunk_size=args.chunk_size,
    records_per_shard=args.records_per_shard,
    seed=args.seed,
    prefix=args.prefix,
    latent_dtype=args.latent_dtype,
    process_index=args.process_index,
    process_count=args.process_count,
    metadata=metadata,
  )
  s = result["summary"]
  print(
    f"process {args.process_index}/{args.process_count}: built chunks {result['processed_chunks']}, "
    f"skipped {result['skipped_examples']} unreadable example(s) in them"
  )
  if s is None:
    print("other processes' chunks are not finished yet; the last one to finish writes dataset_info.json")
  else:
    print(
      f"dataset complete: {s['num_records']} records in {s['directories']}, "
      f"{s['skipped_examples']} unreadable example(s) skipped in all"
    )
  return result


def entry_point() -> None:
  """Console entry point (``sd3-build-dataset``): expected errors end in one line and exit code 2."""
  command.run(main, "sd3-build-dataset")


if __name__ == "__main__":
  entry_point()
