"""The converter command: ``sd3-convert`` (= ``python -m sd3_jax.convert``; ``python -m tools.convert_weights``
from the repository root), ``--src SRC --dst DST --to {jax,diffusers,sd3,transformers}``."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # conversion is host-only; skip accelerator probing

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from sd3_jax import command  # noqa: E402

EPILOG = """\
source formats (model and format detected automatically):
  run           a training workdir of sd3-train (its latest committed checkpoint) or one step,
                WORKDIR/checkpoints/STEP: the model is rebuilt from the run's config, the EMA
                weights (--ema, default) or the raw parameters (--no-ema) are unscanned and
                written; the optimizer state is not read
  jax           a directory written by this tool or sd3_jax.storage.pretrained.save_pretrained:
                sd3_jax_config.json + params/ (orbax); any of our models (MM-DiT, VAE, CLIP, T5)
  MM-DiT
  diffusers     a SD3Transformer2DModel directory (config.json + diffusion_pytorch_model.safetensors,
                or shards + diffusion_pytorch_model.safetensors.index.json), or a pipeline
                directory containing transformer/
  sd3           an original single .safetensors file (keys model.diffusion_model.*; VAE and text
                encoder tensors in the same file are ignored)
  VAE
  diffusers     an AutoencoderKL directory (config.json with _class_name AutoencoderKL +
                diffusion_pytorch_model.safetensors), e.g. vae/ of a diffusers SD3 pipeline
  text encoders
  transformers  a transformers directory: config.json (model_type clip_text_model / clip / t5,
                or architectures CLIPTextModelWithProjection / CLIPTextModel / CLIPModel /
                T5EncoderModel) + model.safetensors or shards + model.safetensors.index.json,
                e.g. text_encoder/ (CLIP-L), text_encoder_2/ (CLIP-G), text_encoder_3/ (T5) of a
                diffusers SD3 pipeline. A bare CLIPTextModel gets an identity text_projection.
  CLIP models (evaluation: CLIP score, FID on CLIP features)
  transformers  a CLIPModel (model_type clip; both towers; its tokenizer files are copied to
                DST/tokenizer/) or CLIPVisionModelWithProjection (clip_vision_model) directory,
                e.g. openai/clip-vit-large-patch14 or openai/clip-vit-base-patch32

targets: an MM-DiT converts to jax, diffusers or sd3; a VAE to jax or diffusers; a text encoder
or CLIP model to jax or transformers (--to diffusers is accepted for it and writes the same transformers
directory).

The MM-DiT configuration is inferred from tensor names and shapes; a VAE's or a text encoder's
comes from its config.json and is checked against the tensors. Tensors are converted and
written one at a time, so memory stays far below the checkpoint size (the small VAE is
converted in memory).

examples (sd3-convert and python -m sd3_jax.convert are the same):
  sd3-convert --src workdirs/run1 --dst export/transformer --to diffusers --ema
  sd3-convert --src workdirs/run1/checkpoints/20000 --dst ckpt/run1 --to jax --no-ema
  sd3-convert --src sd3.5_large.safetensors --dst ckpt/sd35l --to jax
  sd3-convert --src ./stable-diffusion-3-medium-diffusers --dst ckpt/sd3m --to jax
  sd3-convert --src ckpt/sd3m --dst export/transformer --to diffusers --dtype bfloat16
  sd3-convert --src ckpt/sd3m --dst export/sd3_medium.safetensors --to sd3
  for c in text_encoder text_encoder_2 text_encoder_3; do
    sd3-convert --src ./stable-diffusion-3-medium-diffusers/$c --dst ckpt/text/$c --to jax
  done
  sd3-convert --src ckpt/text/text_encoder_3 --dst export/t5 --to transformers
  sd3-convert --src ./stable-diffusion-3-medium-diffusers/vae --dst ckpt/vae --to jax
"""


def describe(cfg) -> str:
  """One line about a converted model's configuration."""
  name = type(cfg).__name__
  if name == "MMDiTConfig":
    return (
      f"{'' if cfg.backbone == 'mmdit' else f'backbone {cfg.backbone}, '}depth {cfg.depth}, hidden {cfg.hidden_size}, heads {cfg.num_heads}, qk_norm {cfg.qk_norm}, "
      f"dual layers {list(cfg.dual_attention_layers)}, pos grid {cfg.pos_embed_max_size}"
    )
  if name == "CLIPTextConfig":
    return (
      f"CLIP text encoder: {cfg.num_layers} layers, hidden {cfg.hidden_size}, heads {cfg.num_heads}, "
      f"{cfg.hidden_act}, projection {cfg.projection_dim}, vocab {cfg.vocab_size}"
    )
  if name == "CLIPVisionConfig":
    return (
      f"CLIP image tower: {cfg.num_layers} layers, hidden {cfg.hidden_size}, patch {cfg.patch_size}, "
      f"image {cfg.image_size}, {cfg.hidden_act}, projection {cfg.projection_dim}"
    )
  if name == "CLIPConfig":
    return f"CLIP model: image tower {describe(cfg.vision)}; text tower {describe(cfg.text)}"
  if name == "VAEConfig":
    return (
      f"VAE: latent channels {cfg.latent_channels}, blocks {list(cfg.block_out_channels)}, "
      f"scale {cfg.scaling_factor}, shift {cfg.shift_factor}"
    )
  if name == "T5EncoderConfig":
    return (
      f"T5 encoder: {cfg.num_layers} layers, d_model {cfg.d_model}, heads {cfg.num_heads}, "
      f"d_ff {cfg.d_ff}, {cfg.feed_forward_proj}, vocab {cfg.vocab_size}"
    )
  return name


def main(argv=None) -> int:
  p = command.ArgumentParser(
    prog="sd3-convert",
    description="Lossless SD3/SD3.5 checkpoint conversion: the MM-DiT between sd3_jax (JAX/orbax), "
    "diffusers and the original SD3 single-file format; the VAE between sd3_jax and "
    "diffusers; the text encoders (CLIP-L, OpenCLIP bigG, T5) between sd3_jax and "
    "transformers directories.",
    epilog=EPILOG,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument("--src", required=True, help="source checkpoint (file or directory; format detected)")
  p.add_argument(
    "--dst",
    required=True,
    help="output: a directory for --to jax/diffusers/transformers, a .safetensors file for --to sd3",
  )
  p.add_argument(
    "--to",
    required=True,
    choices=["jax", "diffusers", "sd3", "transformers"],
    help="output format (see 'targets' below)",
  )
  p.add_argument(
    "--dtype",
    choices=["float32", "bfloat16", "float16"],
    default=None,
    help="cast every tensor to this dtype (default: keep the source dtypes)",
  )
  heads = p.add_mutually_exclusive_group()
  heads.add_argument(
    "--num-heads",
    type=int,
    default=None,
    help="MM-DiT: attention heads, for original files without qk-norm whose head dim "
    "is not 64 (default: from the qk-norm weights or the config, else hidden/64)",
  )
  heads.add_argument("--head-dim", type=int, default=None, help="the same, given as the head dimension")
  p.add_argument(
    "--max-shard-size",
    default="10GB",
    help="diffusers/transformers output: shard above this size, with an index file (default 10GB)",
  )
  p.add_argument("--overwrite", action="store_true", help="replace an existing --dst")
  p.add_argument(
    "--no-verify",
    dest="verify",
    action="store_false",
    help="jax sources: skip checking every parameter against the checksum written with "
    "it (faster; a damaged leaf is then converted as it is)",
  )
  p.add_argument(
    "--ema",
    action=argparse.BooleanOptionalAction,
    default=None,
    help="--src is a training run: export its EMA weights (--ema, the default) or its raw parameters (--no-ema)",
  )
  args = p.parse_args(argv)

  from sd3_jax.convert import convert  # heavy imports after argument parsing

  t0 = time.time()
  try:
    cfg = convert(
      args.src,
      args.dst,
      args.to,
      dtype=args.dtype,
      num_heads=args.num_heads,
      head_dim=args.head_dim,
      max_shard_size=args.max_shard_size,
      overwrite=args.overwrite,
      verify=args.verify,
      ema=args.ema,
    )
  except (ValueError, FileNotFoundError, FileExistsError, IsADirectoryError, KeyError) as e:
    print(f"sd3-convert: error: {command.one_line(e)}", file=sys.stderr)
    return command.EXIT_USAGE
  print(f"wrote {args.dst} ({args.to}) in {time.time() - t0:.1f}s: {describe(cfg)}")
  return 0


def entry_point() -> None:
  """Console entry point (``sd3-convert``)."""
  command.run(
    lambda: sys.exit(main()),
    "sd3-convert",
    on_interrupt="nothing was written to --dst (outputs are renamed into place only when complete)",
  )


if __name__ == "__main__":
  entry_point()
