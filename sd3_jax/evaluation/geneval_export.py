r"""Sample GenEval's prompts with our model, in the folder layout GenEval's scorer reads.

  sd3-geneval-export --workdir /tmp/run | --checkpoint ckpt/sd3m \
      --metadata geneval/prompts/evaluation_metadata.jsonl --outdir geneval_samples \
      --text_encoders ckpt/text --vae ckpt/vae [--num_per_prompt 4] [--size 1024 1024]
  # then, in GenEval's own environment (PyTorch, mmdetection):
  python evaluation/evaluate_images.py geneval_samples --outfile results.jsonl --model-path MODELS
  python evaluation/summary_scores.py results.jsonl

Layout: OUTDIR/<index:05d>/metadata.jsonl and OUTDIR/<index:05d>/samples/<j:05d>.png
(sd3_jax/evaluation/geneval.py). A rerun skips prompts already complete.
"""

from __future__ import annotations

import argparse
import logging
from typing import Optional, Sequence

from sd3_jax import command
from sd3_jax.evaluation import geneval
from sd3_jax.inference import loader


def build_parser() -> argparse.ArgumentParser:
  p = command.ArgumentParser(
    prog="sd3-geneval-export",
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
    epilog=__doc__,
  )
  loader.add_generator_args(p)
  p.add_argument("--metadata", required=True, help="GenEval's prompts/evaluation_metadata.jsonl")
  p.add_argument("--outdir", required=True)
  p.add_argument("--num_per_prompt", type=int, default=4, help="samples per prompt (GenEval: 4)")
  p.add_argument("--prompts_per_batch", type=int, default=4)
  command.add_distributed_args(p)
  return p


def main(argv: Optional[Sequence[str]] = None, *, conditioner=None, decoder=None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  if args.num_per_prompt < 1 or args.prompts_per_batch < 1:
    parser.error("--num_per_prompt and --prompts_per_batch must be >= 1")
  command.init_distributed(args)
  metadata = geneval.read_metadata(args.metadata)
  model, params, conditioner, decoder, latent_shape, mesh, _, _, formulation = loader.generator_from_args(
    args, conditioner, decoder
  )
  n = geneval.export(
    model,
    params,
    conditioner,
    metadata,
    args.outdir,
    latent_shape=latent_shape,
    num_per_prompt=args.num_per_prompt,
    prompts_per_batch=args.prompts_per_batch,
    decoder=decoder,
    num_steps=args.num_steps,
    cfg_scale=args.cfg_scale,
    shift=args.shift,
    seed=args.seed,
    mesh=mesh,
    progress=True,
    formulation=formulation,
  )
  logging.info("sampled %d of %d prompts into %s", n, len(metadata), args.outdir)
  return n


def entry_point() -> None:
  """Console entry point (``sd3-geneval-export``)."""
  command.run(
    main,
    "sd3-geneval-export",
    on_interrupt="the prompts whose samples are complete are kept; rerun the same command to go on (it skips them)",
  )


if __name__ == "__main__":
  entry_point()
