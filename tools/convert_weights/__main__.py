"""python -m tools.convert_weights --src SRC --dst DST --to {jax,diffusers,sd3} (see --help)."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # conversion is host-only; skip accelerator probing

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

EPILOG = """\
source formats (detected automatically):
  jax        a directory written by this tool or sd3_jax.pretrained.save_pretrained:
             sd3_jax_config.json + params/ (orbax)
  diffusers  a SD3Transformer2DModel directory (config.json + diffusion_pytorch_model.safetensors,
             or shards + diffusion_pytorch_model.safetensors.index.json), or a pipeline
             directory containing transformer/
  sd3        an original single .safetensors file (keys model.diffusion_model.*; VAE and text
             encoder tensors in the same file are ignored)

The model configuration is inferred from tensor names and shapes. Tensors are converted and
written one at a time, so memory stays far below the checkpoint size.

examples:
  python -m tools.convert_weights --src sd3.5_large.safetensors --dst ckpt/sd35l --to jax
  python -m tools.convert_weights --src ./stable-diffusion-3-medium-diffusers --dst ckpt/sd3m --to jax
  python -m tools.convert_weights --src ckpt/sd3m --dst export/transformer --to diffusers --dtype bfloat16
  python -m tools.convert_weights --src ckpt/sd3m --dst export/sd3_medium.safetensors --to sd3
"""


def main(argv=None) -> int:
  p = argparse.ArgumentParser(
      prog="python -m tools.convert_weights",
      description="Lossless SD3/SD3.5 MM-DiT checkpoint conversion between sd3_jax (JAX/orbax), "
                  "diffusers and the original SD3 single-file format.",
      epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--src", required=True, help="source checkpoint (file or directory; format detected)")
  p.add_argument("--dst", required=True,
                 help="output: a directory for --to jax/diffusers, a .safetensors file for --to sd3")
  p.add_argument("--to", required=True, choices=["jax", "diffusers", "sd3"], help="output format")
  p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                 help="cast every tensor to this dtype (default: keep the source dtypes)")
  heads = p.add_mutually_exclusive_group()
  heads.add_argument("--num-heads", type=int, default=None,
                     help="attention heads, for original files without qk-norm whose head dim is not "
                          "64 (default: from the qk-norm weights or the config, else hidden/64)")
  heads.add_argument("--head-dim", type=int, default=None, help="the same, given as the head dimension")
  p.add_argument("--max-shard-size", default="10GB",
                 help="diffusers output: shard above this size, with an index file (default 10GB)")
  p.add_argument("--overwrite", action="store_true", help="replace an existing --dst")
  args = p.parse_args(argv)

  from tools.convert_weights import convert  # heavy imports after argument parsing
  t0 = time.time()
  try:
    cfg = convert(args.src, args.dst, args.to, dtype=args.dtype, num_heads=args.num_heads,
                  head_dim=args.head_dim, max_shard_size=args.max_shard_size, overwrite=args.overwrite)
  except (ValueError, FileNotFoundError, FileExistsError, IsADirectoryError, KeyError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {args.dst} ({args.to}) in {time.time() - t0:.1f}s: depth {cfg.depth}, hidden "
        f"{cfg.hidden_size}, heads {cfg.num_heads}, qk_norm {cfg.qk_norm}, dual layers "
        f"{list(cfg.dual_attention_layers)}, pos grid {cfg.pos_embed_max_size}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
