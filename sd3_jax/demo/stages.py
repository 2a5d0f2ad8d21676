"""The demo's data and scoring stages, shared with the toy scaling study (``scaling/toy.py``):
scenes as a dataset-builder source, records from them, the chance level of the scenes checker,
labelled sample grids, and the loss curves read back from ``metrics.jsonl``."""

from __future__ import annotations

import collections
import json
import os
from typing import Sequence

import numpy as np

from sd3_jax.demo import scenes as scene_lib


# ---------------------------------------------------------------------------------------------
# Data


class SceneSource:
  """Random-access dataset-builder source of rendered scenes: example i draws its caption
  combination and its jitter from (seed, i)."""

  def __init__(self, scenes: Sequence[scene_lib.Scene], n: int, *, size: int, seed: int, name: str):
    self.scenes, self.n, self.size, self.seed, self.name = list(scenes), n, size, seed, name

  def __len__(self) -> int:
    return self.n

  def scene(self, i: int) -> scene_lib.Scene:
    return self.scenes[int(np.random.default_rng([self.seed, i, 0]).integers(len(self.scenes)))]

  def image(self, i: int) -> np.ndarray:
    return scene_lib.render(self.scene(i), self.size, np.random.default_rng([self.seed, i, 1]))

  def __getitem__(self, i: int) -> dict:
    from PIL import Image

    return {
      "id": f"{self.name}-{i:07d}",
      "caption": self.scene(i).caption,
      "caption2": None,
      "image": Image.fromarray(self.image(i)),
    }


def finished_records(out_dir: str, n: int) -> dict | None:
  """``out_dir``'s dataset_info.json when its records are complete, None when they are not
  (yet); a ValueError when they are complete with another count."""
  info = os.path.join(out_dir, "dataset_info.json")
  if not os.path.exists(info):
    return None
  with open(info) as f:
    found = json.load(f)
  if found.get("num_records") != n:
    raise ValueError(
      f"{out_dir} holds {found.get('num_records')} records but {n} were asked for; remove {out_dir} to rebuild it"
    )
  return found


def build_records(source, out_dir: str, conditioner, *, resolution: int) -> dict:
  """Records of ``source`` in ``out_dir`` (the dataset builder; resumes by chunks), or the
  finished ones' dataset_info.json."""
  from sd3_jax.data import builder

  found = finished_records(out_dir, len(source))
  if found is not None:
    return found
  result = builder.build(
    source,
    out_dir,
    image_encoder=builder.identity_image_encoder,
    text_encoder=conditioner.encode,
    resolution=resolution,
    batch_size=256,
    chunk_size=5000,
    records_per_shard=5000,
    latent_dtype="float16",
    metadata={"source": f"sd3_jax.demo {source.name}", "vae": "identity (pixel space)"},
  )
  return result["summary"]


# ---------------------------------------------------------------------------------------------
# Evaluation


def chance_accuracy(
  images: Sequence[np.ndarray], scenes: Sequence[scene_lib.Scene], trials: int = 20, seed: int = 0
) -> dict[str, float]:
  """The checker's score for the same images against shuffled captions: each prompt's images
  are scored against a different held-out prompt (a random derangement), averaged over trials."""
  rng = np.random.default_rng(seed)
  unique = list(dict.fromkeys(scenes))
  n = len(unique)
  if n < 2:
    raise ValueError("chance level needs at least two different prompts")
  index = {s: i for i, s in enumerate(unique)}
  totals: dict[str, float] = collections.defaultdict(float)
  for _ in range(trials):
    while True:
      perm = rng.permutation(n)
      if not np.any(perm == np.arange(n)):
        break
    acc = scene_lib.accuracy(list(images), [unique[perm[index[s]]] for s in scenes])
    for k, v in acc.items():
      totals[k] += v / trials
  return dict(totals)


def write_labelled_grid(
  images: np.ndarray, prompts: Sequence[str], per_prompt: int, path: str, scale: int = 2, rows_per_block: int = 12
) -> None:
  """Each prompt's text followed by its ``per_prompt`` samples (upscaled ``scale``x, nearest);
  prompts run down blocks of ``rows_per_block`` rows, blocks side by side."""
  from PIL import Image, ImageDraw

  _, h, w, _ = images.shape
  h, w, pad, text_w = h * scale, w * scale, 4, 215
  rows = min(rows_per_block, len(prompts))
  blocks = -(-len(prompts) // rows)
  block_w = text_w + per_prompt * (w + pad) + 3 * pad
  grid = Image.new("RGB", (blocks * block_w, rows * (h + pad) + pad), (255, 255, 255))
  draw = ImageDraw.Draw(grid)
  for i, prompt in enumerate(prompts):
    b, r = divmod(i, rows)
    x0, y = b * block_w + pad, pad + r * (h + pad)
    draw.text((x0, y + h // 2 - 6), prompt, fill=(0, 0, 0))
    for q in range(per_prompt):
      im = Image.fromarray(images[i * per_prompt + q]).resize((w, h), Image.NEAREST)
      grid.paste(im, (x0 + text_w + q * (w + pad), y))
  grid.save(path)


def interior_val_loss(record: dict) -> float | None:
  """Mean of a validation record's per-level losses over 0 < t < 1 (the t = 0 level cannot go
  below ~1: the clean input says nothing about the noise in the velocity target; t = 1 sees
  pure noise)."""
  levels = {float(k[len("val/loss_t") :]): v for k, v in record.items() if k.startswith("val/loss_t")}
  inner = [v for t, v in levels.items() if 0.0 < t < 1.0]
  return float(np.mean(inner)) if inner else None


def read_metrics(path: str) -> list[dict]:
  """The records of a metrics.jsonl file, in order."""
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def last_record(records: Sequence[dict], key: str) -> dict:
  """The last record that has ``key`` ({} if none)."""
  return next((r for r in reversed(records) if key in r), {})


def plot_losses(records: Sequence[dict], out_path: str) -> None:
  """Training loss, validation loss and its interior levels (``interior_val_loss``) of
  ``read_metrics`` records, log scale."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  train, val, interior = [], [], []
  for rec in records:
    if "loss" in rec:
      train.append((rec["step"], rec["loss"]))
    if "val/loss" in rec:
      val.append((rec["step"], rec["val/loss"]))
      if interior_val_loss(rec) is not None:
        interior.append((rec["step"], interior_val_loss(rec)))
  fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
  if train:
    ax.plot(*zip(*train), ".-" if len(train) < 20 else "-", label="train loss (logit-normal t)")
  if val:
    ax.plot(*zip(*val), "o-", label="val loss (held-out prompts, fixed t levels)")
  if interior:
    ax.plot(*zip(*interior), "s--", label="val loss, levels 0 < t < 1")
  ax.set_yscale("log")
  ax.set_xlabel("step")
  ax.set_ylabel("rectified-flow loss")
  ax.set_title("sd3_jax embedded demo")
  ax.grid(alpha=0.3, which="both")
  ax.legend()
  fig.tight_layout()
  fig.savefig(out_path)
  plt.close(fig)
