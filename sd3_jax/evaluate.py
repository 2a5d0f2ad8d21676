r"""Evaluate a training run or a converted MM-DiT: CLIP score and FID on CLIP features.

  # a training run (EMA weights of the latest checkpoint), against reference statistics
  python -m sd3_jax.evaluate --workdir /tmp/run --prompts coco_val2014_captions.txt \
      --text_encoders ckpt/text --vae ckpt/vae --clip ckpt/clip_vit_l14 \
      --fid_clip ckpt/clip_vit_b32 --reference_stats coco_val2014_b32.npz --num_images 10000 \
      --num_steps 28 --cfg_scale 7 --seed 0 --out eval/
  # a converted SD3 checkpoint
  python -m sd3_jax.evaluate --checkpoint ckpt/sd3m --size 1024 1024 ...

Writes OUT/eval.json (clip_score, fid_clip, num_images and the settings) and OUT/samples.png
(the first 16 images). Prompts: a text file (one per line), JSONL ("prompt" or "caption"
fields) or a COCO captions file (captions_val2014.json). Image i is sampled for prompt
i % len(prompts). Reference statistics: ``python -m sd3_jax.reference_stats``. Multi-host:
every host runs the same command with --multihost (or --coordinator_address ...).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp

from sd3_jax import checkpoint as ckpt_lib
from sd3_jax import command, fileutil, generation, sampling, sharding, text_conditioning
from sd3_jax.evaluation import clip_metrics, run, stats
from sd3_jax.evaluation.preprocess import CROP_ROUNDING
from sd3_jax.models import mmdit

log = logging.getLogger(__name__)


def add_distributed_args(p: argparse.ArgumentParser) -> None:
  g = p.add_argument_group("multi-host (as sd3-train)")
  g.add_argument("--multihost", action="store_true", help="jax.distributed.initialize() (auto-detected cluster)")
  g.add_argument("--coordinator_address", help="host:port of process 0 (with --num_processes, --process_id)")
  g.add_argument("--num_processes", type=int)
  g.add_argument("--process_id", type=int)


def init_distributed(args, parser) -> None:
  if args.coordinator_address:
    if args.num_processes is None or args.process_id is None:
      parser.error("--coordinator_address needs --num_processes and --process_id")
    jax.distributed.initialize(
      coordinator_address=args.coordinator_address, num_processes=args.num_processes, process_id=args.process_id
    )
  elif args.multihost:
    jax.distributed.initialize()


def add_generator_args(p: argparse.ArgumentParser) -> None:
  """The model and sampler flags shared with sd3-geneval-export (as sd3-sample's)."""
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--workdir", help="training workdir (reads WORKDIR/checkpoints)")
  src.add_argument("--checkpoint", help="converted MM-DiT checkpoint directory (sd3_jax.pretrained)")
  p.add_argument("--step", type=int, help="checkpoint step of --workdir (default: latest)")
  p.add_argument("--no_ema", dest="ema", action="store_false", help="--workdir: raw parameters instead of the EMA")
  p.add_argument("--text_encoders", help="our converted SD3 text encoders in the diffusers pipeline layout")
  p.add_argument("--t5_length", type=int, default=77)
  p.add_argument("--clip_length", type=int, default=77)
  p.add_argument("--no_t5", dest="t5", action="store_false")
  dec = p.add_mutually_exclusive_group()
  dec.add_argument("--vae", help="our converted SD3 VAE checkpoint")
  dec.add_argument("--pixel_space", action="store_true", help="the model outputs images in [-1, 1] (no VAE)")
  p.add_argument("--num_steps", type=int, default=28)
  p.add_argument("--cfg_scale", type=float, default=7.0)
  p.add_argument("--shift", type=float, default=3.0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument(
    "--size",
    type=int,
    nargs=2,
    metavar=("H", "W"),
    help="image size in pixels (default: the run's training size; 1024 for --checkpoint)",
  )
  p.add_argument("--mesh", type=int, nargs=3, default=[1, -1, 1], metavar=("DATA", "FSDP", "TENSOR"))
  p.add_argument(
    "--dtype",
    choices=["float32", "bfloat16"],
    help="compute dtype (default: the run's; float32 on CPU, bfloat16 on accelerators)",
  )


class Generator(NamedTuple):
  model: Any
  params: Any
  conditioner: Any
  decoder: Any
  latent_shape: tuple
  mesh: Any
  step: Optional[int]  # the checkpoint step of --workdir (None for --checkpoint)


def load_generator(args, parser, conditioner=None, decoder=None) -> Generator:
  """The MM-DiT, text conditioning, decoder, latent shape and mesh from the generator flags."""
  if args.checkpoint and (args.step is not None or not args.ema):
    parser.error("--step and --no_ema apply to --workdir only")
  if conditioner is None and not args.text_encoders:
    parser.error("give --text_encoders DIR (our converted CLIP-L/CLIP-G/T5 checkpoints)")
  if decoder is None and not (args.vae or args.pixel_space):
    parser.error("give --vae DIR for latent models, or --pixel_space for models that output images")
  mesh = sharding.make_mesh(*args.mesh)
  dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
  config, step = None, None
  if args.workdir:
    model, params, config, step = ckpt_lib.load_workdir(
      args.workdir, args.step, use_ema=args.ema, mesh=mesh, dtype=args.dtype
    )
    log.info("loaded %s of step %d from %s", "EMA parameters" if args.ema else "parameters", step, args.workdir)
  else:
    from sd3_jax import pretrained

    cfg = pretrained.read_config(args.checkpoint)
    model, params = pretrained.load_pretrained(
      args.checkpoint, dtype=jnp.dtype(dtype), shardings=sampling.param_shardings(mmdit.MMDiT(cfg), mesh)
    )
  if decoder is None and args.vae:
    decoder = generation.load_decoder(args.vae, dtype=dtype)
  factor = 1 if args.pixel_space else getattr(decoder, "downsample_factor", generation.VAE_FACTOR)
  if args.size:
    if any(s % factor for s in args.size):
      parser.error(f"--size {args.size[0]} {args.size[1]} must be divisible by the VAE factor {factor}")
    hw = tuple(s // factor for s in args.size)
  elif config is not None:
    hw = (config["data"]["latent_size"],) * 2
  else:
    hw = (1024 // factor,) * 2
  if any(s % model.config.patch_size for s in hw):
    parser.error(f"latent size {hw[0]}x{hw[1]} must be divisible by the patch size {model.config.patch_size}")
  if conditioner is None:
    conditioner = text_conditioning.load_conditioner(
      args.text_encoders, dtype=dtype, t5_length=args.t5_length, use_t5=args.t5, clip_length=args.clip_length
    )
  return Generator(model, params, conditioner, decoder, (*hw, model.config.in_channels), mesh, step)


def read_prompts(path: str) -> list[str]:
  """Prompts from a text file (one per line), JSONL ("prompt" / "caption") or COCO captions JSON."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no prompts file {path}")
  with open(path) as f:
    text = f.read()
  if path.endswith(".json"):
    d = json.loads(text)
    if not isinstance(d, dict) or not isinstance(d.get("annotations"), list):
      raise ValueError(f'{path}: a .json prompts file must be COCO captions ({{"annotations": [{{"caption": ...}}]}})')
    prompts = [a["caption"].strip() for a in d["annotations"]]
  elif path.endswith(".jsonl"):
    prompts = []
    for n, line in enumerate(text.splitlines(), 1):
      if line.strip():
        row = json.loads(line)
        p = row.get("prompt", row.get("caption")) if isinstance(row, dict) else None
        if not isinstance(p, str):
          raise ValueError(f'{path}:{n} has no "prompt" or "caption" string')
        prompts.append(p)
  else:
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
  if not prompts:
    raise ValueError(f"{path} holds no prompts")
  return prompts


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="python -m sd3_jax.evaluate",
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
    epilog=__doc__,
  )
  add_generator_args(p)
  p.add_argument("--prompts", required=True, help="prompts file (.txt lines, .jsonl, or COCO captions .json)")
  p.add_argument("--num_images", type=int, help="images to sample (default: one per prompt)")
  p.add_argument("--batch_size", type=int, default=16, help="images sampled at once (over the mesh)")
  p.add_argument(
    "--clip",
    required=True,
    help="our converted CLIP model (a transformers CLIPModel directory converted with "
    "tools.convert_weights --to jax) for the CLIP score; the paper uses CLIP-L/14",
  )
  p.add_argument("--fid_clip", help="CLIP model for FID features (default: --clip); clean-fid uses ViT-B/32")
  p.add_argument("--reference_stats", help=".npz from sd3_jax.reference_stats (FID is skipped without it)")
  p.add_argument(
    "--crop_rounding",
    choices=CROP_ROUNDING,
    default="round",
    help="centre crop of the FID features: 'round' = torchvision's (clean-fid), 'floor' = "
    "transformers' (must match the reference statistics)",
  )
  p.add_argument("--clip_batch_size", type=int, default=64)
  p.add_argument("--out", default="eval", help="output directory: eval.json, samples.png")
  p.add_argument("--save_stats", action="store_true", help="also write OUT/sample_stats.npz (the samples' statistics)")
  add_distributed_args(p)
  return p


def main(argv: Optional[Sequence[str]] = None, *, conditioner=None, decoder=None) -> dict:
  """The CLI; returns eval.json's content. ``conditioner`` / ``decoder`` replace
  --text_encoders / --vae when given (see sd3_jax.generation.generate)."""
  parser = build_parser()
  args = parser.parse_args(argv)
  if args.batch_size < 1 or args.num_steps < 1 or (args.num_images is not None and args.num_images < 2):
    parser.error("--batch_size and --num_steps must be >= 1 and --num_images >= 2")
  init_distributed(args, parser)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  prompts = read_prompts(args.prompts)
  model, params, conditioner, decoder, latent_shape, mesh, step = load_generator(args, parser, conditioner, decoder)
  kw = dict(mesh=mesh, batch_size=args.clip_batch_size, crop_rounding=args.crop_rounding)
  clip = clip_metrics.CLIPFeatures.from_pretrained(args.clip, **kw)
  fid_clip = clip if not args.fid_clip else clip_metrics.CLIPFeatures.from_pretrained(args.fid_clip, **kw)
  reference = stats.load_stats(args.reference_stats) if args.reference_stats else None
  result = run.evaluate(
    model,
    params,
    conditioner,
    prompts,
    clip=clip,
    fid_clip=fid_clip,
    reference=reference,
    num_images=args.num_images,
    batch_size=args.batch_size,
    latent_shape=latent_shape,
    decoder=decoder,
    num_steps=args.num_steps,
    cfg_scale=args.cfg_scale,
    shift=args.shift,
    seed=args.seed,
    mesh=mesh,
    progress=True,
  )
  report = dict(
    result.metrics,
    settings=dict(
      source=os.path.abspath(args.workdir or args.checkpoint),
      step=step,
      ema=args.ema if args.workdir else None,
      prompts=args.prompts,
      num_steps=args.num_steps,
      cfg_scale=args.cfg_scale,
      shift=args.shift,
      seed=args.seed,
      batch_size=args.batch_size,
      image_size=list(result.grid_images.shape[1:3]),
      clip=clip.description,
      fid_clip=fid_clip.description,
      reference_stats=os.path.abspath(args.reference_stats) if args.reference_stats else None,
    ),
  )
  if jax.process_index() == 0:
    from PIL import Image

    os.makedirs(args.out, exist_ok=True)
    fileutil.atomic_json(os.path.join(args.out, "eval.json"), report)
    cols = int(len(result.grid_images) ** 0.5 + 0.999)
    Image.fromarray(generation.make_grid(result.grid_images, cols)).save(os.path.join(args.out, "samples.png"))
    if args.save_stats:
      stats.save_stats(os.path.join(args.out, "sample_stats.npz"), result.stats, fid_clip.description)
    print(json.dumps({k: v for k, v in report.items() if k != "settings"}), flush=True)
  return report


def entry_point() -> None:
  """Console entry point (``sd3-evaluate``): expected errors end in one line and exit code 2."""
  command.run(main, "sd3-evaluate")


if __name__ == "__main__":
  entry_point()
