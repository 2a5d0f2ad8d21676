"""The toy study's data and its sample-quality score, built from the embedded demo's own parts.

``prepare_data`` writes the demo's random text encoders and coloured-shapes records
(``sd3_jax.demo.stages``: train scenes over 408 caption combinations, validation scenes over the 24
held-out ones). ``score_run`` samples the held-out prompts from a run's EMA weights and reads them
back with the demo's checker (``sd3_jax.demo.scenes``), standing in for GenEval: it writes
``RUN/sample_eval.json``, which ``analyze`` joins to the run's validation loss.
"""

from __future__ import annotations

import logging
import os
from typing import Sequence

import numpy as np

from sd3_jax.storage import fileutil
from sd3_jax.demo import config as demo_config
from sd3_jax.demo import encoders as demo_encoders
from sd3_jax.demo import stages as demo_stages
from sd3_jax.demo import scenes as scene_lib

log = logging.getLogger(__name__)

SAMPLE_FILE = "sample_eval.json"


def sweep_on_demo_data(name: str, data_dir: str, overrides: dict | None = None):
  """A sweep of the demo's pixel-space model (``sd3_jax/demo/config.py``) on the toy data in
  ``data_dir`` (``sd3-scaling toy_data``'s records): batch 16, a log line every 50 steps, one
  kept checkpoint, validation on 128 held-out examples; ``overrides`` (dotted keys) are added
  after these. The caller sets the family, the validation points and the grids."""
  from sd3_jax.scaling.sweep import dotted, sweep_config

  s = sweep_config()
  s.name = name
  s.base_config = os.path.abspath(demo_config.__file__)
  data_dir = os.path.abspath(data_dir)
  s.base_overrides = dotted(
    {
      "data.path": os.path.join(data_dir, "train"),
      "data.val_path": os.path.join(data_dir, "val"),
      "global_batch_size": 16,
      "log_every": 50,
      "keep_checkpoints": 1,
      "val.num_examples": 128,
      "val.batch_size": 64,
      **(overrides or {}),
    }
  )
  return s


def prepare_data(
  workdir: str, *, num_train: int = 20_000, num_val: int = 512, num_heldout: int = 24, seed: int = 0
) -> dict[str, str]:
  """Text encoders and train/val records under ``workdir`` (skipped when present); returns
  their paths {text_encoders, train, val}."""
  from sd3_jax import text_conditioning

  workdir = os.path.abspath(workdir)
  train_scenes, heldout = scene_lib.split_scenes(num_heldout, seed=seed)
  text_dir = os.path.join(workdir, "text_encoders")
  if not os.path.isdir(text_dir):
    demo_encoders.make_text_encoders(
      text_dir,
      [s.caption for s in scene_lib.all_scenes()],
      clip_l_dim=demo_config.CLIP_L_DIM,
      clip_g_dim=demo_config.CLIP_G_DIM,
      t5_dim=demo_config.T5_DIM,
      seed=seed,
    )
  conditioner = text_conditioning.SD3TextConditioner.from_pretrained(
    text_dir, clip_length=demo_config.CLIP_TOKENS, t5_length=demo_config.T5_TOKENS
  )
  size = demo_config.IMAGE_SIZE
  paths = {
    "text_encoders": text_dir,
    "train": os.path.join(workdir, "data", "train"),
    "val": os.path.join(workdir, "data", "val"),
  }
  demo_stages.build_records(
    demo_stages.SceneSource(train_scenes, num_train, size=size, seed=seed, name="train"),
    paths["train"],
    conditioner,
    resolution=size,
  )
  demo_stages.build_records(
    demo_stages.SceneSource(heldout, num_val, size=size, seed=seed + 1, name="val"),
    paths["val"],
    conditioner,
    resolution=size,
  )
  return paths


def score_run(
  run_dir: str,
  text_encoders: str,
  *,
  num_heldout: int = 24,
  samples_per_prompt: int = 8,
  sampling_steps: int | Sequence[int] = 28,
  cfg_scale: float = 3.0,
  seed: int = 0,
) -> dict:
  """Held-out sample accuracy of a run's last checkpoint (EMA weights), sampled with the run's
  formulation, written to ``RUN/sample_eval.json``; an existing file for the same checkpoint step
  and step counts is reused (one written before ``reading_distance`` existed is rescored). Several
  ``sampling_steps`` (the paper compares 5, 10, 25 and 50) are each scored, under ``by_steps``;
  the top-level accuracy is the first count's. Beside the
  accuracy (how well samples match their captions) each count records ``reading_distance``, how
  far the checker's readings of the samples are as a distribution from its readings of real
  renders of the same prompts (``scenes.reading_distance``; lower is better): the second quality
  measure the paper's ranking needs, as FID is beside CLIP score."""
  from sd3_jax import config as config_lib
  from sd3_jax import flow, text_conditioning
  from sd3_jax.inference import generation
  from sd3_jax.storage import checkpoint

  counts = [int(sampling_steps)] if isinstance(sampling_steps, int) else [int(n) for n in sampling_steps]
  path = os.path.join(run_dir, SAMPLE_FILE)
  steps = checkpoint.committed_steps(os.path.join(os.path.abspath(run_dir), "checkpoints"))
  if not steps:
    raise FileNotFoundError(f"{run_dir} has no committed checkpoint to sample from")
  if os.path.exists(path):
    found = _read(path)
    same = found.get("step") == steps[-1] and sorted(found.get("by_steps", {})) == sorted(str(n) for n in counts)
    if same and all("reading_distance" in v for v in found["by_steps"].values()):  # older files lack it
      return found
  model, params, config, step = checkpoint.load_workdir(run_dir, use_ema=True)
  formulation = flow.get_formulation(config_lib.formulation_name(config))
  _, heldout = scene_lib.split_scenes(num_heldout, seed=seed)
  clip_tokens = config["text"]["clip_tokens"]
  conditioner = text_conditioning.SD3TextConditioner.from_pretrained(
    text_encoders, clip_length=clip_tokens, t5_length=config["data"]["context_len"] - clip_tokens
  )
  size = config["data"]["latent_size"]
  scenes = [s for s in heldout for _ in range(samples_per_prompt)]
  references = scene_lib.renders(scenes, size, seed=seed)  # real renders of the same prompts
  by_steps = {}
  for n in counts:
    images = generation.generate(
      model,
      params,
      conditioner,
      [s.caption for s in heldout],
      latent_shape=(size, size, config["data"]["latent_channels"]),
      num_per_prompt=samples_per_prompt,
      num_steps=n,
      shift=config["flow"]["shift"],
      cfg_scale=cfg_scale,
      seed=seed,
      formulation=formulation,
    )
    acc = scene_lib.accuracy(list(images), scenes)
    distance = scene_lib.reading_distance(list(images), references, scenes)
    by_steps[str(n)] = {
      "sample_accuracy": acc["all"],
      "part_accuracy": float(np.mean([acc[k] for k in ("colors", "shape1", "shape2", "relation")])),
      "parts": acc,
      "chance": demo_stages.chance_accuracy(list(images), scenes, seed=seed),
      "reading_distance": distance["mean"],
      "reading_parts": {k: v for k, v in distance.items() if k != "mean"},
    }
  first = by_steps[str(counts[0])]
  result = {
    "step": step,
    **first,
    "by_steps": by_steps,
    "num_prompts": len(heldout),
    "samples_per_prompt": samples_per_prompt,
    "sampler": {"steps": counts[0], "cfg_scale": cfg_scale, "weights": "ema", "formulation": formulation.name},
  }
  fileutil.atomic_json(path, result, indent=1)
  log.info(
    "%s: sample accuracy %.3f (parts %.3f), reading distance %.3f",
    run_dir,
    result["sample_accuracy"],
    result["part_accuracy"],
    result["reading_distance"],
  )
  return result


def _read(path: str) -> dict:
  import json

  with open(path) as f:
    return json.load(f)
