r"""Reference statistics for FID on CLIP features: the CLIP-feature mean and covariance of a
folder of real images, computed once into a .npz (clean-fid's keys ``mu``, ``sigma``) that
``sd3-evaluate --reference_stats`` and ``config.eval.reference_stats`` reuse.

  sd3-reference-stats --images coco/val2014 --clip ckpt/clip_vit_b32 \
      --out coco_val2014_b32.npz [--num_images 30000] [--batch_size 64]

Images (.jpg, .jpeg, .png, .webp, .bmp, searched recursively, in sorted order; the first
--num_images) are converted to RGB and preprocessed on device as clean-fid's CLIP mode does
(bicubic resize of the shortest side, torchvision's centre crop, CLIP mean/std). Multi-host:
every host runs the same command and reads the same files.
"""

from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence

import jax

from sd3_jax import command, sharding
from sd3_jax.evaluation import clip_metrics, scoring, stats
from sd3_jax.evaluation.preprocess import CROP_ROUNDING

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def list_images(folder: str) -> list[str]:
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"no image folder {folder}")
  out = []
  for root, _, files in os.walk(folder):
    out += [os.path.join(root, f) for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
  return sorted(out)


def build_parser() -> argparse.ArgumentParser:
  p = command.ArgumentParser(
    prog="sd3-reference-stats",
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
    epilog=__doc__,
  )
  p.add_argument("--images", required=True, help="folder of real images")
  p.add_argument("--clip", required=True, help="our converted CLIP model (the one sd3-evaluate --fid_clip uses)")
  p.add_argument("--out", required=True, help="output .npz")
  p.add_argument("--num_images", type=int, help="use the first N images (sorted paths)")
  p.add_argument("--batch_size", type=int, default=64)
  p.add_argument(
    "--crop_rounding",
    choices=CROP_ROUNDING,
    default="round",
    help="centre crop: 'round' = torchvision's (clean-fid), 'floor' = transformers'",
  )
  p.add_argument("--mesh", type=int, nargs=3, default=[1, -1, 1], metavar=("DATA", "FSDP", "TENSOR"))
  p.add_argument("--overwrite", action="store_true")
  command.add_distributed_args(p)
  return p


def main(argv: Optional[Sequence[str]] = None) -> dict:
  parser = build_parser()
  args = parser.parse_args(argv)
  if not args.out.endswith(".npz"):
    parser.error("--out must end in .npz")
  if os.path.exists(args.out) and not args.overwrite:
    raise FileExistsError(f"{args.out} exists; pass --overwrite to replace it")
  command.init_distributed(args)
  paths = list_images(args.images)
  if args.num_images is not None:
    if len(paths) < args.num_images:
      raise ValueError(f"{args.images} holds {len(paths)} images, fewer than --num_images {args.num_images}")
    paths = paths[: args.num_images]
  clip = clip_metrics.CLIPFeatures.from_pretrained(
    args.clip, mesh=sharding.make_mesh(*args.mesh), batch_size=args.batch_size, crop_rounding=args.crop_rounding
  )
  result = scoring.reference_statistics(clip, paths, progress=True)
  info = dict(clip.description, images=os.path.abspath(args.images), num_images=result.count)
  if jax.process_index() == 0:
    stats.save_stats(args.out, result, info)
    print(f"wrote {args.out}: {result.count} images, {result.dim}-d CLIP features", flush=True)
  return info


def entry_point() -> None:
  """Console entry point (``sd3-reference-stats``)."""
  command.run(main, "sd3-reference-stats", on_interrupt="nothing was written (--out comes at the end)")


if __name__ == "__main__":
  entry_point()
