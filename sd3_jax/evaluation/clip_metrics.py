"""CLIP features of images and prompts, sharded over a device mesh, and the metrics built on
them: CLIP score (Hessel et al. 2021) and FID on CLIP features (clean-fid's ``clip_vit_b_32``
mode: the projected image embedding of OpenAI's ViT-B/32, unnormalised).

  CLIPFeatures.from_pretrained(DIR)   our converted CLIP checkpoint (format sd3_jax.clip, from a
                                      transformers CLIPModel directory; its tokenizer in DIR/tokenizer)
  .image_features(images uint8 [N, H, W, 3])   -> LocalRows: this process's rows of the
                                      [N, P] embeddings (preprocessed on device, module preprocess)
  .clip_scores(images, prompts)       -> LocalRows of 100 * max(cos, 0), one per image/prompt pair
  clip_score(image_embeds, text_embeds)   the same on arrays (tests, small sets)

Multi-host: every process holds the same images (the sampler returns them replicated). A batch
is laid out over the mesh's batch axes ('data', 'fsdp') with ``jax.make_array_from_callback``;
each process keeps the rows its devices computed (``LocalRows``) and the statistics are merged
across processes afterwards (``stats.FeatureStats.all_reduce``, ``stats.all_reduce_sum``).
"""

from __future__ import annotations

import os
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sd3_jax import sharding
from sd3_jax.evaluation import preprocess as pp
from sd3_jax.models import clip_vision as cv

HESSEL_SCALE = 100.0  # the common CLIP-score convention (Hessel et al. use 2.5 instead)


class LocalRows(NamedTuple):
  """The rows of a global [N, ...] result that this process computed: ``index`` [n] row
  numbers and ``values`` [n, ...] (float32)."""

  index: np.ndarray
  values: np.ndarray


def clip_score(image_embeds, text_embeds) -> np.ndarray:
  """Per-pair CLIP score 100 * max(cos(image, text), 0) [N] (float32 math, as the models')."""
  i = jnp.asarray(image_embeds, jnp.float32)
  t = jnp.asarray(text_embeds, jnp.float32)
  cos = jnp.sum(i * t, -1) / (jnp.linalg.norm(i, axis=-1) * jnp.linalg.norm(t, axis=-1))
  return np.asarray(HESSEL_SCALE * jnp.maximum(cos, 0.0))


def _local_rows(out: jax.Array, n: int) -> LocalRows:
  """This process's unique rows of a batch-sharded global array, without the padding."""
  index, values = [], []
  for s in out.addressable_shards:
    if s.replica_id != 0:
      continue
    rows = np.arange(out.shape[0])[s.index[0]]
    keep = rows < n
    index.append(rows[keep])
    values.append(np.asarray(s.data)[keep])
  if not index:
    return LocalRows(np.zeros((0,), np.int64), np.zeros((0,) + out.shape[1:], np.float32))
  order = np.argsort(np.concatenate(index))
  return LocalRows(np.concatenate(index)[order], np.concatenate(values)[order])


class CLIPFeatures:
  """A CLIPModel, its parameters and tokenizer; feature extraction jitted over ``mesh``
  (default: every device on the batch axes). ``crop_rounding`` applies to ``image_features``
  (FID): 'round' is clean-fid's torchvision centre crop; CLIP scores always crop as
  transformers' CLIPImageProcessor ('floor')."""

  def __init__(
    self,
    model: cv.CLIPModel,
    params,
    tokenizer=None,
    *,
    mesh=None,
    batch_size: int = 64,
    crop_rounding: str = "round",
    description: Optional[dict] = None,
  ):
    if not isinstance(model, cv.CLIPModel):
      raise ValueError(
        f"CLIP metrics need a CLIPModel (both towers), got {type(model).__name__}; convert a "
        "transformers CLIPModel directory with `sd3-convert --to jax`"
      )
    self.model, self.tokenizer = model, tokenizer
    self.mesh = mesh if mesh is not None else sharding.make_mesh(1, -1, 1)
    self.params = jax.device_put(params, sharding.replicated(self.mesh))
    shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
    self.batch_size = max(shards, -(-int(batch_size) // shards) * shards)  # a multiple of the shards
    self.crop_rounding = crop_rounding
    v = model.config.vision
    self.image_size = v.image_size
    self.description = dict(
      description or {}, image_size=v.image_size, projection_dim=v.projection_dim, crop_rounding=crop_rounding
    )
    batch = lambda ndim: sharding.batch_sharding(self.mesh, ndim)
    rep = sharding.replicated(self.mesh)
    mean, std = jnp.asarray(cv.OPENAI_CLIP_MEAN), jnp.asarray(cv.OPENAI_CLIP_STD)

    def images_fn(params, images, rows, cols):
      pixels = pp.resize_crop_normalize(images, rows, cols, mean, std)
      return model.apply({"params": params}, pixels, method=model.encode_image)

    def scores_fn(params, images, rows, cols, ids):
      img = images_fn(params, images, rows, cols)
      txt = model.apply({"params": params}, ids, method=model.encode_text)
      cos = jnp.sum(img * txt, -1) / (jnp.linalg.norm(img, axis=-1) * jnp.linalg.norm(txt, axis=-1))
      return HESSEL_SCALE * jnp.maximum(cos, 0.0)

    self._images = jax.jit(images_fn, in_shardings=(rep, batch(4), rep, rep), out_shardings=batch(2))
    self._images_each = jax.jit(images_fn, in_shardings=(rep, batch(4), batch(3), batch(3)), out_shardings=batch(2))
    self._scores = jax.jit(scores_fn, in_shardings=(rep, batch(4), rep, rep, batch(2)), out_shardings=batch(1))

  @classmethod
  def from_pretrained(cls, path, *, tokenizer_path: Optional[str] = None, dtype=jnp.float32, **kwargs):
    """From our converted CLIP checkpoint; the tokenizer from ``tokenizer_path`` or DIR/tokenizer."""
    from sd3_jax.storage import pretrained
    from sd3_jax import text_conditioning

    model, params = pretrained.load_pretrained(path, dtype=dtype)
    tok_dir = tokenizer_path or os.path.join(os.fspath(path), "tokenizer")
    tokenizer = text_conditioning.load_tokenizer(tok_dir) if os.path.isdir(tok_dir) else None
    if tokenizer_path and tokenizer is None:
      raise FileNotFoundError(f"no tokenizer directory {tokenizer_path}")
    desc = {"checkpoint": os.path.abspath(os.fspath(path)), "config": model.config.to_dict()}
    return cls(model, params, tokenizer, description=desc, **kwargs)

  def _matrices(self, h: int, w: int):
    s = self.image_size
    return pp.resize_crop_matrices(h, w, size=s, crop_size=s, crop_rounding=self.crop_rounding)

  def _global(self, x: np.ndarray) -> jax.Array:
    return jax.make_array_from_callback(x.shape, sharding.batch_sharding(self.mesh, x.ndim), lambda i: x[i])

  def _batches(self, n: int):
    if n == 0:
      raise ValueError("no images")
    for start in range(0, n, self.batch_size):
      yield start, min(start + self.batch_size, n)

  def _pad(self, x: np.ndarray) -> np.ndarray:
    k = self.batch_size - len(x)
    return x if k == 0 else np.concatenate([x, np.repeat(x[-1:], k, 0)], 0)

  def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
    if self.tokenizer is None:
      raise ValueError(
        "CLIP score needs the CLIP tokenizer: convert a transformers CLIPModel directory that "
        "holds vocab.json/merges.txt (copied to DIR/tokenizer), or pass tokenizer_path"
      )
    from sd3_jax import text_conditioning

    return text_conditioning.tokenize_clip(
      self.tokenizer, prompts, length=self.model.config.text.max_position_embeddings
    )

  def image_features(self, images: np.ndarray) -> LocalRows:
    """This process's rows of the [N, P] image embeddings of uint8 images [N, H, W, 3]."""
    images = np.asarray(images)
    pp.check_uint8(images, "images")
    rows, cols = (jnp.asarray(m) for m in self._matrices(*images.shape[1:3]))
    parts = []
    for a, b in self._batches(len(images)):
      out = self._images(self.params, self._global(self._pad(images[a:b])), rows, cols)
      r = _local_rows(out, b - a)
      parts.append(LocalRows(r.index + a, r.values))
    return LocalRows(np.concatenate([p.index for p in parts]), np.concatenate([p.values for p in parts]))

  def image_features_of_list(self, images: Sequence[np.ndarray]) -> LocalRows:
    """The same for images of different sizes (uint8 [Hi, Wi, 3] each, e.g. a real-image
    folder): each batch is zero-padded to a size bucket (``preprocess.preprocess_list``)."""
    parts = []
    for a, b in self._batches(len(images)):
      chunk = [np.asarray(im) for im in images[a:b]]
      chunk += [chunk[-1]] * (self.batch_size - len(chunk))
      for i, im in enumerate(chunk):
        pp.check_uint8(im[None], f"image {a + i}")
      hp, wp = pp.bucket(max(im.shape[0] for im in chunk)), pp.bucket(max(im.shape[1] for im in chunk))
      batch = np.zeros((len(chunk), hp, wp, 3), np.uint8)
      rows = np.zeros((len(chunk), self.image_size, hp), np.int32)
      cols = np.zeros((len(chunk), self.image_size, wp), np.int32)
      for i, im in enumerate(chunk):
        h, w = im.shape[:2]
        batch[i, :h, :w] = im
        r, c = self._matrices(h, w)
        rows[i, :, :h], cols[i, :, :w] = r, c
      out = self._images_each(self.params, self._global(batch), self._global(rows), self._global(cols))
      r = _local_rows(out, b - a)
      parts.append(LocalRows(r.index + a, r.values))
    return LocalRows(np.concatenate([p.index for p in parts]), np.concatenate([p.values for p in parts]))

  def clip_scores(self, images: np.ndarray, prompts: Sequence[str]) -> LocalRows:
    """This process's rows of the per-pair CLIP scores [N] of images [N, H, W, 3] and prompts [N]."""
    images = np.asarray(images)
    pp.check_uint8(images, "images")
    if len(prompts) != len(images):
      raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    ids = self.tokenize(prompts)
    s = self.image_size  # transformers' CLIPImageProcessor crop (torchmetrics' CLIPScore uses it)
    rows, cols = (jnp.asarray(m) for m in pp.resize_crop_matrices(*images.shape[1:3], size=s, crop_size=s))
    parts = []
    for a, b in self._batches(len(images)):
      out = self._scores(
        self.params, self._global(self._pad(images[a:b])), rows, cols, self._global(self._pad(ids[a:b]))
      )
      r = _local_rows(out, b - a)
      parts.append(LocalRows(r.index + a, r.values))
    return LocalRows(np.concatenate([p.index for p in parts]), np.concatenate([p.values for p in parts]))
