"""Per-leaf checksums of our checkpoints (``sd3_jax.storage.pretrained``): what ``write_checkpoint``
records in ``sd3_jax_config.json`` and what loading checks, so that damaged bytes in
``params/`` are an error naming the leaf instead of a model that silently outputs NaN.

A checksum is the SHA-256 of the leaf's stored bytes (C order, the dtype it is stored in),
written as ``"sha256:<hex>"``. It protects against damage in transit or on disk, not against
someone who can also rewrite the metadata file.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
from typing import Callable, Mapping

import numpy as np

from sd3_jax.models import mmdit

ALGORITHM = "sha256"


def leaf_checksum(array) -> str:
  """``"sha256:<hex>"`` of an array's bytes as stored (C order, its own dtype)."""
  a = np.ascontiguousarray(array)
  return f"{ALGORITHM}:{hashlib.sha256(a.reshape(-1).view(np.uint8).data).hexdigest()}"


def check_checksums(flat: Mapping[str, np.ndarray], checksums: Mapping[str, str], where: str) -> None:
  """Raises ValueError naming every leaf of ``flat`` whose bytes do not match ``checksums``
  (a leaf without a recorded checksum counts as damaged metadata)."""
  unlisted = [name for name in flat if name not in checksums]
  listed = [name for name in flat if name in checksums]
  # hashlib releases the GIL on large buffers: hash the leaves of a group in parallel.
  with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
    sums = list(pool.map(lambda name: leaf_checksum(flat[name]), listed))
  damaged = [name for name, got in zip(listed, sums) if got != checksums[name]]
  if damaged or unlisted:
    parts = []
    if damaged:
      parts.append(
        f"damaged parameter(s) {damaged[:10]}: their bytes do not match the checksum written with the checkpoint"
      )
    if unlisted:
      parts.append(f"parameter(s) {unlisted[:10]} have no checksum in the metadata")
    raise ValueError(
      f"{where}: " + "; ".join(parts) + ". Copy the checkpoint again from a good "
      "source (or load with verify=False / --no-verify to accept it as it is)"
    )


def recording(sums: dict, name: str, load: Callable[[], np.ndarray]) -> Callable[[], np.ndarray]:
  """``load`` that also stores the produced array's checksum in ``sums[name]``."""

  def produce():
    arr = np.asarray(load())
    sums[name] = leaf_checksum(arr)
    return arr

  return produce


def check_stored_grid(config, stored: Mapping[str, tuple], where) -> None:
  """The expected shapes of an MM-DiT come from building its sin-cos table (pos_embed_max_size^2 x
  hidden floats), so the stored table's shape (``stored``: name -> (shape, dtype)) is checked
  first: a config claiming a huge grid is refused before that allocation instead of after it."""
  if not isinstance(config, mmdit.MMDiTConfig):
    return
  want = (1, config.pos_embed_max_size**2, config.hidden_size)
  have = tuple(stored["pos_embed"][0]) if "pos_embed" in stored else None
  if have != want:
    raise ValueError(
      f"checkpoint {where}: pos_embed is stored as {have}, but the config "
      f"(pos_embed_max_size {config.pos_embed_max_size}, hidden_size "
      f"{config.hidden_size}) needs {list(want)}"
    )
