"""From prompts to pictures with the library's pieces: a conditioner, the Euler sampler and a
decoder, then PNG grids. The sample command, the trainer's periodic grids, the demo and the
evaluation all go through ``generate`` / ``write_sample_grid``.

  as_conditioner       anything with encode(prompts) -> (context, pooled) and encode_empty(),
                       or a plain function prompts -> (context, pooled) (negative = f([""])).
  encode_once          a conditioner's outputs for fixed prompts, kept as host arrays, so the
                       text encoders can be freed (the trainer's periodic grids).
  VAEDecoder           latents -> images in [-1, 1] with our SD3 autoencoder; load_decoder.
  generate             prompts -> uint8 images [N, h, w, 3] via sampling.sample and a decoder.
  write_sample_grid    generate + one PNG grid (a row per prompt when num_per_prompt > 1).
"""

from __future__ import annotations

import io
import math
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from sd3_jax.inference import sampling

VAE_FACTOR = 8  # SD3's autoencoder downsamples by 8 (a VAEDecoder says its own factor)


class _FunctionConditioner:
  def __init__(self, fn):
    self.fn = fn

  def encode(self, prompts):
    return self.fn(list(prompts))

  def encode_empty(self):
    return self.fn([""])


def as_conditioner(obj):
  """An object with ``encode(prompts) -> (context [N,L,D], pooled [N,P])`` and
  ``encode_empty() -> (context [1,L,D], pooled [1,P])`` (e.g.
  text_conditioning.SD3TextConditioner), or a function ``prompts -> (context, pooled)`` whose
  negative is the encoded empty prompt ``f([""])``."""
  if hasattr(obj, "encode") and hasattr(obj, "encode_empty"):
    return obj
  if callable(obj):
    return _FunctionConditioner(obj)
  raise TypeError(f"a conditioner needs encode()/encode_empty() or must be callable, got {type(obj).__name__}")


class FixedConditioner:
  """The encodings of a fixed list of prompts (and of the empty prompt), held as host numpy
  arrays: a conditioner for exactly those prompts that needs no text encoder."""

  def __init__(self, prompts: Sequence[str], context, pooled, empty=None):
    self.prompts = tuple(prompts)
    self.context, self.pooled = np.asarray(context), np.asarray(pooled)
    self.empty = None if empty is None else tuple(np.asarray(x) for x in empty)

  def encode(self, prompts):
    if tuple(prompts) != self.prompts:
      raise ValueError(f"this conditioner holds the encodings of {list(self.prompts)} only, not of {list(prompts)}")
    return self.context, self.pooled

  def encode_empty(self):
    if self.empty is None:
      raise ValueError("the empty prompt was not encoded (encode_once(..., with_empty=True))")
    return self.empty


def encode_once(conditioner, prompts: Sequence[str], *, with_empty: bool = True) -> FixedConditioner:
  """Encodes ``prompts`` (and the empty prompt, the CFG negative) once; the result keeps no
  reference to ``conditioner``, so dropping it frees the text encoders."""
  cond = as_conditioner(conditioner)
  context, pooled = cond.encode(list(prompts))
  empty = cond.encode_empty() if with_empty else None
  to_host = lambda x: np.asarray(jax.device_get(x))
  return FixedConditioner(
    prompts, to_host(context), to_host(pooled), None if empty is None else tuple(to_host(x) for x in empty)
  )


class VAEDecoder:
  """latents (normalised, the MM-DiT's space) -> images in [-1, 1] with our SD3 autoencoder
  (``images_from_latents``: z / 1.5305 + 0.0609, then the decoder), ``batch_size`` at a time."""

  def __init__(self, model, params, batch_size: int = 4):
    self.model, self.params, self.batch_size = model, params, int(batch_size)
    self.downsample_factor = model.config.downsample_factor
    self._decode = jax.jit(lambda p, z: model.apply({"params": p}, z, method=model.images_from_latents))

  def __call__(self, latents):
    latents = jnp.asarray(latents, jnp.float32)
    n = latents.shape[0]
    size = min(self.batch_size, n)
    parts = []
    for i in range(0, n, size):  # the last chunk padded to `size`: one compiled decoder
      chunk = latents[i : i + size]
      k = chunk.shape[0]
      if k < size:
        chunk = jnp.concatenate([chunk, jnp.zeros((size - k,) + chunk.shape[1:], chunk.dtype)], 0)
      parts.append(self._decode(self.params, chunk)[:k])
    return jnp.concatenate(parts, 0)


def load_decoder(path: str, *, dtype: str = "float32", batch_size: int = 4) -> VAEDecoder:
  """A VAEDecoder from our converted VAE checkpoint (``sd3-convert --to jax``)."""
  from sd3_jax.storage import pretrained
  from sd3_jax.models import vae

  model, params = pretrained.load_pretrained(path, dtype=jnp.dtype(dtype))
  if not isinstance(model, vae.AutoencoderKL):
    raise ValueError(f"{path} holds a {type(model).__name__} checkpoint, not the autoencoder")
  return VAEDecoder(model, params, batch_size)


def to_uint8(images) -> np.ndarray:
  """Images in [-1, 1] -> uint8 [0, 255]."""
  x = np.asarray(jax.device_get(images), np.float32)
  return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, cols: int, pad: int = 2) -> np.ndarray:
  """[N, h, w, 3] uint8 -> one image with ``cols`` columns (row-major), black padding."""
  n, h, w, c = images.shape
  rows = -(-n // cols)
  grid = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, c), np.uint8)
  for i, im in enumerate(images):
    r, q = divmod(i, cols)
    y, x = pad + r * (h + pad), pad + q * (w + pad)
    grid[y : y + h, x : x + w] = im
  return grid


def check_conditioning(model, context, pooled) -> None:
  """The text encoders' output widths must be the model's: context [N, L, context_dim] and
  pooled [N, pooled_dim]. Otherwise the model would fail deep inside a matmul."""
  config = getattr(model, "config", None)
  if config is None or not hasattr(config, "context_dim"):
    return  # a stand-in model without an MMDiTConfig
  got = (context.shape[-1], pooled.shape[-1])
  want = (config.context_dim, config.pooled_dim)
  if got != want:
    raise ValueError(
      f"the text encoders give context width {got[0]} and pooled width {got[1]}, but the "
      f"model expects {want[0]} and {want[1]}: use the text encoders the model was "
      f"trained with (for SD3: CLIP-L 768 + CLIP-G 1280 pooled, T5-XXL 4096 context)"
    )


def generate(
  model,
  params,
  conditioner,
  prompts: Sequence[str],
  *,
  latent_shape: Sequence[int],
  decoder: Optional[Callable] = None,
  num_per_prompt: int = 1,
  num_steps: int = 28,
  shift: float = 3.0,
  cfg_scale: float = 7.0,
  slg: Optional[sampling.SkipLayerGuidance] = None,
  seed: int = 0,
  mesh=None,
  formulation=None,
) -> np.ndarray:
  """uint8 images [len(prompts) * num_per_prompt, h, w, 3], prompt-major.

  ``decoder(latents [B,H,W,C]) -> images [B,h,w,3] in [-1, 1]``; None means the model works in
  pixel space (its output is the image). cfg_scale == 1 runs without the negative (one model
  call per step). Image i uses noise fold_in(key(seed), i). ``formulation``: what the model
  was trained with (a ``flow`` formulation; None: rectified flow), see ``sampling.sample``.
  """
  if not prompts:
    raise ValueError("no prompts")
  if num_per_prompt < 1:
    raise ValueError(f"num_per_prompt must be >= 1, got {num_per_prompt}")
  cond = as_conditioner(conditioner)
  context, pooled = cond.encode(list(prompts))
  check_conditioning(model, context, pooled)
  context = jnp.repeat(jnp.asarray(context), num_per_prompt, axis=0)
  pooled = jnp.repeat(jnp.asarray(pooled), num_per_prompt, axis=0)
  neg = cond.encode_empty() if cfg_scale != 1.0 else (None, None)
  latents = sampling.sample(
    model,
    params,
    context,
    pooled,
    *neg,
    rng=jax.random.key(seed),
    latent_shape=latent_shape,
    num_steps=num_steps,
    shift=shift,
    cfg_scale=cfg_scale,
    slg=slg,
    mesh=mesh,
    formulation=formulation,
  )
  images = latents if decoder is None else decoder(latents)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(
      f"expected RGB images [B, h, w, 3] from the {'decoder' if decoder else 'model'}, got shape {tuple(images.shape)}"
    )
  return to_uint8(images)


def write_sample_grid(
  model,
  params,
  conditioner,
  prompts: Sequence[str],
  out_path: str,
  *,
  latent_shape: Sequence[int],
  decoder: Optional[Callable] = None,
  num_per_prompt: int = 1,
  cols: Optional[int] = None,
  **sample_kwargs,
) -> np.ndarray:
  """Samples ``prompts`` and writes one PNG grid to ``out_path``; returns the grid (uint8).

  A row per prompt with num_per_prompt columns when num_per_prompt > 1; otherwise a near-square
  grid (``cols`` overrides). ``sample_kwargs``: num_steps, shift, cfg_scale, slg, seed, mesh
  (see ``generate``). Intended trainer hook (host 0 writes, every host samples):
  config.sample = dict(every=0 (off), prompts=(...), num_steps=28, cfg_scale=7.0, shift=3.0,
  seed=0, num_per_prompt=1), written to WORKDIR/samples/step_<N>.png from EMA weights.
  """
  from PIL import Image

  images = generate(
    model,
    params,
    conditioner,
    prompts,
    latent_shape=latent_shape,
    decoder=decoder,
    num_per_prompt=num_per_prompt,
    **sample_kwargs,
  )
  if cols is None:
    cols = num_per_prompt if num_per_prompt > 1 else math.ceil(math.sqrt(len(images)))
  grid = make_grid(images, cols)
  if jax.process_index() == 0:  # through etils.epath: the workdir may be gs://...
    path = epath.Path(out_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(grid).save(buf, format="PNG")
    path.write_bytes(buf.getvalue())
  return grid
