"""Mixed aspect ratios in one run: several aspect buckets (one record directory each, as the
dataset builder writes them with ``--buckets``), every global batch from a single bucket.

* ``bucket_dir`` / ``latent_bucket_dir``: a bucket's directory name, its pixel size ``HxW``
  (latent size times the VAE factor): the one naming the builder writes and the trainer reads.
* ``bucket_of_step``: the bucket of global step k, drawn in proportion to the buckets' sizes
  from a generator seeded by (seed, k) alone, so the sequence does not depend on restarts.
* ``BucketedIterator``: one grain iterator per bucket; ``next`` gives (bucket, host batch) and
  advances only that bucket's iterator. Its state (the step and every bucket's position) is
  saved with the checkpoint through grain's orbax handler, so resume is exact.

Each bucket's latent shape compiles its own train step once (jax.jit caches one executable
per input shape).
"""

from __future__ import annotations

import json
from typing import Sequence

import numpy as np

_STREAM = 0xB0C5  # separates the bucket draws from other uses of the seed


def bucket_dir(pixel_hw: Sequence[int]) -> str:
  """A bucket's directory name: its pixel size, e.g. '512x384' (what the builder writes and the
  trainer reads)."""
  h, w = pixel_hw
  return f"{int(h)}x{int(w)}"


def latent_bucket_dir(latent_hw: Sequence[int], pixels_per_latent: int) -> str:
  """The directory of the bucket whose latents are ``latent_hw`` (pixels = latents x factor)."""
  return bucket_dir([s * pixels_per_latent for s in latent_hw])


def bucket_name(latent_hw: Sequence[int]) -> str:
  """The metric-name suffix of a bucket: its latent size, e.g. '32x24'."""
  return f"{latent_hw[0]}x{latent_hw[1]}"


def bucket_of_step(sizes: Sequence[int], seed: int, step: int) -> int:
  """Index of the bucket that global step ``step`` trains on (probability size / total)."""
  p = np.asarray(sizes, np.float64)
  if p.ndim != 1 or len(p) == 0 or np.any(p <= 0):
    raise ValueError(f"bucket sizes must be positive, got {list(sizes)}")
  rng = np.random.default_rng([int(seed), _STREAM, int(step)])
  return int(rng.choice(len(p), p=p / p.sum()))


class BucketedIterator:
  """(bucket index, host batch) per global step; checkpointable by grain's orbax handler
  (``get_state`` -> bytes, ``set_state(bytes)``)."""

  def __init__(self, iterators: Sequence, sizes: Sequence[int], seed: int):
    if len(iterators) != len(sizes) or not iterators:
      raise ValueError("one iterator per bucket size is needed")
    self.iterators, self.sizes, self.seed = list(iterators), [int(s) for s in sizes], int(seed)
    self.step = 0

  def __iter__(self):
    return self

  def __next__(self):
    b = bucket_of_step(self.sizes, self.seed, self.step)
    batch = next(self.iterators[b])
    self.step += 1
    return b, batch

  def get_state(self) -> bytes:
    return json.dumps(
      {"step": self.step, "sizes": self.sizes, "buckets": [it.get_state() for it in self.iterators]}
    ).encode()

  def set_state(self, state: bytes) -> None:
    s = json.loads(state)
    if s["sizes"] != self.sizes:
      raise ValueError(
        f"the checkpoint's buckets have sizes {s['sizes']} but this run's have "
        f"{self.sizes}: resume with the same bucket directories"
      )
    for it, st in zip(self.iterators, s["buckets"]):
      it.set_state(st)
    self.step = int(s["step"])

  def start_prefetch(self) -> None:  # grain's handler calls it after set_state
    for it in self.iterators:
      if hasattr(it, "start_prefetch"):
        it.start_prefetch()
