r"""The embedded demo end to end (``sd3-demo``, ``bash launch/demo.sh``): tokenizers and small
random text encoders, records of generated scenes, the real trainer, then held-out prompts
sampled and scored by the scenes checker into summary.json. Every stage resumes. What it writes
and what it reaches are in docs/demo.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import time
from typing import Sequence


from sd3_jax import config as config_lib
from sd3_jax.storage import checkpoint, fileutil
from sd3_jax import command, flow
from sd3_jax.inference import generation
from sd3_jax.demo import encoders, stages
from sd3_jax.demo import scenes as scene_lib

log = logging.getLogger(__name__)

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config.py")
EPILOG = """\
  bash launch/demo.sh [WORKDIR]            # creates .venv if missing, then runs this command
  sd3-demo --workdir DIR [--steps N] [--config FILE]   # = python -m sd3_jax.demo

Everything is generated here, nothing is downloaded. Into WORKDIR:

  text_encoders/   tokenizers trained on the demo's captions and RANDOMLY initialised small
                   CLIP-L, CLIP-G and T5 encoders of the real architectures, in the diffusers
                   pipeline layout that sd3-sample --text_encoders reads
  data/train, data/val   records of 32x32 scenes of two coloured shapes ("a red circle above
                   a blue square"): train over 408 caption combinations, val over 24 held-out
                   ones; the image in [-1, 1] is the "latent" (pixel space)
  checkpoints/, metrics.jsonl   the real trainer with sd3_jax/demo/config.py
  loss.png         training and validation loss against steps
  samples_heldout.png   a row of samples per held-out prompt, the prompt beside it
  summary.json     val_loss, sample_accuracy on the held-out prompts (the scenes checker reads
                   colours, shapes and the relation back) and the chance level (the same
                   images scored against shuffled held-out captions)
  stage_seconds.json   seconds per stage, accumulated over reruns (summary.json's "seconds")

Each stage is skipped when its output is complete (a line says so), so rerunning resumes and a
finished workdir is left as it is. Ctrl-C during training saves the current step; every Ctrl-C
exits 130 and keeps the finished stages.
"""


# ---------------------------------------------------------------------------------------------
# The whole demo


def run(
  workdir: str,
  *,
  config_path: str = DEFAULT_CONFIG,
  steps: int | None = None,
  num_train: int = 20_000,
  num_val: int = 512,
  num_heldout: int = 24,
  samples_per_prompt: int = 8,
  sampling_steps: int = 28,
  cfg_scale: float = 3.0,
  use_ema: bool = True,
  seed: int = 0,
  overrides: dict | None = None,
) -> dict:
  """Runs (or resumes) every stage into ``workdir``; returns the summary written to summary.json.

  A stage whose output is complete is skipped (a line says so): the encoders and records when
  present, training when the latest checkpoint has reached the step count, sampling and scoring
  when summary.json already holds them for that checkpoint and these settings. The seconds each
  stage took accumulate in WORKDIR/stage_seconds.json over reruns (a skipped stage adds nothing),
  so summary.json keeps the first run's timings.

  ``overrides``: {"dotted.config.key": value} applied to the config (tests shrink the model)."""
  from sd3_jax import text_conditioning
  from sd3_jax.training import train  # after flag parsing: jax starts here

  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  config = config_lib.load_config_file(config_path, overrides=overrides)
  if steps is not None:
    config.total_steps = steps
  config.seed = seed
  size = config.data.latent_size
  clip_tokens = config.text.clip_tokens
  t5_tokens = config.data.context_len - clip_tokens
  if config.data.latent_channels != 3 or config.model.in_channels != 3 or config.model.out_channels != 3:
    raise ValueError("the demo trains in pixel space: data.latent_channels and the model's in/out channels must be 3")
  if t5_tokens < 1:
    raise ValueError(
      f"data.context_len {config.data.context_len} leaves no T5 tokens after text.clip_tokens {clip_tokens}"
    )

  train_scenes, heldout = scene_lib.split_scenes(num_heldout, seed=seed)
  seconds = _Seconds(os.path.join(workdir, "stage_seconds.json"))
  text_dir = os.path.join(workdir, "text_encoders")
  data_dir = os.path.join(workdir, "data")
  loaded = {}

  def conditioner():  # loaded when a stage needs it (not when every stage is finished)
    if "c" not in loaded:
      c = text_conditioning.SD3TextConditioner.from_pretrained(text_dir, clip_length=clip_tokens, t5_length=t5_tokens)
      if c.layout.pooled_dim != config.data.pooled_dim or c.context_dim != config.data.context_dim:
        raise ValueError(
          f"{text_dir} gives pooled {c.layout.pooled_dim} / context width {c.context_dim}, the config expects "
          f"{config.data.pooled_dim} / {config.data.context_dim}: remove {text_dir} to rebuild it"
        )
      loaded["c"] = c
    return loaded["c"]

  # 1. Tokenizers and random encoders.
  if os.path.isdir(text_dir):
    _say(f"[1/4] text encoders: {text_dir} is there, skipped")
  else:
    _say(f"[1/4] text encoders: tokenizers from the captions and random small CLIP-L, CLIP-G, T5 -> {text_dir}")
    with seconds.stage("text_encoders_s"):
      encoders.make_text_encoders(
        text_dir,
        [s.caption for s in scene_lib.all_scenes()],
        clip_l_dim=config.text.clip_l_dim,
        clip_g_dim=config.text.clip_g_dim,
        t5_dim=config.data.context_dim,
        seed=seed,
      )

  # 2. Records (train: 408 combinations; val: the held-out ones).
  train_source = stages.SceneSource(train_scenes, num_train, size=size, seed=seed, name="train")
  val_source = stages.SceneSource(heldout, num_val, size=size, seed=seed + 1, name="val")
  todo = [
    (source, os.path.join(data_dir, name))
    for source, name in ((train_source, "train"), (val_source, "val"))
    if stages.finished_records(os.path.join(data_dir, name), len(source)) is None
  ]
  if not todo:
    _say(f"[2/4] data: {num_train} training and {num_val} held-out records in {data_dir}, skipped")
  else:
    _say(f"[2/4] data: {num_train} training and {num_val} held-out scenes -> records in {data_dir}")
    with seconds.stage("data_s"):
      for source, out in todo:
        stages.build_records(source, out, conditioner(), resolution=size)

  # 3. Training with the real trainer.
  config.data.path = os.path.join(data_dir, "train")
  config.data.val_path = os.path.join(data_dir, "val")
  config.val.num_examples = min(config.val.num_examples, num_val)
  done = checkpoint.committed_steps(os.path.join(workdir, "checkpoints"))
  if done and done[-1] >= config.total_steps:
    _say(f"[3/4] training: the checkpoint of step {done[-1]} is there (of {config.total_steps}), skipped")
  else:
    _say(
      f"[3/4] training: {config.total_steps} steps of {config_path}"
      + (f", resuming from step {done[-1]}" if done else "")
      + f" (a line every {config.log_every} steps; Ctrl-C saves the current step)"
    )
    with seconds.stage("train_s"):
      train.train_and_evaluate(config, workdir)

  # 4. Samples for the held-out prompts, read back by the checker.
  summary_path = os.path.join(workdir, "summary.json")
  step = checkpoint.committed_steps(os.path.join(workdir, "checkpoints"))[-1]
  prompts = [s.caption for s in heldout]
  sampler = {
    "steps": sampling_steps,
    "cfg_scale": cfg_scale,
    "shift": config.flow.shift,
    "formulation": config.flow.formulation,
    "weights": "ema" if use_ema else "raw",
    "checkpoint_step": step,
  }
  found = _read_json(summary_path)
  if (
    found.get("sampler") == sampler
    and found.get("heldout_prompts") == prompts
    and found.get("samples_per_prompt") == samples_per_prompt
    and os.path.exists(os.path.join(workdir, "samples_heldout.png"))
  ):
    _say(f"[4/4] samples and scores: {summary_path} holds them for step {step}, skipped")
    return found
  _say(f"[4/4] samples and scores: {samples_per_prompt} samples for each of {len(prompts)} held-out prompts")
  with seconds.stage("sampling_s", accumulate=False):  # a redo, not a continuation
    model, params, _, step = checkpoint.load_workdir(workdir, use_ema=use_ema)
    images = generation.generate(
      model,
      params,
      conditioner(),
      prompts,
      latent_shape=(size, size, 3),
      num_per_prompt=samples_per_prompt,
      num_steps=sampling_steps,
      shift=config.flow.shift,
      formulation=flow.get_formulation(config.flow.formulation),
      cfg_scale=cfg_scale,
      seed=seed,
    )
    scenes = [s for s in heldout for _ in range(samples_per_prompt)]
    acc = scene_lib.accuracy(list(images), scenes)
    chance = stages.chance_accuracy(list(images), scenes, seed=seed)
    # The checker on 256 real renders of the held-out prompts (val_source's first records and,
    # past num_val, more drawn the same way).
    truth = scene_lib.accuracy([val_source.image(i) for i in range(256)], [val_source.scene(i) for i in range(256)])
    stages.write_labelled_grid(images, prompts, samples_per_prompt, os.path.join(workdir, "samples_heldout.png"))

  records = stages.read_metrics(os.path.join(workdir, "metrics.jsonl"))
  stages.plot_losses(records, os.path.join(workdir, "loss.png"))
  val = stages.last_record(records, "val/loss")
  resolved = model.config.to_dict() if hasattr(model.config, "to_dict") else dataclasses.asdict(model.config)
  summary = {
    "val_loss": val.get("val/loss"),
    "val_loss_interior": stages.interior_val_loss(val),
    "train_loss": stages.last_record(records, "loss").get("loss"),
    "sample_accuracy": acc["all"],
    "chance_accuracy": chance["all"],
    "sample_accuracy_parts": acc,
    "chance_accuracy_parts": chance,
    "checker_accuracy_on_real_images": truth["all"],
    "heldout_prompts": prompts,
    "samples_per_prompt": samples_per_prompt,
    "sampler": sampler,
    "train": {
      "steps": config.total_steps,
      "global_batch_size": config.global_batch_size,
      "num_train_records": num_train,
      "train_combinations": len(train_scenes),
      # the model as it was built (the preset's fields resolved), not the config's overrides
      "model": {"preset": config.model.preset, **resolved},
      "step_time_s": stages.last_record(records, "step_time").get("step_time"),
    },
    "seconds": seconds.summary(),
    "text_encoders": "randomly initialised CLIP-L/CLIP-G/T5 (real architectures, small widths); "
    "tokenizers trained on the demo captions",
  }
  fileutil.atomic_json(summary_path, summary, indent=2)
  return summary


def _say(text: str) -> None:
  print(f"sd3-demo: {text}", flush=True)


def _read_json(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except (FileNotFoundError, json.JSONDecodeError):
    return {}


class _Seconds:
  """Seconds per stage in a JSON file, accumulated over reruns: a stage that resumes (data,
  training) adds the time of this run's part, even when it is interrupted; one that is redone
  (sampling) replaces it; a skipped stage adds nothing."""

  def __init__(self, path: str):
    self.path = path
    self.values = {k: float(v) for k, v in _read_json(path).items() if k != "total_s"}

  @contextlib.contextmanager
  def stage(self, key: str, accumulate: bool = True):
    t0 = time.time()
    try:
      yield
    finally:
      self.values[key] = (self.values.get(key, 0.0) if accumulate else 0.0) + time.time() - t0
      fileutil.atomic_json(self.path, self.summary(), indent=2)

  def summary(self) -> dict:
    return dict(self.values, total_s=sum(self.values.values()))


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
  def _get_help_string(self, action):  # no "(default: ...)" on flags and on None defaults
    if action.nargs == 0 or action.default is None:
      return action.help
    return super()._get_help_string(action)


def main(argv: Sequence[str] | None = None) -> dict:
  p = command.ArgumentParser(
    prog="sd3-demo", description=__doc__.split("\n\n")[0], epilog=EPILOG, formatter_class=_HelpFormatter
  )
  p.add_argument("--workdir", default="workdirs/demo", help="where everything is written")
  p.add_argument("--config", default=DEFAULT_CONFIG, help="trainer config")
  p.add_argument("--steps", type=int, help="training steps (none: the config's total_steps)")
  p.add_argument("--num_train", type=int, default=20_000, help="training records to generate")
  p.add_argument("--num_val", type=int, default=512, help="validation records (held-out prompts)")
  p.add_argument("--num_heldout", type=int, default=24, help="caption combinations never trained on")
  p.add_argument("--samples_per_prompt", type=int, default=8, help="samples scored per held-out prompt")
  p.add_argument("--sampling_steps", type=int, default=28, help="Euler steps")
  p.add_argument("--cfg_scale", type=float, default=3.0, help="classifier-free guidance weight")
  p.add_argument("--no_ema", dest="ema", action="store_false", help="sample from the raw weights, not the EMA")
  p.add_argument("--seed", type=int, default=0, help="data, held-out split, encoders, training, noise")
  args = p.parse_args(argv)
  if args.num_heldout < 2 or args.num_heldout >= len(scene_lib.all_scenes()):
    p.error(f"--num_heldout must be in [2, {len(scene_lib.all_scenes()) - 1}]")
  logging.getLogger("matplotlib").setLevel(logging.WARNING)
  summary = run(
    args.workdir,
    config_path=args.config,
    steps=args.steps,
    num_train=args.num_train,
    num_val=args.num_val,
    num_heldout=args.num_heldout,
    samples_per_prompt=args.samples_per_prompt,
    sampling_steps=args.sampling_steps,
    cfg_scale=args.cfg_scale,
    use_ema=args.ema,
    seed=args.seed,
  )
  print(
    json.dumps(
      {
        k: summary[k]
        for k in (
          "val_loss",
          "val_loss_interior",
          "sample_accuracy",
          "chance_accuracy",
          "checker_accuracy_on_real_images",
          "seconds",
        )
      },
      indent=2,
    )
  )
  print(f"results in {args.workdir}: summary.json, loss.png, samples_heldout.png")
  return summary


def entry_point() -> None:
  """Console entry point (``sd3-demo``): expected errors end in one line and exit code 2."""
  command.run(
    main,
    "sd3-demo",
    on_interrupt="the finished stages are kept (text encoders, finished data chunks, checkpoints); "
    "rerun the same command to go on",
  )


if __name__ == "__main__":
  entry_point()
