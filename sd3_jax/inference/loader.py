"""One home for "load a generator from a workdir or a checkpoint": the model and its weights,
the text conditioning, the decoder, the latent shape and the mesh. ``sd3-sample``,
``sd3-evaluate`` and ``sd3-geneval-export`` share these flags and this loader.

Bad input raises ``ValueError`` / ``FileNotFoundError`` with one sentence that says what to do;
the commands print it as one line (``command.run``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from sd3_jax import config as config_lib
from sd3_jax import flow, sharding, text_conditioning
from sd3_jax.inference import generation, sampling
from sd3_jax.models import backbones
from sd3_jax.storage import checkpoint as ckpt_lib

log = logging.getLogger(__name__)


class Generator(NamedTuple):
  model: Any
  params: Any
  conditioner: Any
  decoder: Any
  latent_shape: tuple  # (h, w, channels) of the model's input
  mesh: Any
  step: Optional[int]  # the checkpoint step of --workdir (None for --checkpoint)
  config: Optional[dict]  # the run's training config (None for --checkpoint)
  formulation: Any  # what the model was trained with (a flow formulation): how to sample it


def default_dtype() -> str:
  """float32 on CPU (bf16 matmuls are slow there), bfloat16 on accelerators."""
  return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def add_generator_args(p: argparse.ArgumentParser) -> None:
  """The model, text-encoder, decoder and sampler flags of every generating command."""
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--workdir", help="training workdir (reads WORKDIR/checkpoints)")
  src.add_argument("--checkpoint", help="converted MM-DiT checkpoint directory (sd3_jax.storage.pretrained)")
  p.add_argument("--step", type=int, help="checkpoint step of --workdir (default: latest)")
  p.add_argument(
    "--no_ema", "--no-ema", dest="ema", action="store_false", help="--workdir: the raw parameters instead of the EMA"
  )
  p.add_argument(
    "--text_encoders",
    help="diffusers pipeline layout: text_encoder{,_2,_3}/ (our converted CLIP-L, CLIP-G, optional T5) "
    "and tokenizer{,_2,_3}/",
  )
  p.add_argument(
    "--t5_length",
    type=int,
    help="T5 tokens (default: --workdir's training length, else 77 as the reference; diffusers samples with 256)",
  )
  p.add_argument("--clip_length", type=int, help="CLIP tokens (default: --workdir's training length, else 77 as SD3)")
  p.add_argument("--no_t5", dest="t5", action="store_false", help="zeros instead of T5 (as the reference)")
  p.add_argument(
    "--project_clip_l",
    action="store_true",
    help="use CLIP-L's projected pooled vector (as diffusers) instead of the reference's un-projected one; "
    "they agree only when its text_projection is the identity, as in the released SD3 weights. Use what "
    "the model was trained with.",
  )
  dec = p.add_mutually_exclusive_group()
  dec.add_argument("--vae", help="our converted SD3 VAE checkpoint (decodes the latents)")
  dec.add_argument(
    "--pixel_space", action="store_true", help="the model works on images in [-1, 1] (no VAE), e.g. the embedded demo"
  )
  p.add_argument("--num_steps", type=int, default=28)
  p.add_argument("--cfg_scale", type=float, default=7.0, help="CFG weight (1 = no CFG)")
  p.add_argument("--shift", type=float, default=3.0, help="log-SNR shift of the sampling schedule (1: native)")
  p.add_argument(
    "--formulation",
    help="what the model was trained with, e.g. eps/linear or edm(-1.20,1.20) (docs/formulations.md); "
    "default: the run's (--workdir) or rectified flow (--checkpoint)",
  )
  p.add_argument("--seed", type=int, default=0)
  size = p.add_mutually_exclusive_group()
  size.add_argument(
    "--size", type=int, nargs=2, metavar=("H", "W"), help="image size in pixels (default: the run's training size)"
  )
  size.add_argument("--latent_size", type=int, nargs=2, metavar=("H", "W"), help="latent size")
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
    help="compute dtype (default for --workdir: its config's; otherwise float32 on CPU, bfloat16 on "
    "accelerators); also used by the text encoders and the VAE",
  )


def load_model(*, workdir=None, checkpoint=None, step=None, ema=True, mesh, dtype=None):
  """(model, params, training config or None, step or None) from a run's workdir or a converted
  checkpoint, loaded straight into the sampler's shardings on ``mesh``."""
  if (workdir is None) == (checkpoint is None):
    raise ValueError("give exactly one of a workdir and a checkpoint")
  if checkpoint is not None and (step is not None or not ema):
    raise ValueError("--step and --no_ema apply to --workdir only")
  if workdir is not None:
    model, params, config, step = ckpt_lib.load_workdir(workdir, step, use_ema=ema, mesh=mesh, dtype=dtype)
    log.info("loaded %s of step %d from %s", "EMA parameters" if ema else "parameters", step, workdir)
    return model, params, config, step
  from sd3_jax.storage import pretrained

  cfg = pretrained.read_config(checkpoint)
  model, params = pretrained.load_pretrained(
    checkpoint,
    dtype=jnp.dtype(dtype or default_dtype()),
    shardings=sampling.param_shardings(backbones.build(cfg), mesh),
  )
  return model, params, None, None


def latent_shape(model, config: Optional[dict], *, factor: int, size=None, latent_size=None) -> tuple[int, int, int]:
  """(h, w, channels) of the latents to sample: --latent_size, --size / factor, the run's
  training size, or 1024 pixels."""
  if latent_size:
    hw = tuple(latent_size)
  elif size:
    if any(s % factor for s in size):
      raise ValueError(f"--size {size[0]} {size[1]} must be divisible by the VAE factor {factor}")
    hw = tuple(s // factor for s in size)
  elif config is not None:  # the training resolution
    hw = (config["data"]["latent_size"],) * 2
  else:
    hw = (1024 // factor,) * 2
  p = model.config.patch_size
  if any(s % p for s in hw):
    raise ValueError(f"latent size {hw[0]}x{hw[1]} must be divisible by the patch size {p}")
  return (*hw, model.config.in_channels)


def generator_from_args(args: argparse.Namespace, conditioner=None, decoder=None) -> Generator:
  """The generator the flags of ``add_generator_args`` describe. ``conditioner`` / ``decoder``
  (see ``generation.generate``) replace --text_encoders / --vae when given."""
  if args.checkpoint and (args.step is not None or not args.ema):
    raise ValueError("--step and --no_ema apply to --workdir only")
  if conditioner is None and not args.text_encoders:
    found = os.path.join(args.workdir, "text_encoders") if args.workdir else None
    hint = f"; this workdir has one: --text_encoders {found}" if found and os.path.isdir(found) else ""
    raise ValueError(f"give --text_encoders DIR (our converted CLIP-L/CLIP-G/T5 checkpoints){hint}")
  if decoder is None and not (args.vae or args.pixel_space):
    raise ValueError("give --vae DIR for latent models, or --pixel_space for models that output images")
  requested = flow.get_formulation(args.formulation) if args.formulation else None  # a bad name fails first
  mesh = sharding.make_mesh(*args.mesh)
  model, params, config, step = load_model(
    workdir=args.workdir, checkpoint=args.checkpoint, step=args.step, ema=args.ema, mesh=mesh, dtype=args.dtype
  )
  dtype = args.dtype or default_dtype()
  if args.pixel_space and model.config.out_channels != 3:
    raise ValueError(f"--pixel_space needs a model with 3 output channels, this one has {model.config.out_channels}")
  if decoder is None and args.vae:
    decoder = generation.load_decoder(args.vae, dtype=dtype)
  factor = 1 if args.pixel_space else getattr(decoder, "downsample_factor", generation.VAE_FACTOR)
  shape = latent_shape(model, config, factor=factor, size=args.size, latent_size=args.latent_size)
  if conditioner is None:
    clip_length, t5_length = text_lengths(args.clip_length, args.t5_length, config)
    conditioner = text_conditioning.load_conditioner(
      args.text_encoders,
      dtype=dtype,
      t5_length=t5_length,
      use_t5=args.t5,
      clip_length=clip_length,
      project_clip_l=args.project_clip_l,
    )
  formulation = requested or flow.get_formulation(
    config_lib.formulation_name(config) if config is not None else flow.DEFAULT
  )
  return Generator(model, params, conditioner, decoder, shape, mesh, step, config, formulation)


def text_lengths(clip_length: Optional[int], t5_length: Optional[int], config: Optional[dict]) -> tuple[int, int]:
  """(CLIP tokens, T5 tokens) to encode prompts with: those given, else those the run was
  trained with (its config's text.clip_tokens, and data.context_len minus them), else SD3's 77
  and 77 (a converted checkpoint has no training config). Lengths other than the run's make the
  model see a context it never saw (noisy, tinted samples): a one-line warning says so."""
  if config is None:
    return clip_length or 77, t5_length or 77
  run_clip = config["text"]["clip_tokens"]
  run_t5 = config["data"]["context_len"] - run_clip
  clip = run_clip if clip_length is None else clip_length
  t5 = run_t5 if t5_length is None else t5_length
  if (clip, t5) != (run_clip, run_t5):
    log.warning(
      "--clip_length %d --t5_length %d differ from the %d CLIP + %d T5 tokens the run was trained with (its "
      "config's text.clip_tokens and data.context_len): samples may be noise; leave both flags out to use the run's",
      clip,
      t5,
      run_clip,
      run_t5,
    )
  return clip, t5


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
