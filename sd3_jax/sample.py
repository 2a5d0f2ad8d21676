r"""Text-to-image samples from a training workdir or a converted MM-DiT, written as a PNG grid.

  # from a training run (EMA weights of the latest checkpoint; the model is rebuilt from the
  # config saved with the checkpoint)
  sd3-sample --workdir /tmp/run [--step 20000] [--no_ema] \
      --text_encoders DIR --vae DIR --prompt "a red circle above a blue square" --out grid.png
  # from a converted checkpoint (sd3-convert --to jax)
  sd3-sample --checkpoint /ckpt/sd3_medium_jax --text_encoders DIR --vae DIR \
      --prompts_file prompts.txt --num_per_prompt 4 --size 1024 1024 --num_steps 28 --cfg_scale 7
  # pixel-space models (the model's output is the image in [-1, 1]; no VAE)
  sd3-sample --workdir /tmp/demo --pixel_space --text_encoders DIR --prompt ...

It prints the path it wrote. Without --out the grid goes into the run,
WORKDIR/samples/sample_step_STEP_NNN.png, or beside a converted checkpoint,
CHECKPOINT_samples/sample_NNN.png (NNN: the first number not taken). --clip_length and
--t5_length default to the lengths the run was trained with (77 and 77 for a checkpoint). Ctrl-C
exits 130.

The pieces are library functions: ``inference.loader.generator_from_args`` (model, text
encoders, decoder, latent shape) and ``inference.generation.write_sample_grid``.
"""

from __future__ import annotations

import argparse
import logging
from typing import Optional, Sequence

import numpy as np

from sd3_jax import command
from sd3_jax.inference import generation, loader, sampling
from sd3_jax.storage import fileutil

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
  p = command.ArgumentParser(
    prog="sd3-sample", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  loader.add_generator_args(p)
  pr = p.add_mutually_exclusive_group(required=True)
  pr.add_argument("--prompt", action="append", help="a prompt (repeatable)")
  pr.add_argument("--prompts_file", help="prompts: a text file (one per line), JSONL or COCO captions JSON")
  p.add_argument("--num_per_prompt", type=int, default=1)
  p.add_argument(
    "--out",
    help="output PNG grid (default: WORKDIR/samples/sample_step_STEP_NNN.png for --workdir, "
    "CHECKPOINT_samples/sample_NNN.png beside --checkpoint; NNN: the first number not taken)",
  )
  p.add_argument("--slg", action="store_true", help="skip-layer guidance (SD3.5-medium)")
  p.add_argument("--slg_layers", type=int, nargs="+", default=[7, 8, 9])
  p.add_argument("--slg_scale", type=float, default=2.5)
  p.add_argument("--slg_start", type=float, default=0.01)
  p.add_argument("--slg_end", type=float, default=0.2)
  return p


def main(argv: Optional[Sequence[str]] = None, *, conditioner=None, decoder=None) -> np.ndarray:
  """The CLI. ``conditioner`` / ``decoder`` (see ``generation.generate``) replace --text_encoders /
  --vae when given, so that other text encoders or autoencoders plug in without new flags."""
  parser = build_parser()
  args = parser.parse_args(argv)
  prompts = args.prompt or loader.read_prompts(args.prompts_file)
  if args.num_per_prompt < 1 or args.num_steps < 1:
    raise ValueError("--num_per_prompt and --num_steps must be >= 1")
  gen = loader.generator_from_args(args, conditioner, decoder)
  slg = None
  if args.slg:
    bad = [i for i in args.slg_layers if not 0 <= i < gen.model.config.depth]
    if bad:
      raise ValueError(f"--slg_layers {bad} outside 0..{gen.model.config.depth - 1}")
    slg = sampling.SkipLayerGuidance(tuple(args.slg_layers), args.slg_scale, args.slg_start, args.slg_end)
  out = args.out or default_out(args.workdir, args.checkpoint, gen.step)
  grid = generation.write_sample_grid(
    gen.model,
    gen.params,
    gen.conditioner,
    prompts,
    out,
    latent_shape=gen.latent_shape,
    decoder=gen.decoder,
    num_per_prompt=args.num_per_prompt,
    num_steps=args.num_steps,
    shift=args.shift,
    cfg_scale=args.cfg_scale,
    slg=slg,
    seed=args.seed,
    mesh=gen.mesh,
    formulation=gen.formulation,
  )
  print(f"wrote {out} ({len(prompts)} prompts x {args.num_per_prompt}, a {grid.shape[0]}x{grid.shape[1]} grid)")
  return grid


def default_out(workdir: Optional[str], checkpoint: Optional[str], step: Optional[int]) -> str:
  """Where a grid goes without --out: into the run (WORKDIR/samples/sample_step_STEP_NNN.png,
  beside the trainer's step_STEP.png grids) or beside a converted checkpoint
  (CHECKPOINT_samples/sample_NNN.png; the checkpoint directory itself stays as converted), with
  the first number NNN not taken, so an earlier grid is never overwritten."""
  if workdir:
    folder, stem = fileutil.as_epath(workdir) / "samples", f"sample_step_{step:08d}"
  else:
    ckpt = fileutil.as_epath(checkpoint)
    folder, stem = ckpt.parent / f"{ckpt.name}_samples", "sample"
  n = 0
  while (folder / f"{stem}_{n:03d}.png").exists():
    n += 1
  return str(folder / f"{stem}_{n:03d}.png")


def entry_point() -> None:
  """Console entry point (``sd3-sample``): expected errors end in one line and exit code 2."""
  command.run(main, "sd3-sample", on_interrupt="no grid was written")


if __name__ == "__main__":
  entry_point()
