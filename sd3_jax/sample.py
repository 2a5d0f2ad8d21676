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

The pieces are library functions: ``checkpoint.load_workdir``, ``text_conditioning.
load_conditioner`` and ``generation.write_sample_grid``.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sd3_jax import checkpoint as ckpt_lib
from sd3_jax import command, generation, sampling, sharding, text_conditioning
from sd3_jax.models import mmdit

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="sd3-sample", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--workdir", help="training workdir (reads WORKDIR/checkpoints)")
  src.add_argument("--checkpoint", help="converted MM-DiT checkpoint directory (sd3_jax.pretrained)")
  p.add_argument("--step", type=int, help="checkpoint step of --workdir (default: latest)")
  p.add_argument(
    "--no_ema",
    "--no-ema",
    dest="ema",
    action="store_false",
    help="--workdir: use the raw parameters instead of the EMA",
  )
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
  p.add_argument(
    "--text_encoders",
    help="diffusers pipeline layout: text_encoder{,_2,_3}/ (our converted "
    "CLIP-L, CLIP-G, optional T5) and tokenizer{,_2,_3}/",
  )
  p.add_argument("--t5_length", type=int, default=77, help="T5 tokens (77 as the reference; diffusers 256)")
  p.add_argument("--clip_length", type=int, default=77, help="CLIP tokens (77 as SD3; 12 for the demo)")
  p.add_argument("--no_t5", dest="t5", action="store_false", help="zeros instead of T5 (as the reference)")
  p.add_argument(
    "--project_clip_l",
    action="store_true",
    help="use CLIP-L's projected pooled vector (as diffusers) instead of the reference's "
    "un-projected one; they agree only when its text_projection is the identity, as "
    "in the released SD3 weights. Use what the model was trained with.",
  )
  dec = p.add_mutually_exclusive_group()
  dec.add_argument("--vae", help="our converted SD3 VAE checkpoint (decodes the latents)")
  dec.add_argument(
    "--pixel_space", action="store_true", help="the model works on images in [-1, 1] (no VAE), e.g. the embedded demo"
  )
  p.add_argument("--slg", action="store_true", help="skip-layer guidance (SD3.5-medium)")
  p.add_argument("--slg_layers", type=int, nargs="+", default=[7, 8, 9])
  p.add_argument("--slg_scale", type=float, default=2.5)
  p.add_argument("--slg_start", type=float, default=0.01)
  p.add_argument("--slg_end", type=float, default=0.2)
  p.add_argument(
    "--mesh",
    type=int,
    nargs=3,
    default=[1, -1, 1],
    metavar=("DATA", "FSDP", "TENSOR"),
    help="device mesh (-1: the remaining devices); the batch is split over data*fsdp",
  )
  p.add_argument(
    "--dtype",
    choices=["float32", "bfloat16"],
    help="compute dtype (default for --workdir: its config's; otherwise float32 on CPU, "
    "bfloat16 on accelerators); also used by the text encoders and the VAE",
  )
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
  factor = 1 if args.pixel_space else getattr(decoder, "downsample_factor", generation.VAE_FACTOR)
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
    model, params, config, step = ckpt_lib.load_workdir(
      args.workdir, args.step, use_ema=args.ema, mesh=mesh, dtype=args.dtype
    )
    log.info("loaded %s of step %d from %s", "EMA parameters" if args.ema else "parameters", step, args.workdir)
  else:
    from sd3_jax import pretrained

    cfg = pretrained.read_config(args.checkpoint)
    model, params = pretrained.load_pretrained(
      args.checkpoint,
      dtype=jnp.dtype(args.dtype or _default_dtype()),
      shardings=sampling.param_shardings(mmdit.MMDiT(cfg), mesh),
    )
  compute_dtype = args.dtype or _default_dtype()
  if args.pixel_space and model.config.out_channels != 3:
    parser.error(f"--pixel_space needs a model with 3 output channels, this one has {model.config.out_channels}")
  if decoder is None and args.vae:
    decoder = generation.load_decoder(args.vae, dtype=compute_dtype)
  latent_shape = _latent_shape(args, parser, model, config, decoder)
  if conditioner is None:
    conditioner = text_conditioning.load_conditioner(
      args.text_encoders,
      dtype=compute_dtype,
      t5_length=args.t5_length,
      use_t5=args.t5,
      clip_length=args.clip_length,
      project_clip_l=args.project_clip_l,
    )
  slg = None
  if args.slg:
    bad = [i for i in args.slg_layers if not 0 <= i < model.config.depth]
    if bad:
      parser.error(f"--slg_layers {bad} outside 0..{model.config.depth - 1}")
    slg = sampling.SkipLayerGuidance(tuple(args.slg_layers), args.slg_scale, args.slg_start, args.slg_end)
  grid = generation.write_sample_grid(
    model,
    params,
    conditioner,
    prompts,
    args.out,
    latent_shape=latent_shape,
    decoder=decoder,
    num_per_prompt=args.num_per_prompt,
    num_steps=args.num_steps,
    shift=args.shift,
    cfg_scale=args.cfg_scale,
    slg=slg,
    seed=args.seed,
    mesh=mesh,
  )
  log.info("wrote %s (%d prompts x %d, %dx%d)", args.out, len(prompts), args.num_per_prompt, *grid.shape[:2])
  return grid


def entry_point() -> None:
  """Console entry point (``sd3-sample``): expected errors end in one line and exit code 2."""
  command.run(main, "sd3-sample")


if __name__ == "__main__":
  entry_point()
