r"""Text-to-image samples from a training workdir or a converted MM-DiT, written as a PNG grid.

  # from a training run (EMA weights of the latest checkpoint; the model is rebuilt from the
  # config saved with the checkpoint)
  python -m sd3_jax.sample --workdir /tmp/run [--step 20000] [--no_ema] \
      --text_encoders DIR --vae DIR --prompt "a red circle above a blue square" --out grid.png
  # from a converted checkpoint (tools/convert_weights --to jax)
  python -m sd3_jax.sample --checkpoint /ckpt/sd3_medium_jax --text_encoders DIR --vae DIR \
      --prompts_file prompts.txt --num_per_prompt 4 --size 1024 1024 --num_steps 28 --cfg_scale 7
  # pixel-space models (the model's output is the image in [-1, 1]; no VAE)
  python -m sd3_jax.sample --workdir /tmp/demo --pixel_space --text_encoders DIR --prompt ...

Pieces, all importable and pluggable (the trainer and tests call them without the CLI):

  load_workdir         (model, params, config) from WORKDIR/checkpoints/<step>: the config item
                       rebuilds the model; ONLY ema_params (or params) are read, by an orbax
                       partial restore straight into the mesh shardings (no optimizer state).
  as_conditioner       anything with encode(prompts) -> (context, pooled) and encode_empty(),
                       or a plain function prompts -> (context, pooled) (negative = f([""])).
  generate             prompts -> uint8 images [N, h, w, 3] via sampling.sample and a decoder
                       (a function latents [B,H,W,C] -> images in [-1, 1]).
  write_sample_grid    generate + one PNG grid (a row per prompt when num_per_prompt > 1).

Periodic samples in the trainer use write_sample_grid with config.sample.* (see
``write_sample_grid``).
"""
from __future__ import annotations

import argparse
import logging
import math
import os
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sd3_jax import checkpoint as ckpt_lib
from sd3_jax import sampling, sharding
from sd3_jax.models import mmdit

log = logging.getLogger(__name__)

VAE_FACTOR = 8  # SD3's autoencoder downsamples by 8 (a VAEDecoder says its own factor)


# --------------------------------------------------------------------------------------------
# Loading


def committed_steps(checkpoint_dir: str) -> list[int]:
  """Steps under checkpoint_dir whose save completed. Read-only, unlike opening a
  checkpoint.Checkpointer (which removes unfinished saves: a running trainer's)."""
  from etils import epath
  d = epath.Path(checkpoint_dir)
  if not d.exists():
    return []
  return sorted(int(p.name) for p in d.iterdir()
                if p.name.isdigit() and (p / ckpt_lib.COMMIT_FILE).exists())


def load_workdir(workdir: str, step: Optional[int] = None, *, use_ema: bool = True, mesh=None,
                 dtype: Optional[str] = None):
  """(model, params, config dict, step) from a training workdir's checkpoint.

  The model is rebuilt from the checkpoint's ``config`` item (the training ConfigDict as a
  dict) with the same layout (scan_layers) and ``dtype`` (default: the config's). Only
  ``ema_params`` (``use_ema``) or ``params`` is restored, with an orbax partial restore of
  the state item, directly into the parameters' shardings on ``mesh`` (default: all devices
  on 'fsdp'); optimizer state is never read.
  """
  import ml_collections
  import orbax.checkpoint as ocp
  from flax import linen as nn
  from sd3_jax import train

  ckpt_dir = os.path.join(os.path.abspath(workdir), "checkpoints")  # orbax takes absolute paths only
  steps = committed_steps(ckpt_dir)
  if not steps:
    raise FileNotFoundError(f"no committed checkpoint in {ckpt_dir}")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise FileNotFoundError(f"no committed checkpoint for step {step} in {ckpt_dir}; available: {steps}")
  step_dir = os.path.join(ckpt_dir, str(step))
  if not os.path.exists(os.path.join(step_dir, ckpt_lib.CONFIG)):
    raise FileNotFoundError(f"{step_dir} has no config item (saved without config=...); cannot rebuild the model")
  config = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(os.path.join(step_dir, ckpt_lib.CONFIG))
  cfg = ml_collections.ConfigDict(config)
  model = mmdit.MMDiT(train.model_config(cfg), dtype=jnp.dtype(dtype or cfg.dtype),
                      scan_layers=cfg.scan_layers, attention_impl=cfg.attention_impl)
  mesh = mesh if mesh is not None else sharding.make_mesh()
  shapes = nn.unbox(mmdit.abstract_params(model))
  name = "ema_params" if use_ema else "params"
  restore_args = jax.tree.map(
      lambda a, s: ocp.ArrayRestoreArgs(sharding=s, global_shape=a.shape, dtype=a.dtype),
      shapes, sampling.param_shardings(model, mesh))
  out = ocp.PyTreeCheckpointer().restore(
      os.path.join(step_dir, ckpt_lib.STATE),
      args=ocp.args.PyTreeRestore(item={name: shapes}, restore_args={name: restore_args},
                                  partial_restore=True))
  return model, out[name], config, step


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


def load_conditioner(path: str, *, dtype: str = "float32", t5_length: int = 77, use_t5: bool = True,
                     clip_length: int = 77):
  """SD3 text conditioning (CLIP-L, CLIP-G and, when present, T5) from the diffusers pipeline
  layout in ``path`` (text_encoder*/ as our converted checkpoints, tokenizer*/ files); see
  ``text_conditioning.SD3TextConditioner.from_pretrained``. ``t5_length``: 77 T5 tokens as the
  reference (diffusers samples with 256); with ``clip_length`` (77 as SD3; the embedded demo uses 12)
  it must give the context length the model expects."""
  from sd3_jax import text_conditioning
  return text_conditioning.SD3TextConditioner.from_pretrained(path, dtype=jnp.dtype(dtype), use_t5=use_t5,
                                                              t5_length=t5_length, clip_length=clip_length)


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
      chunk = latents[i:i + size]
      k = chunk.shape[0]
      if k < size:
        chunk = jnp.concatenate([chunk, jnp.zeros((size - k,) + chunk.shape[1:], chunk.dtype)], 0)
      parts.append(self._decode(self.params, chunk)[:k])
    return jnp.concatenate(parts, 0)


def load_decoder(path: str, *, dtype: str = "float32", batch_size: int = 4) -> VAEDecoder:
  """A VAEDecoder from our converted VAE checkpoint (``tools.convert_weights --to jax``)."""
  from sd3_jax import pretrained
  from sd3_jax.models import vae
  model, params = pretrained.load_pretrained(path, dtype=jnp.dtype(dtype))
  if not isinstance(model, vae.AutoencoderKL):
    raise ValueError(f"{path} holds a {type(model).__name__} checkpoint, not the autoencoder")
  return VAEDecoder(model, params, batch_size)


# --------------------------------------------------------------------------------------------
# Generating and writing


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
    grid[y:y + h, x:x + w] = im
  return grid


def generate(model, params, conditioner, prompts: Sequence[str], *, latent_shape: Sequence[int],
             decoder: Optional[Callable] = None, num_per_prompt: int = 1, num_steps: int = 28,
             shift: float = 3.0, cfg_scale: float = 7.0, slg: Optional[sampling.SkipLayerGuidance] = None,
             seed: int = 0, mesh=None) -> np.ndarray:
  """uint8 images [len(prompts) * num_per_prompt, h, w, 3], prompt-major.

  ``decoder(latents [B,H,W,C]) -> images [B,h,w,3] in [-1, 1]``; None means the model works in
  pixel space (its output is the image). cfg_scale == 1 runs without the negative (one model
  call per step). Image i uses noise fold_in(key(seed), i).
  """
  if not prompts:
    raise ValueError("no prompts")
  if num_per_prompt < 1:
    raise ValueError(f"num_per_prompt must be >= 1, got {num_per_prompt}")
  cond = as_conditioner(conditioner)
  context, pooled = cond.encode(list(prompts))
  context = jnp.repeat(jnp.asarray(context), num_per_prompt, axis=0)
  pooled = jnp.repeat(jnp.asarray(pooled), num_per_prompt, axis=0)
  neg = cond.encode_empty() if cfg_scale != 1.0 else (None, None)
  latents = sampling.sample(model, params, context, pooled, *neg, rng=jax.random.key(seed),
                            latent_shape=latent_shape, num_steps=num_steps, shift=shift,
                            cfg_scale=cfg_scale, slg=slg, mesh=mesh)
  images = latents if decoder is None else decoder(latents)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"expected RGB images [B, h, w, 3] from the {'decoder' if decoder else 'model'}, "
                     f"got shape {tuple(images.shape)}")
  return to_uint8(images)


def write_sample_grid(model, params, conditioner, prompts: Sequence[str], out_path: str, *,
                      latent_shape: Sequence[int], decoder: Optional[Callable] = None,
                      num_per_prompt: int = 1, cols: Optional[int] = None, **sample_kwargs) -> np.ndarray:
  """Samples ``prompts`` and writes one PNG grid to ``out_path``; returns the grid (uint8).

  A row per prompt with num_per_prompt columns when num_per_prompt > 1; otherwise a near-square
  grid (``cols`` overrides). ``sample_kwargs``: num_steps, shift, cfg_scale, slg, seed, mesh
  (see ``generate``). Intended trainer hook (host 0 writes, every host samples):
  config.sample = dict(every=0 (off), prompts=(...), num_steps=28, cfg_scale=7.0, shift=3.0,
  seed=0, num_per_prompt=1), written to WORKDIR/samples/step_<N>.png from EMA weights.
  """
  from PIL import Image
  images = generate(model, params, conditioner, prompts, latent_shape=latent_shape, decoder=decoder,
                    num_per_prompt=num_per_prompt, **sample_kwargs)
  if cols is None:
    cols = num_per_prompt if num_per_prompt > 1 else math.ceil(math.sqrt(len(images)))
  grid = make_grid(images, cols)
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    Image.fromarray(grid).save(out_path)
  return grid


# --------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m sd3_jax.sample", description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--workdir", help="training workdir (reads WORKDIR/checkpoints)")
  src.add_argument("--checkpoint", help="converted MM-DiT checkpoint directory (sd3_jax.pretrained)")
  p.add_argument("--step", type=int, help="checkpoint step of --workdir (default: latest)")
  p.add_argument("--no_ema", "--no-ema", dest="ema", action="store_false",
                 help="--workdir: use the raw parameters instead of the EMA")
  pr = p.add_mutually_exclusive_group(required=True)
  pr.add_argument("--prompt", action="append", help="a prompt (repeatable)")
  pr.add_argument("--prompts_file", help="a text file with one prompt per line")
  p.add_argument("--num_per_prompt", type=int, default=1)
  p.add_argument("--out", default="samples.png", help="output PNG grid")
  p.add_argument("--num_steps", type=int, default=28)
  p.add_argument("--cfg_scale", type=float, default=7.0, help="CFG weight (1 = no CFG)")
  p.add_argument("--shift", type=float, default=3.0)
  p.add_argument("--seed", type=int, default=0)
  size = p.add_mutually_exclusive_group()
  size.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="image size in pixels")
  size.add_argument("--latent_size", type=int, nargs=2, metavar=("H", "W"), help="latent size")
  p.add_argument("--text_encoders", help="diffusers pipeline layout: text_encoder{,_2,_3}/ (our converted "
                                         "CLIP-L, CLIP-G, optional T5) and tokenizer{,_2,_3}/")
  p.add_argument("--t5_length", type=int, default=77, help="T5 tokens (77 as the reference; diffusers 256)")
  p.add_argument("--clip_length", type=int, default=77, help="CLIP tokens (77 as SD3; 12 for the demo)")
  p.add_argument("--no_t5", dest="t5", action="store_false", help="zeros instead of T5 (as the reference)")
  dec = p.add_mutually_exclusive_group()
  dec.add_argument("--vae", help="our converted SD3 VAE checkpoint (decodes the latents)")
  dec.add_argument("--pixel_space", action="store_true",
                   help="the model works on images in [-1, 1] (no VAE), e.g. the embedded demo")
  p.add_argument("--slg", action="store_true", help="skip-layer guidance (SD3.5-medium)")
  p.add_argument("--slg_layers", type=int, nargs="+", default=[7, 8, 9])
  p.add_argument("--slg_scale", type=float, default=2.5)
  p.add_argument("--slg_start", type=float, default=0.01)
  p.add_argument("--slg_end", type=float, default=0.2)
  p.add_argument("--mesh", type=int, nargs=3, default=[1, -1, 1], metavar=("DATA", "FSDP", "TENSOR"),
                 help="device mesh (-1: the remaining devices); the batch is split over data*fsdp")
  p.add_argument("--dtype", choices=["float32", "bfloat16"],
                 help="compute dtype (default for --workdir: its config's; otherwise float32 on CPU, "
                      "bfloat16 on accelerators); also used by the text encoders and the VAE")
  return p


def _default_dtype() -> str:
  return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def _read_prompts(args, parser) -> list[str]:
  if args.prompt:
    prompts = args.prompt
  else:
    if not os.path.isfile(args.prompts_file):
      parser.error(f"--prompts_file {args.prompts_file} does not exist")
    with open(args.prompts_file) as f:
      prompts = [line.strip() for line in f if line.strip()]
  if not prompts:
    parser.error("no prompts given")
  return prompts


def _latent_shape(args, parser, model, config: Optional[dict], decoder) -> tuple[int, int, int]:
  channels = model.config.in_channels
  factor = 1 if args.pixel_space else getattr(decoder, "downsample_factor", VAE_FACTOR)
  if args.latent_size:
    hw = tuple(args.latent_size)
  elif args.size:
    if any(s % factor for s in args.size):
      parser.error(f"--size {args.size[0]} {args.size[1]} must be divisible by the VAE factor {factor}")
    hw = tuple(s // factor for s in args.size)
  elif config is not None:  # the training resolution
    hw = (config["data"]["latent_size"],) * 2
  else:
    hw = (1024 // factor,) * 2
  p = model.config.patch_size
  if any(s % p for s in hw):
    parser.error(f"latent size {hw[0]}x{hw[1]} must be divisible by the patch size {p}")
  return (*hw, channels)


def main(argv: Optional[Sequence[str]] = None, *, conditioner=None, decoder=None) -> np.ndarray:
  """The CLI. ``conditioner`` / ``decoder`` (see ``generate``) replace --text_encoders / --vae
  when given, so that other text encoders or autoencoders plug in without new flags."""
  parser = build_parser()
  args = parser.parse_args(argv)
  prompts = _read_prompts(args, parser)
  if args.checkpoint and (args.step is not None or not args.ema):
    parser.error("--step and --no_ema apply to --workdir only")
  if conditioner is None and not args.text_encoders:
    parser.error("give --text_encoders DIR (our converted CLIP-L/CLIP-G/T5 checkpoints)")
  if decoder is None and not (args.vae or args.pixel_space):
    parser.error("give --vae DIR for latent models, or --pixel_space for models that output images")
  if args.num_per_prompt < 1 or args.num_steps < 1:
    parser.error("--num_per_prompt and --num_steps must be >= 1")
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

  mesh = sharding.make_mesh(*args.mesh)
  config = None
  if args.workdir:
    model, params, config, step = load_workdir(args.workdir, args.step, use_ema=args.ema, mesh=mesh,
                                               dtype=args.dtype)
    log.info("loaded %s of step %d from %s", "EMA parameters" if args.ema else "parameters", step, args.workdir)
  else:
    from sd3_jax import pretrained
    cfg = pretrained.read_config(args.checkpoint)
    model, params = pretrained.load_pretrained(
        args.checkpoint, dtype=jnp.dtype(args.dtype or _default_dtype()),
        shardings=sampling.param_shardings(mmdit.MMDiT(cfg), mesh))
  compute_dtype = args.dtype or _default_dtype()
  if args.pixel_space and model.config.out_channels != 3:
    parser.error(f"--pixel_space needs a model with 3 output channels, this one has {model.config.out_channels}")
  if decoder is None and args.vae:
    decoder = load_decoder(args.vae, dtype=compute_dtype)
  latent_shape = _latent_shape(args, parser, model, config, decoder)
  if conditioner is None:
    conditioner = load_conditioner(args.text_encoders, dtype=compute_dtype, t5_length=args.t5_length,
                                   use_t5=args.t5, clip_length=args.clip_length)
  slg = None
  if args.slg:
    bad = [i for i in args.slg_layers if not 0 <= i < model.config.depth]
    if bad:
      parser.error(f"--slg_layers {bad} outside 0..{model.config.depth - 1}")
    slg = sampling.SkipLayerGuidance(tuple(args.slg_layers), args.slg_scale, args.slg_start, args.slg_end)
  grid = write_sample_grid(model, params, conditioner, prompts, args.out, latent_shape=latent_shape,
                           decoder=decoder, num_per_prompt=args.num_per_prompt, num_steps=args.num_steps,
                           shift=args.shift, cfg_scale=args.cfg_scale, slg=slg, seed=args.seed, mesh=mesh)
  log.info("wrote %s (%d prompts x %d, %dx%d)", args.out, len(prompts), args.num_per_prompt, *grid.shape[:2])
  return grid


if __name__ == "__main__":
  main()
