r"""The embedded demo end to end (``sd3-demo``, ``bash launch/demo.sh``): tokenizers and small
random text encoders, records of generated scenes, the real trainer, then held-out prompts
sampled and scored by the scenes checker into summary.json. Every stage resumes. What it writes
and what it reaches are in the README ("The embedded demo").
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import time
from typing import Sequence

import numpy as np

from sd3_jax import config as config_lib
from sd3_jax import checkpoint, command, generation
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

Each stage is skipped when its output is complete, so rerunning resumes.
"""
CLIP_SPECIALS = ("<|startoftext|>", "<|endoftext|>")
T5_SPECIALS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in T5's vocabulary


# ---------------------------------------------------------------------------------------------
# Tokenizers trained on the captions


def clip_byte_chars() -> list[str]:
  """CLIP's byte -> unicode table, in the order of its vocabulary ('!' is id 0)."""
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
  cs, n = bs[:], 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return [chr(c) for c in cs]


def write_clip_tokenizer(path: str, captions: Sequence[str], pad_token: str) -> int:
  """A CLIP BPE tokenizer in the released file layout (vocab.json, merges.txt,
  tokenizer_config.json) whose merges are learned from ``captions`` with the ``tokenizers``
  library. The vocabulary is CLIP's: 256 byte symbols, the same with ``</w>``, the learned
  merges, then BOS and EOS (EOS has the largest id, as CLIP's pooling expects). Returns its size."""
  from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

  chars = clip_byte_chars()
  tok = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
  tok.normalizer = normalizers.Lowercase()
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.train_from_iterator(
    captions, trainers.BpeTrainer(vocab_size=10_000, min_frequency=1, end_of_word_suffix="</w>", show_progress=False)
  )
  merges = [
    tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in json.loads(tok.to_str())["model"]["merges"]
  ]
  vocab = {c: i for i, c in enumerate(chars)}
  vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
  for a, b in merges:
    vocab.setdefault(a + b, len(vocab))
  for special in CLIP_SPECIALS:
    vocab[special] = len(vocab)
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "vocab.json"), "w") as f:
    json.dump(vocab, f)
  with open(os.path.join(path, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump(
      {
        "tokenizer_class": "CLIPTokenizer",
        "bos_token": CLIP_SPECIALS[0],
        "eos_token": CLIP_SPECIALS[1],
        "unk_token": CLIP_SPECIALS[1],
        "pad_token": pad_token,
        "model_max_length": 77,
        "do_lower_case": True,
      },
      f,
    )
  return len(vocab)


def write_t5_tokenizer(path: str, captions: Sequence[str]) -> int:
  """A T5 (sentencepiece unigram) tokenizer: one piece per caption word, scored by its log
  frequency in ``captions`` (the unigram model's estimate for whole-word pieces), plus single
  letters so that any lowercase text still tokenizes. Returns its vocabulary size."""
  import transformers

  counts = collections.Counter(w for c in captions for w in c.lower().split())
  total = sum(counts.values())
  pieces = [(s, 0.0) for s in T5_SPECIALS] + [("▁", -10.0)]
  pieces += [("▁" + w, float(np.log(n / total))) for w, n in sorted(counts.items())]
  pieces += [(ch, -12.0) for ch in "abcdefghijklmnopqrstuvwxyz"]
  transformers.T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512).save_pretrained(path)
  return len(pieces)


# ---------------------------------------------------------------------------------------------
# Random encoders of the real architectures


def make_text_encoders(
  out_dir: str, captions: Sequence[str], *, clip_l_dim: int, clip_g_dim: int, t5_dim: int, seed: int = 0
) -> None:
  """Writes tokenizer{,_2,_3}/ and randomly initialised text_encoder{,_2,_3}/ (our checkpoint
  format) under ``out_dir``, atomically (a half-written directory is never left behind)."""
  import jax
  from sd3_jax import fileutil, pretrained
  from sd3_jax.models import text_encoders as te

  with fileutil.atomic_directory(out_dir) as tmp:
    clip_vocab = write_clip_tokenizer(os.path.join(tmp, "tokenizer"), captions, pad_token=CLIP_SPECIALS[1])
    write_clip_tokenizer(os.path.join(tmp, "tokenizer_2"), captions, pad_token="!")
    t5_vocab = write_t5_tokenizer(os.path.join(tmp, "tokenizer_3"), captions)
    clip = dict(vocab_size=clip_vocab, num_layers=2, num_heads=4, max_position_embeddings=77)
    configs = {
      # CLIP-L: quick_gelu; CLIP-G: gelu (as the released encoders). eos_token_id 2 is the
      # released configs' legacy value: pool at argmax(ids), i.e. at EOS (the largest id).
      "text_encoder": te.CLIPTextConfig(
        hidden_size=clip_l_dim,
        intermediate_size=4 * clip_l_dim,
        projection_dim=clip_l_dim,
        hidden_act="quick_gelu",
        **clip,
      ),
      "text_encoder_2": te.CLIPTextConfig(
        hidden_size=clip_g_dim, intermediate_size=4 * clip_g_dim, projection_dim=clip_g_dim, hidden_act="gelu", **clip
      ),
      "text_encoder_3": te.T5EncoderConfig(
        vocab_size=t5_vocab, d_model=t5_dim, d_kv=t5_dim // 4, d_ff=2 * t5_dim, num_layers=2, num_heads=4
      ),
    }
    for i, (name, config) in enumerate(configs.items()):
      module = te.build(config)
      params = te.init_params(module, jax.random.key(seed + 100 + i))
      pretrained.save_pretrained(os.path.join(tmp, name), params, config)


# ---------------------------------------------------------------------------------------------
# Data


class SceneSource:
  """Random-access ``build_dataset`` source of rendered scenes: example i draws its caption
  combination and its jitter from (seed, i)."""

  def __init__(self, scenes: Sequence[scene_lib.Scene], n: int, *, size: int, seed: int, name: str):
    self.scenes, self.n, self.size, self.seed, self.name = list(scenes), n, size, seed, name

  def __len__(self) -> int:
    return self.n

  def scene(self, i: int) -> scene_lib.Scene:
    return self.scenes[int(np.random.default_rng([self.seed, i, 0]).integers(len(self.scenes)))]

  def image(self, i: int) -> np.ndarray:
    return scene_lib.render(self.scene(i), self.size, np.random.default_rng([self.seed, i, 1]))

  def __getitem__(self, i: int) -> dict:
    from PIL import Image

    return {
      "id": f"{self.name}-{i:07d}",
      "caption": self.scene(i).caption,
      "caption2": None,
      "image": Image.fromarray(self.image(i)),
    }


def build_records(source, out_dir: str, conditioner, *, resolution: int) -> dict:
  from sd3_jax import build_dataset

  info = os.path.join(out_dir, "dataset_info.json")
  if os.path.exists(info):
    with open(info) as f:
      found = json.load(f)
    if found.get("num_records") != len(source):
      raise ValueError(
        f"{out_dir} holds {found.get('num_records')} records but {len(source)} were asked "
        f"for; remove {out_dir} to rebuild it"
      )
    return found
  result = build_dataset.build(
    source,
    out_dir,
    image_encoder=build_dataset.identity_image_encoder,
    text_encoder=conditioner.encode,
    resolution=resolution,
    batch_size=256,
    chunk_size=5000,
    records_per_shard=5000,
    latent_dtype="float16",
    metadata={"source": f"sd3_jax.demo {source.name}", "vae": "identity (pixel space)"},
  )
  return result["summary"]


# ---------------------------------------------------------------------------------------------
# Evaluation


def chance_accuracy(
  images: Sequence[np.ndarray], scenes: Sequence[scene_lib.Scene], trials: int = 20, seed: int = 0
) -> dict[str, float]:
  """The checker's score for the same images against shuffled captions: each prompt's images
  are scored against a different held-out prompt (a random derangement), averaged over trials."""
  rng = np.random.default_rng(seed)
  unique = list(dict.fromkeys(scenes))
  n = len(unique)
  if n < 2:
    raise ValueError("chance level needs at least two different prompts")
  index = {s: i for i, s in enumerate(unique)}
  totals: dict[str, float] = collections.defaultdict(float)
  for _ in range(trials):
    while True:
      perm = rng.permutation(n)
      if not np.any(perm == np.arange(n)):
        break
    acc = scene_lib.accuracy(list(images), [unique[perm[index[s]]] for s in scenes])
    for k, v in acc.items():
      totals[k] += v / trials
  return dict(totals)


def write_labelled_grid(
  images: np.ndarray, prompts: Sequence[str], per_prompt: int, path: str, scale: int = 2, rows_per_block: int = 12
) -> None:
  """Each prompt's text followed by its ``per_prompt`` samples (upscaled ``scale``x, nearest);
  prompts run down blocks of ``rows_per_block`` rows, blocks side by side."""
  from PIL import Image, ImageDraw

  _, h, w, _ = images.shape
  h, w, pad, text_w = h * scale, w * scale, 4, 215
  rows = min(rows_per_block, len(prompts))
  blocks = -(-len(prompts) // rows)
  block_w = text_w + per_prompt * (w + pad) + 3 * pad
  grid = Image.new("RGB", (blocks * block_w, rows * (h + pad) + pad), (255, 255, 255))
  draw = ImageDraw.Draw(grid)
  for i, prompt in enumerate(prompts):
    b, r = divmod(i, rows)
    x0, y = b * block_w + pad, pad + r * (h + pad)
    draw.text((x0, y + h // 2 - 6), prompt, fill=(0, 0, 0))
    for q in range(per_prompt):
      im = Image.fromarray(images[i * per_prompt + q]).resize((w, h), Image.NEAREST)
      grid.paste(im, (x0 + text_w + q * (w + pad), y))
  grid.save(path)


def interior_val_loss(record: dict) -> float | None:
  """Mean of a validation record's per-level losses over 0 < t < 1 (the t = 0 level cannot go
  below ~1: the clean input says nothing about the noise in the velocity target; t = 1 sees
  pure noise)."""
  levels = {float(k[len("val/loss_t") :]): v for k, v in record.items() if k.startswith("val/loss_t")}
  inner = [v for t, v in levels.items() if 0.0 < t < 1.0]
  return float(np.mean(inner)) if inner else None


def read_metrics(path: str) -> list[dict]:
  """The records of a metrics.jsonl file, in order."""
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _last(records: Sequence[dict], key: str) -> dict:
  """The last record that has ``key`` ({} if none)."""
  return next((r for r in reversed(records) if key in r), {})


def plot_losses(records: Sequence[dict], out_path: str) -> None:
  """Training loss, validation loss and its interior levels (``interior_val_loss``) of
  ``read_metrics`` records, log scale."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  train, val, interior = [], [], []
  for rec in records:
    if "loss" in rec:
      train.append((rec["step"], rec["loss"]))
    if "val/loss" in rec:
      val.append((rec["step"], rec["val/loss"]))
      if interior_val_loss(rec) is not None:
        interior.append((rec["step"], interior_val_loss(rec)))
  fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
  if train:
    ax.plot(*zip(*train), ".-" if len(train) < 20 else "-", label="train loss (logit-normal t)")
  if val:
    ax.plot(*zip(*val), "o-", label="val loss (held-out prompts, fixed t levels)")
  if interior:
    ax.plot(*zip(*interior), "s--", label="val loss, levels 0 < t < 1")
  ax.set_yscale("log")
  ax.set_xlabel("step")
  ax.set_ylabel("rectified-flow loss")
  ax.set_title("sd3_jax embedded demo")
  ax.grid(alpha=0.3, which="both")
  ax.legend()
  fig.tight_layout()
  fig.savefig(out_path)
  plt.close(fig)


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

  ``overrides``: {"dotted.config.key": value} applied to the config (tests shrink the model)."""
  from sd3_jax import text_conditioning, train  # after flag parsing: jax starts here

  t_start = time.time()
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
  stages: dict[str, float] = {}

  # 1. Tokenizers and random encoders.
  t0 = time.time()
  text_dir = os.path.join(workdir, "text_encoders")
  if not os.path.isdir(text_dir):
    make_text_encoders(
      text_dir,
      [s.caption for s in scene_lib.all_scenes()],
      clip_l_dim=config.text.clip_l_dim,
      clip_g_dim=config.text.clip_g_dim,
      t5_dim=config.data.context_dim,
      seed=seed,
    )
  conditioner = text_conditioning.SD3TextConditioner.from_pretrained(
    text_dir, clip_length=clip_tokens, t5_length=t5_tokens
  )
  if conditioner.layout.pooled_dim != config.data.pooled_dim or conditioner.context_dim != config.data.context_dim:
    raise ValueError(
      f"{text_dir} gives pooled {conditioner.layout.pooled_dim} / context width "
      f"{conditioner.context_dim}, the config expects {config.data.pooled_dim} / "
      f"{config.data.context_dim}: remove {text_dir} to rebuild it"
    )
  stages["text_encoders_s"] = time.time() - t0

  # 2. Records (train: 408 combinations; val: the held-out ones).
  t0 = time.time()
  data_dir = os.path.join(workdir, "data")
  train_info = build_records(
    SceneSource(train_scenes, num_train, size=size, seed=seed, name="train"),
    os.path.join(data_dir, "train"),
    conditioner,
    resolution=size,
  )
  val_source = SceneSource(heldout, num_val, size=size, seed=seed + 1, name="val")
  build_records(val_source, os.path.join(data_dir, "val"), conditioner, resolution=size)
  stages["data_s"] = time.time() - t0
  log.info("data: %s", train_info)

  # 3. Training with the real trainer.
  t0 = time.time()
  config.data.path = os.path.join(data_dir, "train")
  config.data.val_path = os.path.join(data_dir, "val")
  config.val.num_examples = min(config.val.num_examples, num_val)
  train.train_and_evaluate(config, workdir)
  stages["train_s"] = time.time() - t0

  # 4. Samples for the held-out prompts, read back by the checker.
  t0 = time.time()
  model, params, _, step = checkpoint.load_workdir(workdir, use_ema=use_ema)
  prompts = [s.caption for s in heldout]
  images = generation.generate(
    model,
    params,
    conditioner,
    prompts,
    latent_shape=(size, size, 3),
    num_per_prompt=samples_per_prompt,
    num_steps=sampling_steps,
    shift=config.flow.shift,
    cfg_scale=cfg_scale,
    seed=seed,
  )
  scenes = [s for s in heldout for _ in range(samples_per_prompt)]
  acc = scene_lib.accuracy(list(images), scenes)
  chance = chance_accuracy(list(images), scenes, seed=seed)
  # The checker on 256 real renders of the held-out prompts (val_source's first records and,
  # past num_val, more drawn the same way).
  truth = scene_lib.accuracy([val_source.image(i) for i in range(256)], [val_source.scene(i) for i in range(256)])
  write_labelled_grid(images, prompts, samples_per_prompt, os.path.join(workdir, "samples_heldout.png"))
  stages["sampling_s"] = time.time() - t0

  records = read_metrics(os.path.join(workdir, "metrics.jsonl"))
  plot_losses(records, os.path.join(workdir, "loss.png"))
  val = _last(records, "val/loss")
  summary = {
    "val_loss": val.get("val/loss"),
    "val_loss_interior": interior_val_loss(val),
    "train_loss": _last(records, "loss").get("loss"),
    "sample_accuracy": acc["all"],
    "chance_accuracy": chance["all"],
    "sample_accuracy_parts": acc,
    "chance_accuracy_parts": chance,
    "checker_accuracy_on_real_images": truth["all"],
    "heldout_prompts": prompts,
    "samples_per_prompt": samples_per_prompt,
    "sampler": {
      "steps": sampling_steps,
      "cfg_scale": cfg_scale,
      "shift": config.flow.shift,
      "weights": "ema" if use_ema else "raw",
      "checkpoint_step": step,
    },
    "train": {
      "steps": config.total_steps,
      "global_batch_size": config.global_batch_size,
      "num_train_records": num_train,
      "train_combinations": len(train_scenes),
      "model": dict(config.model),
      "step_time_s": _last(records, "step_time").get("step_time"),
    },
    "seconds": dict(stages, total_s=time.time() - t_start),
    "text_encoders": "randomly initialised CLIP-L/CLIP-G/T5 (real architectures, small widths); "
    "tokenizers trained on the demo captions",
  }
  from sd3_jax import fileutil

  fileutil.atomic_json(os.path.join(workdir, "summary.json"), summary, indent=2)
  return summary


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
  def _get_help_string(self, action):  # no "(default: ...)" on flags and on None defaults
    if action.nargs == 0 or action.default is None:
      return action.help
    return super()._get_help_string(action)


def main(argv: Sequence[str] | None = None) -> dict:
  p = argparse.ArgumentParser(
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
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's per-save chatter
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
  print(f"wrote {args.workdir}/summary.json, loss.png, samples_heldout.png")
  return summary


def entry_point() -> None:
  """Console entry point (``sd3-demo``): expected errors end in one line and exit code 2."""
  command.run(main, "sd3-demo")


if __name__ == "__main__":
  entry_point()
