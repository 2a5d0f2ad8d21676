"""The embedded demo (sd3_jax.demo): its tokenizers, its chance level, and a short run end to end.

The full demo's numbers (far above chance after ~7 minutes of training) are in docs/demo.md; here
a shrunken model runs a few steps to check that every stage writes what it promises and that a
rerun resumes instead of redoing work.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from sd3_jax import text_conditioning as tc
from sd3_jax.demo import run as demo
from sd3_jax.demo import encoders as demo_encoders
from sd3_jax.demo import stages as demo_stages
from sd3_jax.demo import scenes as shapes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


def test_demo_end_to_end_and_resume(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)  # a relative workdir, as `bash launch/demo.sh` passes (orbax needs absolute paths)
  wd = "demo"
  kwargs = dict(num_train=64, num_val=16, num_heldout=3, samples_per_prompt=2, sampling_steps=2, overrides=SMALL)
  s = demo.run(wd, steps=4, **kwargs)
  out = capsys.readouterr().out
  for stage in ("[1/4] text encoders: ", "[2/4] data: ", "[3/4] training: 4 steps", "[4/4] samples and scores: "):
    assert f"sd3-demo: {stage}" in out and "skipped" not in out, out
  # validation loss in the progress output, FLOP/s in a unit that shows the figure
  assert "step 2/4 (50.0%) | val_loss " in out and "TFLOP/s/dev 0.0" not in out, out
  # the model as built: depth and the preset's fields resolved, not the config's None placeholders
  model = s["train"]["model"]
  assert model["preset"] == "d4" and model["depth"] == 1 and model["hidden_size"] == 32 and model["mlp_ratio"] == 4.0
  assert None not in (model["depth"], model["mlp_ratio"], model["patch_size"])
  assert set(s["seconds"]) == {"text_encoders_s", "data_s", "train_s", "sampling_s", "total_s"}
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

  # The sample CLI reads the demo's workdir and encoders as docs/demo.md shows (the text lengths,
  # 12 + 12, come from the run's config).
  from sd3_jax import sample

  grid = sample.main(
    [
      "--workdir",
      wd,
      "--pixel_space",
      "--text_encoders",
      os.path.join(wd, "text_encoders"),
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
  capsys.readouterr()
  s2 = demo.run(wd, steps=6, **kwargs)
  out = capsys.readouterr().out
  assert "[1/4] text encoders: " in out and "[2/4] data: " in out and out.count(", skipped") == 2, out
  assert "[3/4] training: 6 steps" in out and "resuming from step 4 (" in out, out
  assert os.path.getmtime(os.path.join(wd, "text_encoders")) == enc_mtime
  assert s2["sampler"]["checkpoint_step"] == 6 and s2["train"]["step_time_s"] > 0
  for stage in ("text_encoders_s", "data_s"):  # skipped: the first run's seconds are kept
    assert s2["seconds"][stage] == s["seconds"][stage]
  assert s2["seconds"]["train_s"] > s["seconds"]["train_s"]  # two steps more of the same run
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    steps = [json.loads(x)["step"] for x in f if '"loss"' in x]
  assert steps == [2, 4, 6]
  # A rerun of the finished workdir skips every stage: nothing is sampled or scored again and
  # summary.json (with its timings) stays as it was.
  before = open(os.path.join(wd, "summary.json")).read()
  monkeypatch.setattr(demo.generation, "generate", lambda *a, **k: pytest.fail("sampled again"))
  monkeypatch.setattr("sd3_jax.training.train.train_and_evaluate", lambda *a, **k: pytest.fail("trained again"))
  assert demo.run(wd, steps=6, **kwargs) == s2
  assert open(os.path.join(wd, "summary.json")).read() == before
  assert capsys.readouterr().out.count(", skipped") == 4
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


def test_launch_demo_takes_flags_without_a_workdir():
  """`bash launch/demo.sh --steps 10` keeps the default WORKDIR (it used to take --steps for one)."""
  r = subprocess.run(
    ["bash", "launch/demo.sh", "--steps", "10", "--help"],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    env=dict(os.environ, PYTHON=sys.executable),
  )
  assert r.returncode == 0 and r.stdout.startswith("usage: sd3-demo "), r.stderr[-2000:]


def test_setup_venv_says_what_it_does(tmp_path):
  """The first minute of the demo (venv and pip) is no longer silent; a set-up environment is
  left alone, and any install (with or without extras) holds the base requirements."""
  os.makedirs(tmp_path / "launch")
  shutil.copy(os.path.join(REPO, "launch", "setup_venv.sh"), tmp_path / "launch")
  (tmp_path / "setup.cfg").write_text("[metadata]\n")
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  # python3 stands in for the real one: `-m venv` makes a .venv whose python logs its calls.
  (bin_dir / "python3").write_text(
    "#!/bin/sh\n"
    'if [ "$1" = "--version" ]; then echo "Python 3.0"; exit 0; fi\n'
    "mkdir -p .venv/bin\n"
    "printf '#!/bin/sh\\necho \"$*\" >> .venv/calls\\n' > .venv/bin/python\n"
    "chmod +x .venv/bin/python\n"
  )
  (bin_dir / "python3").chmod(0o755)
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")

  def setup(*extras):
    r = subprocess.run(["bash", "launch/setup_venv.sh", *extras], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    return r.stderr

  err = setup()
  assert "setup_venv: creating the virtual environment .venv (Python 3.0)" in err
  assert "setup_venv: installing sd3_jax and its dependencies into .venv (pip; a minute or more" in err
  assert "setup_venv: installed in " in err
  assert "-m pip install -q --disable-pip-version-check -e ." in (tmp_path / ".venv" / "calls").read_text()
  assert setup() == ""  # installed, setup.cfg unchanged: nothing to do, nothing said
  assert "installing sd3_jax with [test]" in setup("test")
  os.remove(tmp_path / ".venv" / ".sd3_jax-installed-base")
  assert setup() == ""  # the [test] install holds the base requirements
