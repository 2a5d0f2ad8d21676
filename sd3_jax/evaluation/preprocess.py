"""CLIP image preprocessing on device, equal to the reference: resize the shortest side to 224
with bicubic filtering, centre crop 224 x 224, scale to [0, 1], normalise with CLIP's mean/std.

The reference is transformers' ``CLIPImageProcessor`` (its PIL backend: ``PIL.Image.resize``
with ``BICUBIC``) and clean-fid's CLIP mode (torchvision's ``Resize`` on a PIL image: the same
PIL call). PIL resizes 8-bit images with its own fixed-point algorithm (Pillow's
``libImaging/Resample.c``): separable, horizontal pass first, a bicubic kernel (a = -0.5)
stretched by the downscale factor (antialiasing), coefficients normalised in double precision
and quantised to 22 fractional bits, integer accumulation, and the intermediate image rounded
and clipped to uint8 between the passes. A float bicubic resize (``jax.image.resize``) differs
from it by up to a few grey levels, so this module reproduces the integer algorithm exactly:
the coefficient matrices are built on the host (they depend only on the sizes) and applied on
device as int32 matmuls, bit-exact with PIL.

  preprocess(images uint8 [B, H, W, 3], ...) -> float32 [B, 224, 224, 3]   one image size
  preprocess_list([uint8 [Hi, Wi, 3], ...], ...) -> float32 [N, 224, 224, 3] mixed sizes,
      padded to a few size buckets so that real-image folders compile a handful of times.

``crop_rounding``: 'floor' is transformers' centre crop (top = (h - 224) // 2); 'round' is
torchvision's (round half to even), which clean-fid uses. They differ by one pixel when h - 224
is odd.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sd3_jax.models.clip_vision import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed point for 8-bit images
BICUBIC_SUPPORT = 2.0
CROP_ROUNDING = ("floor", "round")


def _bicubic(x: float) -> float:
  """Pillow's bicubic kernel (a = -0.5)."""
  a = -0.5
  x = abs(x)
  if x < 1.0:
    return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
  if x < 2.0:
    return (((x - 5) * x + 8) * x - 4) * a
  return 0.0


@functools.lru_cache(maxsize=256)
def pil_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out_size, in_size] int32: Pillow's fixed-point coefficients of a bicubic resize along one
  axis (``precompute_coeffs`` + ``normalize_coeffs_8bpc``), in the same double arithmetic."""
  scale = in_size / out_size
  filterscale = max(scale, 1.0)
  support = BICUBIC_SUPPORT * filterscale
  ss = 1.0 / filterscale
  one = float(1 << PRECISION_BITS)
  m = np.zeros((out_size, in_size), np.int32)
  for xx in range(out_size):
    center = (xx + 0.5) * scale
    xmin = max(int(center - support + 0.5), 0)  # C casts truncate toward zero, as int()
    xmax = min(int(center + support + 0.5), in_size) - xmin
    k = [_bicubic((x + xmin - center + 0.5) * ss) for x in range(xmax)]
    ww = sum(k)  # summed in order, as the C loop
    for x, w in enumerate(k):
      w = w / ww if ww != 0.0 else w
      m[xx, xmin + x] = int(-0.5 + w * one) if w < 0 else int(0.5 + w * one)
  return m


def resized_size(h: int, w: int, shortest_edge: int) -> tuple[int, int]:
  """(height, width) after resizing the shortest side to ``shortest_edge`` (the long side is
  truncated, as transformers and torchvision compute it)."""
  if w <= h:
    return int(shortest_edge * h / w), shortest_edge
  return shortest_edge, int(shortest_edge * w / h)


def _crop_offset(size: int, crop: int, rounding: str) -> int:
  if rounding == "floor":
    return (size - crop) // 2
  return int(round((size - crop) / 2.0))


def resize_crop_matrices(
  h: int, w: int, *, size: int = 224, crop_size: int = 224, crop_rounding: str = "floor"
) -> tuple[np.ndarray, np.ndarray]:
  """(rows [crop, h], cols [crop, w]) int32: the resize coefficients of the rows and columns
  that the centre crop keeps. An axis that keeps its size gets the identity (PIL skips it;
  the fixed-point identity is exact)."""
  if crop_rounding not in CROP_ROUNDING:
    raise ValueError(f"crop_rounding must be one of {CROP_ROUNDING}, got {crop_rounding!r}")
  if crop_size > size:
    raise ValueError(f"crop_size {crop_size} is larger than the resized shortest side {size}")
  if h < 1 or w < 1:
    raise ValueError(f"empty image of size {h}x{w}")
  nh, nw = resized_size(h, w, size)
  top, left = _crop_offset(nh, crop_size, crop_rounding), _crop_offset(nw, crop_size, crop_rounding)
  rows = np.eye(h, dtype=np.int32) << PRECISION_BITS if nh == h else pil_bicubic_matrix(h, nh)
  cols = np.eye(w, dtype=np.int32) << PRECISION_BITS if nw == w else pil_bicubic_matrix(w, nw)
  return rows[top : top + crop_size], cols[left : left + crop_size]


def _pass(x: jax.Array, m: jax.Array, spec: str) -> jax.Array:
  """One 8-bit pass: integer accumulation with a rounding offset, then >> 22 and clip."""
  acc = jnp.einsum(spec, x, m, preferred_element_type=jnp.int32) + (1 << (PRECISION_BITS - 1))
  return jnp.clip(jnp.right_shift(acc, PRECISION_BITS), 0, 255)


def resize_crop_normalize(images, rows, cols, mean, std):
  """images uint8 [B, H, W, 3]; rows [C, H] and cols [C, W] int32 (``resize_crop_matrices``),
  or [B, C, H] / [B, C, W] per image -> float32 [B, C, C, 3]. Traceable (use inside jit)."""
  x = images.astype(jnp.int32)
  per_image = rows.ndim == 3
  x = _pass(x, cols, "bhwc,bow->bhoc" if per_image else "bhwc,ow->bhoc")  # horizontal first, as Pillow
  x = _pass(x, rows, "bhwc,boh->bowc" if per_image else "bhwc,oh->bowc")
  return (x.astype(jnp.float32) * jnp.float32(1 / 255) - mean) / std


_resize_crop_normalize = jax.jit(resize_crop_normalize)


def check_uint8(images, what: str):
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(
      f"{what} must be uint8 RGB images [B, H, W, 3], got {images.dtype} {tuple(images.shape)}; "
      "convert float images with sd3_jax.inference.generation.to_uint8"
    )


def preprocess(
  images,
  *,
  size: int = 224,
  crop_size: int = 224,
  crop_rounding: str = "floor",
  mean: Sequence[float] = OPENAI_CLIP_MEAN,
  std: Sequence[float] = OPENAI_CLIP_STD,
) -> jax.Array:
  """uint8 [B, H, W, 3] (numpy or jax, any size) -> CLIP pixel values float32 [B, crop, crop, 3]
  (channels last), computed on device. See the module docstring."""
  check_uint8(images, "images")
  rows, cols = resize_crop_matrices(
    images.shape[1], images.shape[2], size=size, crop_size=crop_size, crop_rounding=crop_rounding
  )
  return _resize_crop_normalize(
    jnp.asarray(images), rows, cols, jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)
  )


def bucket(n: int, multiple: int = 64) -> int:
  return int(math.ceil(n / multiple) * multiple)


def preprocess_list(
  images: Sequence[np.ndarray],
  *,
  size: int = 224,
  crop_size: int = 224,
  crop_rounding: str = "floor",
  mean: Sequence[float] = OPENAI_CLIP_MEAN,
  std: Sequence[float] = OPENAI_CLIP_STD,
  multiple: int = 64,
) -> jax.Array:
  """Images of different sizes (uint8 [Hi, Wi, 3] each) -> float32 [N, crop, crop, 3].

  Every image is zero-padded to the batch's largest height and width rounded up to
  ``multiple``; its coefficient matrices get zero columns there, so the padding never
  contributes and the result equals ``preprocess`` of each image alone. One compile per
  bucket shape."""
  if not images:
    raise ValueError("no images")
  for i, im in enumerate(images):
    check_uint8(np.asarray(im)[None], f"image {i}")
  hp = bucket(max(im.shape[0] for im in images), multiple)
  wp = bucket(max(im.shape[1] for im in images), multiple)
  batch = np.zeros((len(images), hp, wp, 3), np.uint8)
  rows = np.zeros((len(images), crop_size, hp), np.int32)
  cols = np.zeros((len(images), crop_size, wp), np.int32)
  for i, im in enumerate(images):
    h, w = im.shape[:2]
    batch[i, :h, :w] = im
    r, c = resize_crop_matrices(h, w, size=size, crop_size=crop_size, crop_rounding=crop_rounding)
    rows[i, :, :h], cols[i, :, :w] = r, c
  return _resize_crop_normalize(
    jnp.asarray(batch),
    jnp.asarray(rows),
    jnp.asarray(cols),
    jnp.asarray(mean, jnp.float32),
    jnp.asarray(std, jnp.float32),
  )
