"""The embedded demo (sd3_jax.demo): its tokenizers, its chance level, and a short run end to end.

The full demo's numbers (far above chance after ~7 minutes of training) are in docs/demo.md; here
a shrunken model runs a few steps to check that every stage writes what it promises and that a
rerun resumes instead of redoing work.
"""

import json
import os

import numpy as np
import pytest

from sd3_jax import text_conditioning as tc
from sd3_jax.demo import run as demo
from sd3_jax.demo import encoders as demo_encoders
from sd3_jax.demo import stages as demo_stages
from sd3_jax.demo import scenes as shapes

CAPTIONS = [s.caption for s in shapes.all_scenes()]
WORDS = sorted({w for c in CAPTIONS for w in c.split()})


def test_clip_tokenizer_learned_from_captions(tmp_path):
  size = demo_encoders.write_clip_tokenizer(str(tmp_path / "tok"), CAPTIONS, pad_token="!")
  tok = tc.load_tokenizer(tmp_path / "tok")
  assert len(tok) == size
  assert tok.eos_token_id == size - 1 and tok.bos_token_id == size - 2  # EOS is the largest id
  assert tok.convert_tokens_to_ids("!") == 0
  # The learned merges make every caption word one token.
  for w in WORDS:
    assert len(tok(w, add_special_tokens=False)["input_ids"]) == 1, w
  ids = tc.tokenize_clip(tok, ["a yellow triangle right of a green triangle", "a red circle"], pad_id=0, length=12)
  assert ids.shape == (2, 12)
  assert ids[0, 0] == size - 2 and ids[0, 9] == size - 1 and ids[0, 10] == 0
  assert ids[1, 4] == size - 1 and list(ids[1, 5:]) == [0] * 7
  # Text outside the captions still tokenizes (byte-level fallback), nothing is unknown.
  assert len(tok("a purple hexagon", add_special_tokens=False)["input_ids"]) > 3


def test_t5_tokenizer_word_pieces(tmp_path):
  demo_encoders.write_t5_tokenizer(str(tmp_path / "t5"), CAPTIONS)
  tok = tc.load_tokenizer(tmp_path / "t5")
  assert tok.pad_token_id == 0 and tok.eos_token_id == 1
  for w in WORDS:
    assert len(tok(w, add_special_tokens=False)["input_ids"]) == 1, w
  ids = tc.tokenize_t5(tok, ["a red circle left of a blue square"], length=12)
  assert list(ids[0, 8:]) == [1, 0, 0, 0] and 2 not in ids  # EOS after 8 words, no <unk>


def test_chance_accuracy_uses_other_prompts():
  _, heldout = shapes.split_scenes(24)
  source = demo_stages.SceneSource(heldout, 96, size=32, seed=3, name="t")
  images = [source.image(i) for i in range(len(source))]
  scenes = [source.scene(i) for i in range(len(source))]
  assert shapes.accuracy(images, scenes)["all"] > 0.95
  chance = demo_stages.chance_accuracy(images, scenes, trials=10)
  assert set(chance) == {"colors", "shape1", "shape2", "relation", "all"}
  # Real images of prompt i scored against prompt j != i: right only by coincidence.
  assert chance["all"] < 0.15 and chance["colors"] < 0.5
  with pytest.raises(ValueError, match="two different prompts"):
    demo_stages.chance_accuracy(images[:1], scenes[:1])


def test_scene_source_is_deterministic_and_keeps_heldout_out():
  train, heldout = shapes.split_scenes(24)
  a = demo_stages.SceneSource(train, 50, size=32, seed=0, name="train")
  b = demo_stages.SceneSource(train, 50, size=32, seed=0, name="train")
  assert all(np.array_equal(a.image(i), b.image(i)) for i in range(5))
  assert {a.scene(i) for i in range(50)} <= set(train)
  assert not {a.scene(i) for i in range(50)} & set(heldout)
  ex = a[7]
  assert ex["caption"] == a.scene(7).caption and ex["image"].size == (32, 32)


SMALL = {
  "model.depth": 1,
  "model.hidden_size": 32,
  "model.num_heads": 2,
  "global_batch_size": 8,
  "log_every": 2,
  "checkpoint_every": 2,
  "val.every": 2,
  "val.batch_size": 8,
  "val.num_examples": 16,
  "optimizer.warmup_steps": 1,
}


def test_demo_end_to_end_and_resume(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # a relative workdir, as `bash launch/demo.sh` passes (orbax needs absolute paths)
  wd = "demo"
  kwargs = dict(num_train=64, num_val=16, num_heldout=3, samples_per_prompt=2, sampling_steps=2, overrides=SMALL)
  s = demo.run(wd, steps=4, **kwargs)
  for f in (
    "summary.json",
    "loss.png",
    "samples_heldout.png",
    "metrics.jsonl",
    "text_encoders/tokenizer_3/tokenizer_config.json",
    "data/train/dataset_info.json",
    "data/val/dataset_info.json",
    "checkpoints/4",
  ):
    assert os.path.exists(os.path.join(wd, f)), f
  on_disk = json.load(open(os.path.join(wd, "summary.json")))
  assert on_disk["sample_accuracy"] == s["sample_accuracy"]
  assert np.isfinite(s["val_loss"]) and s["val_loss_interior"] > 0
  assert s["checker_accuracy_on_real_images"] > 0.9
  # The reported accuracy is the checker's score of exactly the samples written to the grid:
  # cut the tiles back out of samples_heldout.png (2x nearest upscale, text column 215 px,
  # 4 px padding) and score them again against their prompts.
  from PIL import Image

  grid = np.asarray(Image.open(os.path.join(wd, "samples_heldout.png")).convert("RGB"))
  by_caption = {sc.caption: sc for sc in shapes.all_scenes()}
  tiles, truth = [], []
  for i, prompt in enumerate(s["heldout_prompts"]):
    for q in range(2):
      y, x = 4 + i * (64 + 4), 4 + 215 + q * (64 + 4)
      tiles.append(grid[y : y + 64 : 2, x : x + 64 : 2])
      truth.append(by_caption[prompt])
  assert shapes.accuracy(tiles, truth) == pytest.approx(s["sample_accuracy_parts"])
  # ...and the checker is not blind: a flat grey image satisfies none of the prompts.
  assert shapes.accuracy([np.full((32, 32, 3), 128, np.uint8)] * len(truth), truth)["all"] == 0
  assert len(s["heldout_prompts"]) == 3 and s["sampler"]["checkpoint_step"] == 4
  info = json.load(open(os.path.join(wd, "data/train/dataset_info.json")))
  assert info["num_records"] == 64 and info["element_spec"]["latent"]["shape"] == [32, 32, 3]
  assert info["element_spec"]["context"]["shape"] == [24, 64]
  heldout = set(s["heldout_prompts"])
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    lines = [json.loads(x) for x in f]
  assert any("val/loss" in x for x in lines) and any("loss" in x for x in lines)

  # The sample CLI reads the demo's workdir and encoders as docs/demo.md shows.
  from sd3_jax import sample

  grid = sample.main(
    [
      "--workdir",
      wd,
      "--pixel_space",
      "--text_encoders",
      os.path.join(wd, "text_encoders"),
      "--clip_length",
      "12",
      "--t5_length",
      "12",
      "--num_steps",
      "2",
      "--prompt",
      sorted(heldout)[0],
      "--out",
      str(tmp_path / "cli.png"),
    ]
  )
  assert grid.ndim == 3 and os.path.exists(tmp_path / "cli.png")

  # A rerun with more steps keeps the encoders and records and resumes training from step 4.
  enc_mtime = os.path.getmtime(os.path.join(wd, "text_encoders"))
  s2 = demo.run(wd, steps=6, **kwargs)
  assert os.path.getmtime(os.path.join(wd, "text_encoders")) == enc_mtime
  assert s2["sampler"]["checkpoint_step"] == 6 and s2["train"]["step_time_s"] > 0
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    steps = [json.loads(x)["step"] for x in f if '"loss"' in x]
  assert steps == [2, 4, 6]
  with pytest.raises(ValueError, match="holds 64 records but 80 were asked for"):
    demo.run(wd, steps=6, **dict(kwargs, num_train=80))


def test_interior_val_loss():
  rec = {
    "step": 3,
    "val/loss": 0.5,
    "val/loss_t0.000": 1.5,
    "val/loss_t0.500": 0.2,
    "val/loss_t0.750": 0.4,
    "val/loss_t1.000": 0.3,
  }
  assert demo_stages.interior_val_loss(rec) == pytest.approx(0.3)
  assert demo_stages.interior_val_loss({"val/loss": 1.0}) is None


def test_demo_rejects_latent_configs(tmp_path):
  with pytest.raises(ValueError, match="pixel space"):
    demo.run(str(tmp_path / "x"), steps=1, overrides={"model.in_channels": 4})
