r"""Evaluate a training run or a converted MM-DiT: CLIP score and FID on CLIP features.

  # a training run (EMA weights of the latest checkpoint), against reference statistics
  sd3-evaluate --workdir /tmp/run --prompts coco_val2014_captions.txt \
      --text_encoders ckpt/text --vae ckpt/vae --clip ckpt/clip_vit_l14 \
      --fid_clip ckpt/clip_vit_b32 --reference_stats coco_val2014_b32.npz --num_images 10000 \
      --num_steps 28 --cfg_scale 7 --seed 0 --out eval/
  # a converted SD3 checkpoint
  sd3-evaluate --checkpoint ckpt/sd3m --size 1024 1024 ...

Writes OUT/eval.json (clip_score, fid_clip, num_images and the settings) and OUT/samples.png
(the first 16 images). Prompts: a text file (one per line), JSONL ("prompt" or "caption"
fields) or a COCO captions file (captions_val2014.json). Image i is sampled for prompt
i % len(prompts). Reference statistics: ``sd3-reference-stats``. Multi-host:
every host runs the same command with --multihost (or --coordinator_address ...).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from typing import Optional, Sequence

import jax

from sd3_jax import command
from sd3_jax.evaluation import clip_metrics, scoring, stats
from sd3_jax.evaluation.preprocess import CROP_ROUNDING
from sd3_jax.inference import generation, loader
from sd3_jax.storage import fileutil

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
  p = command.ArgumentParser(
    prog="sd3-evaluate",
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
    epilog=__doc__,
  )
  loader.add_generator_args(p)
  p.add_argument("--prompts", required=True, help="prompts file (.txt lines, .jsonl, or COCO captions .json)")
  p.add_argument("--num_images", type=int, help="images to sample (default: one per prompt)")
  p.add_argument("--batch_size", type=int, default=16, help="images sampled at once (over the mesh)")
  p.add_argument(
    "--clip",
    required=True,
    help="our converted CLIP model (a transformers CLIPModel directory converted with "
    "sd3-convert --to jax) for the CLIP score; the paper uses CLIP-L/14",
  )
  p.add_argument("--fid_clip", help="CLIP model for FID features (default: --clip); clean-fid uses ViT-B/32")
  p.add_argument("--reference_stats", help=".npz from sd3_jax.evaluation.reference_stats (FID is skipped without it)")
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
  command.add_distributed_args(p)
  return p


def main(argv: Optional[Sequence[str]] = None, *, conditioner=None, decoder=None) -> dict:
  """The CLI; returns eval.json's content. ``conditioner`` / ``decoder`` replace
  --text_encoders / --vae when given (see sd3_jax.inference.generation.generate)."""
  parser = build_parser()
  args = parser.parse_args(argv)
  if args.batch_size < 1 or args.num_steps < 1 or (args.num_images is not None and args.num_images < 2):
    parser.error("--batch_size and --num_steps must be >= 1 and --num_images >= 2")
  command.init_distributed(args)
  prompts = loader.read_prompts(args.prompts)
  model, params, conditioner, decoder, latent_shape, mesh, step, _, formulation = loader.generator_from_args(
    args, conditioner, decoder
  )
  kw = dict(mesh=mesh, batch_size=args.clip_batch_size, crop_rounding=args.crop_rounding)
  clip = clip_metrics.CLIPFeatures.from_pretrained(args.clip, **kw)
  fid_clip = clip if not args.fid_clip else clip_metrics.CLIPFeatures.from_pretrained(args.fid_clip, **kw)
  reference = stats.load_stats(args.reference_stats) if args.reference_stats else None
  result = scoring.evaluate(
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
    formulation=formulation,
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
      formulation=formulation.name,
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
  command.run(main, "sd3-evaluate", on_interrupt="nothing was written (OUT/eval.json comes at the end)")


if __name__ == "__main__":
  entry_point()
