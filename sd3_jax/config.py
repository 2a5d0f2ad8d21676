"""The experiment-config schema: every key the trainer reads, its default and its meaning.

Experiment files (``configs/*.py``) start from ``base_config()`` and change what they need; every
key is an override point (``--config.optimizer.learning_rate=3e-4``) and unknown keys are errors.
``load_config_file`` loads such a file by path, from any working directory, as ml_collections'
``config_flags`` does.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Mapping

import ml_collections
from ml_collections import config_dict

# Architecture fields (sd3_jax.models.mmdit.MMDiTConfig) a config may override on top of the preset.
_MODEL_FIELDS = dict(
  depth=int,
  hidden_size=int,
  num_heads=int,
  patch_size=int,
  in_channels=int,
  out_channels=int,
  pooled_dim=int,
  context_dim=int,
  pos_embed_max_size=int,
  qk_norm=bool,
  dual_attention_layers=tuple,
  mlp_ratio=int,
  pos_embed_base_size=int,
  pos_embed_scale=float,
  parametrization=str,  # 'sp' | 'mup' (sd3_jax/models/mup.py, docs/mup_wsd.md)
  mup_base_width=int,
  mup_base_head_dim=int,
  backbone=str,  # 'mmdit' (default) | 'mmdit3' | 'dit' | 'crossdit' | 'uvit' (docs/backbones.md)
  clip_tokens=int,  # 'mmdit3': context rows that are CLIP tokens (= text.clip_tokens)
  uvit_res_blocks=int,  # 'uvit': conv blocks per stage
)


# Keys the formulation replaced (config.flow.formulation), kept as placeholders that must stay None.
RETIRED_FLOW_KEYS = dict(sampler=str, logit_mean=float, logit_std=float, mode_scale=float)
_SAMPLER_DEFAULTS = dict(sampler="logit_normal", logit_mean=0.0, logit_std=1.0, mode_scale=1.29)


def formulation_of_legacy(flow: Mapping[str, Any]) -> str:
  """The formulation name that a config of the old schema (flow.sampler, flow.logit_mean,
  flow.logit_std, flow.mode_scale; unset keys at their old defaults) trained."""
  v = {k: (flow.get(k) if flow.get(k) is not None else d) for k, d in _SAMPLER_DEFAULTS.items()}
  names = {
    "logit_normal": f"rf/lognorm({v['logit_mean']:.2f},{v['logit_std']:.2f})",
    "mode": f"rf/mode({v['mode_scale']:.2f})",
    "cosmap": "rf/cosmap",
    "uniform": "rf",
  }
  if v["sampler"] not in names:
    raise ValueError(f"unknown flow.sampler {v['sampler']!r} in an old config; it was one of {sorted(names)}")
  return names[v["sampler"]]


def formulation_name(config: Mapping[str, Any]) -> str:
  """The formulation a (saved) experiment config trains: flow.formulation, or for configs
  written before it existed, the one its retired flow.sampler keys meant."""
  flow = dict(config.get("flow") or {})
  if flow.get("formulation"):
    return flow["formulation"]
  return formulation_of_legacy(flow)


def check_retired(config) -> None:
  """Refuses a config that sets a retired key, naming config.flow.formulation and the value
  that means the same."""
  flow = config.get("flow") or {}
  set_keys = [k for k in RETIRED_FLOW_KEYS if flow.get(k) is not None]
  if set_keys:
    keys = ", ".join(f"flow.{k}" for k in set_keys)
    raise ValueError(
      f"config {keys} is retired: the timestep density is part of config.flow.formulation now; "
      f"set flow.formulation={formulation_of_legacy(flow)!r} and remove {keys}"
    )


def model_config(preset: str, **overrides) -> ml_collections.ConfigDict:
  """config.model: a preset ('sd3-medium', 'sd3.5-large', 'sd3.5-medium', 'd<N>') plus any
  MMDiTConfig fields that override it (None = keep the preset's value). Changing `depth`
  alone re-derives hidden size 64*d and d heads. `backbone` picks the network of the paper's
  architecture study (docs/backbones.md): --config.model.backbone=crossdit."""
  m = ml_collections.ConfigDict({"preset": preset})
  for name, typ in _MODEL_FIELDS.items():
    m[name] = overrides.pop(name) if name in overrides else config_dict.placeholder(typ)
  if overrides:
    raise ValueError(f"unknown model fields {sorted(overrides)}")
  return m


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Model: a preset plus optional field overrides, e.g. --config.model.preset=d30 or
  # --config.model.qk_norm=True (see model_config above).
  c.model = model_config("sd3-medium")
  c.dtype = "bfloat16"  # compute dtype; parameters and optimizer state are float32
  c.remat = "full"  # a policy of sd3_jax/models/remat.py: 'none' | 'full' | 'dots' |
  # 'save_attn' | 'save_qkv_attn' | ... (docs/performance.md)
  c.scan_layers = True  # scan over runs of identical blocks (fast compiles at depth)
  # 'auto' (splash on TPU, cuDNN on GPU in bf16/fp16, XLA elsewhere) | 'xla' (float32 softmax) |
  # 'splash' (Pallas TPU kernel) | 'splash_interpret' (the kernel on CPU, slow) | 'cudnn' (GPU).
  c.attention_impl = "auto"
  # Splash tile sizes along the joint sequence; 0 = by length (512 at 256^2, 256 at 1024^2).
  c.attention_block_q = 0
  c.attention_block_kv = 0

  c.seed = 0
  c.total_steps = 500_000
  c.global_batch_size = 4096
  c.grad_accum_steps = 1  # microbatches per optimizer step (global batch is split)

  c.log_every = 100
  c.checkpoint_every = 2000
  c.keep_checkpoints = 3
  # Steps at which a checkpoint is also written and never deleted by keep_checkpoints: the
  # branch points of cooldown branches (sd3_jax.scaling sets them on a sweep's stable runs).
  c.keep_checkpoint_steps = ()
  c.async_checkpointing = True
  # zstd for the saved arrays (orbax's default); False: faster saves, larger files. Either way
  # every array's checksum is recorded and checked on resume (docs/multislice.md).
  c.checkpoint_compression = True
  # Start a new run from one of our converted MM-DiT checkpoints (sd3-convert --to jax,
  # sd3_jax.storage.pretrained): its weights and positional table, a fresh optimizer. Ignored once the
  # run has a checkpoint of its own (a restart resumes that).
  c.init_from = ""
  # Start a new run from another run's training checkpoint (RUN/checkpoints/STEP): its
  # parameters, EMA, optimizer state, step and data position, continued under this config (a
  # cooldown branch: the same run with a shorter total_steps; docs/mup_wsd.md). Everything but
  # the length and the checkpoint cadence must equal that run's config. Ignored once the run has
  # a checkpoint of its own.
  c.branch_from = ""
  # jax.transfer_guard level ('allow' | 'log' | 'disallow') around the steady-state steps of the
  # loop (neither logging nor checkpoint/validation/sample steps): 'disallow' proves that a step
  # makes no implicit host<->device transfers (the tests do).
  c.transfer_guard = "allow"

  # AdamW (the paper's appendix: lr 1e-4, 1000 warm-up steps). Weight decay applies to kernels only.
  # schedule after the linear warm-up: 'constant' | 'cosine' | 'linear' (decay to end_lr_ratio x
  # lr at total_steps) | 'wsd' (warmup-stable-decay: constant, then a cooldown over the last
  # round(decay_fraction x total_steps) steps shaped '1-sqrt' | 'linear' | 'cosine'; docs/mup_wsd.md).
  c.optimizer = ml_collections.ConfigDict(
    dict(
      learning_rate=1e-4,
      warmup_steps=1000,
      schedule="constant",
      end_lr_ratio=0.0,
      decay_fraction=0.2,
      decay_shape="1-sqrt",
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      weight_decay=0.01,
      grad_clip=1.0,
    )
  )
  # EMA of the parameters, updated every `every` steps (the paper's appendix, as read by the
  # spec's secondary source: 0.99 every 100 steps).
  c.ema = ml_collections.ConfigDict(dict(decay=0.99, every=100))

  # The formulation (the paper, sections 2-3; docs/formulations.md): a name in the paper's
  # Table 1 notation, e.g. 'rf/lognorm(0.00,1.00)' (rectified flow, logit-normal t: the
  # default), 'rf/mode(1.29)', 'rf', 'eps/linear', 'v/cos', 'edm(-1.20,1.20)', 'edm/rf'.
  # shift: rectified flow's resolution shift of the training t (1 = none; rf formulations only).
  # text_dropout: each text encoder dropped with this probability (classifier-free guidance).
  # The retired keys sampler/logit_mean/logit_std/mode_scale are now part of the formulation's
  # name; they stay in the schema only so that setting one is refused with its replacement.
  c.flow = ml_collections.ConfigDict(
    dict(
      formulation="rf/lognorm(0.00,1.00)",
      shift=1.0,
      text_dropout=0.464,
      **{k: config_dict.placeholder(t) for k, t in RETIRED_FLOW_KEYS.items()},
    )
  )
  # Where each text encoder lives inside context / pooled (for the dropout).
  c.text = ml_collections.ConfigDict(dict(clip_l_dim=768, clip_g_dim=1280, clip_tokens=77))

  # Data: 'synthetic' (random, same element spec) or 'records' (the sd3_jax.data.records format).
  # worker_count: grain worker processes; -1 = by the host's cores (0 below 8 cores,
  # input_pipeline.resolve_worker_count); a resume needs the same count. prefetch: global
  # batches assembled and sent to the devices ahead of the step (0 = none).
  c.data = ml_collections.ConfigDict(
    dict(
      source="synthetic",
      path="",
      val_path="",
      latent_size=32,
      latent_channels=16,
      context_len=154,
      context_dim=4096,
      pooled_dim=2048,
      num_synthetic=100_000,
      worker_count=-1,
      shuffle=True,
      prefetch=2,
      # Records only: validation reads val_path; or, when val_holdout=N > 0 (and no val_path),
      # the last N records of `path`, which training then never sees. With neither, a run
      # with validation is refused (it never falls back to the training records).
      val_holdout=0,
      # Mixed aspect ratios: latent (h, w) of every bucket, e.g. ((32, 32), (24, 40), (40, 24));
      # () = one square bucket of latent_size. Records: bucket (h, w) is the subdirectory
      # "<h*f>x<w*f>" (f = bucket_pixels_per_latent: 8 for SD3's VAE, 1 in pixel space) of path
      # and val_path, as `sd3-build-dataset --buckets` writes them.
      buckets=(),
      bucket_pixels_per_latent=8,
    )
  )

  # Validation loss the paper's way (fixed t levels, fixed noise, fixed examples).
  c.val = ml_collections.ConfigDict(
    dict(every=10_000, num_examples=512, batch_size=64, levels=8, seed=1234, use_ema=False)
  )

  # Periodic sample grids from the EMA weights into WORKDIR/samples/ (sd3_jax.sample);
  # every=0: off. text_encoders / vae: our converted checkpoints (docs/sampling.md);
  # pixel_space: the model's output is the image itself (no VAE); project_clip_l: CLIP-L's
  # projected pooled vector (diffusers) instead of the reference's un-projected one.
  c.sample = ml_collections.ConfigDict(
    dict(
      every=0,
      prompts=("a photo of a cat",),
      num_per_prompt=1,
      num_steps=28,
      cfg_scale=7.0,
      shift=3.0,
      seed=0,
      text_encoders="",
      vae="",
      pixel_space=False,
      t5_length=77,
      clip_length=77,
      project_clip_l=False,
    )
  )

  # Periodic evaluation (sd3_jax/evaluation) from the EMA weights: CLIP score and FID on CLIP
  # features of samples of `prompts`, logged as eval/clip_score and eval/fid_clip in
  # metrics.jsonl; every=0: off. Sampling uses config.sample's text_encoders / vae /
  # pixel_space / t5_length / clip_length. clip: our converted CLIP model (CLIP score; the
  # paper: CLIP-L/14); fid_clip: '' = clip (clean-fid: ViT-B/32); reference_stats: .npz from
  # sd3_jax.evaluation.reference_stats computed with fid_clip ('' = no FID); num_images: 0 = one per prompt.
  # step_counts: sampling step counts to evaluate at instead of num_steps, each logged as
  # eval/steps<N>/... (the paper compares 5, 10, 25 and 50; docs/formulations.md); () = num_steps.
  c.eval = ml_collections.ConfigDict(
    dict(
      every=0,
      prompts=("a photo of a cat", "a red bus parked on a street"),
      num_images=0,
      batch_size=8,
      num_steps=28,
      step_counts=(),
      cfg_scale=7.0,
      shift=3.0,
      seed=0,
      clip="",
      fid_clip="",
      reference_stats="",
      clip_batch_size=64,
    )
  )

  # Mesh: data, fsdp, tensor within one slice (-1: all remaining devices of the slice);
  # dcn_*: how many slices each axis spans (multi-slice TPU; -1: all slices). The default runs
  # data parallelism across slices; the product of the dcn_* axes must be the slice count.
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, dcn_data=-1, dcn_fsdp=1, dcn_tensor=1))
  # Peak FLOP/s per device for MFU; 0 = look up the device kind (None on CPU -> MFU null).
  c.peak_flops_per_device = 0.0
  return c


def load_config_file(
  path: str, arg: str | None = None, overrides: Mapping[str, Any] | None = None
) -> ml_collections.ConfigDict:
  """``get_config()`` (or ``get_config(arg)``) of the Python file at ``path``, locked.

  The file is executed as a module of its own name, without touching ``sys.path``, as
  ``config_flags.DEFINE_config_file`` does; it may import ``sd3_jax.config``. ``overrides``
  ({"optimizer.learning_rate": 3e-4, ...}) are applied afterwards; an unknown key is an error.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no config file {path!r}: give the path of a Python file with get_config()")
  name = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(f"sd3_jax_config_file_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"config file {path!r} has no get_config() function")
  config = module.get_config() if arg is None else module.get_config(arg)
  config.lock()  # before the overrides: a key that does not exist is an error, not a new key
  if overrides:
    try:
      config.update_from_flattened_dict(dict(overrides))
    except (AttributeError, KeyError) as e:  # a key that does not exist: one sentence, with a suggestion
      from sd3_jax import command

      raise ValueError(f"{path}: {command.config_key_error(e)}") from None
  check_retired(config)
  return config
