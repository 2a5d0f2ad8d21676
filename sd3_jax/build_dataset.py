"""Builds latent-record datasets (``sd3_jax.data.records`` format) from images and captions.

  # folder of images + JSONL {"file": "a/b.jpg", "caption": "...", "caption2": "..." (optional)}
  python -m sd3_jax.build_dataset --images DIR --captions caps.jsonl --out data/train \
      --vae ckpt/vae --text_encoders ckpt/text --resolution 512 [--buckets] [--latent_sample sample]
  # any tensorflow-datasets dataset with an image and a text feature (read without TensorFlow)
  python -m sd3_jax.build_dataset --tfds NAME --tfds_data_dir DIR --split train \
      --image_key image --text_key caption --out data/train --vae ckpt/vae --text_encoders ckpt/text
  # pixel-space demo models: store the [-1, 1] image itself as the "latent"
  python -m sd3_jax.build_dataset ... --identity_vae

Work is cut into chunks of ``--chunk_size`` source examples and split over processes; an
interrupted run resumes without duplicates or losses (sd3_jax/data/builder.py says how).
"""

from __future__ import annotations

import argparse

from sd3_jax import command
from sd3_jax.data import builder, image_sources
from sd3_jax.data.builder import ImageEncoder, TextEncoderFn


def main(argv=None, *, image_encoder: ImageEncoder | None = None, text_encoder: TextEncoderFn | None = None) -> dict:
  p = command.ArgumentParser(
    prog="sd3-build-dataset", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--out", required=True)
  p.add_argument("--images", help="image folder (with --captions JSONL)")
  p.add_argument("--captions", help="JSONL: {file, caption[, caption2][, id]}")
  p.add_argument("--tfds", help="tensorflow-datasets name (array_record format)")
  p.add_argument("--tfds_data_dir")
  p.add_argument("--split", default="train")
  p.add_argument("--image_key", default="image")
  p.add_argument("--text_key", default="caption")
  p.add_argument("--text_key2", help="second caption feature, mixed 50/50")
  p.add_argument("--resolution", type=int, default=256)
  p.add_argument("--buckets", action="store_true", help="equal-area aspect buckets, one subdirectory each")
  p.add_argument("--bucket_multiple", type=int, default=64)
  p.add_argument("--max_aspect", type=float, default=2.0)
  p.add_argument("--vae", help="our converted SD3 VAE checkpoint")
  p.add_argument(
    "--identity_vae",
    "--pixel_space",
    dest="identity_vae",
    action="store_true",
    help="store the [-1, 1] image as the latent (pixel-space models)",
  )
  p.add_argument("--latent_sample", choices=["mean", "sample"], default="mean")
  p.add_argument("--latent_dtype", choices=["float16", "bfloat16", "float32"], default="float16")
  p.add_argument("--text_encoders", help="directory for SD3TextConditioner.from_pretrained")
  p.add_argument("--no_t5", action="store_true")
  p.add_argument("--t5_length", type=int, default=77)
  p.add_argument("--clip_length", type=int, default=77, help="CLIP tokens (77 as SD3)")
  p.add_argument(
    "--project_clip_l",
    action="store_true",
    help="store CLIP-L's projected pooled vector (as diffusers) instead of the reference's "
    "un-projected one; identical when its text_projection is the identity (SD3)",
  )
  p.add_argument("--dtype", default="float32", help="encoder compute dtype")
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--chunk_size", type=int, default=1000)
  p.add_argument("--records_per_shard", type=int, default=1000)
  p.add_argument("--prefix", default="data")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--process_index", type=int)
  p.add_argument("--process_count", type=int)
  args = p.parse_args(argv)

  if bool(args.tfds) == bool(args.images or args.captions):
    p.error("give either --images and --captions, or --tfds")
  if args.tfds:
    source = image_sources.TfdsSource.from_name(
      args.tfds,
      args.tfds_data_dir,
      args.split,
      image_key=args.image_key,
      text_key=args.text_key,
      text_key2=args.text_key2,
    )
  else:
    if not (args.images and args.captions):
      p.error("--images and --captions go together")
    source = image_sources.FolderSource(args.images, args.captions)
  if image_encoder is None:
    if args.identity_vae:
      image_encoder = builder.identity_image_encoder
    elif args.vae:
      image_encoder = builder.load_vae_encoder(
        args.vae, sample=args.latent_sample == "sample", seed=args.seed, dtype=args.dtype
      )
    else:
      p.error("give --vae DIR, or --identity_vae for pixel-space models")
  if text_encoder is None:
    if not args.text_encoders:
      p.error("give --text_encoders DIR")
    from sd3_jax import text_conditioning

    text_encoder = text_conditioning.load_conditioner(
      args.text_encoders,
      dtype=args.dtype,
      use_t5=not args.no_t5,
      t5_length=args.t5_length,
      clip_length=args.clip_length,
      project_clip_l=args.project_clip_l,
    ).encode
  if args.process_index is None or args.process_count is None:
    import jax

    args.process_index = jax.process_index() if args.process_index is None else args.process_index
    args.process_count = jax.process_count() if args.process_count is None else args.process_count
  buckets = (
    image_sources.aspect_buckets(args.resolution, args.bucket_multiple, args.max_aspect) if args.buckets else None
  )
  metadata = {
    "source": f"tfds:{args.tfds}/{args.split}" if args.tfds else f"folder:{args.captions}",
    "vae": "identity" if args.identity_vae else args.vae,
    "latent_sample": args.latent_sample,
    "text_encoders": args.text_encoders,
    "caption_mixing": "50/50 by (seed, id)",
    "clip_l_pooled": "projected" if args.project_clip_l else "un-projected (reference)",
  }
  result = builder.build(
    source,
    args.out,
    image_encoder=image_encoder,
    text_encoder=text_encoder,
    resolution=args.resolution,
    buckets=buckets,
    batch_size=args.batch_size,
    chunk_size=args.chunk_size,
    records_per_shard=args.records_per_shard,
    seed=args.seed,
    prefix=args.prefix,
    latent_dtype=args.latent_dtype,
    process_index=args.process_index,
    process_count=args.process_count,
    metadata=metadata,
  )
  s = result["summary"]
  print(
    f"process {args.process_index}/{args.process_count}: built chunks {result['processed_chunks']}, "
    f"skipped {result['skipped_examples']} unreadable example(s) in them"
  )
  if s is None:
    print("other processes' chunks are not finished yet; the last one to finish writes dataset_info.json")
  else:
    print(
      f"dataset complete: {s['num_records']} records in {s['directories']}, "
      f"{s['skipped_examples']} unreadable example(s) skipped in all"
    )
  return result


def entry_point() -> None:
  """Console entry point (``sd3-build-dataset``): expected errors end in one line and exit code 2."""
  command.run(
    main,
    "sd3-build-dataset",
    on_interrupt="the finished chunks are kept (marked in OUT/.build/); rerun the same command to build the rest",
  )


if __name__ == "__main__":
  entry_point()
