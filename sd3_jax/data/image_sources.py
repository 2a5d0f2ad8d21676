"""Where the dataset builder's images come from, and how they are cut: a folder of images listed
in a captions JSONL (``FolderSource``), any tensorflow-datasets dataset read without TensorFlow
(``TfdsSource``), equal-area aspect buckets and the centre crop + resize to a bucket."""

from __future__ import annotations

import io
import json
import math
import os
import warnings
from typing import Sequence

import numpy as np

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
