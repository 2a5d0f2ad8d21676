"""Evaluation: CLIP score on constructed embeddings and end to end against transformers, the
reference-statistics / evaluate / GenEval-export commands on a tiny trained workdir, and the
trainer's config.eval hook (the statistics and the Frechet distance: test_evaluation_stats.py)."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from sd3_jax import config as config_lib
from sd3_jax.evaluation import evaluate as evaluate_cli
from sd3_jax.evaluation import geneval_export, reference_stats
from sd3_jax import text_conditioning
from sd3_jax.training import train
from sd3_jax.convert import convert
from sd3_jax.demo.encoders import clip_byte_chars
from sd3_jax.evaluation import clip_metrics, scoring, stats
from sd3_jax.inference import loader

from text_encoder_helpers import TINY_CLIP
from tiny_run_helpers import conditioner as _conditioner, decoder as _decoder, train_tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------
# CLIP score


def test_clip_score_on_constructed_embeddings():
  rng = np.random.default_rng(2)
  q, _ = np.linalg.qr(rng.standard_normal((16, 16)))
  u, v = q[:, 0], q[:, 1]
  cos = np.array([1.0, 0.5, 0.0, -0.3, 0.9])
  img = np.stack([u * s for s in (1.0, 2.0, 0.5, 3.0, 1.5)])  # the scale of an embedding does not matter
  txt = np.stack([c * u + np.sqrt(1 - c * c) * v for c in cos]) * 7.0
  np.testing.assert_allclose(clip_metrics.clip_score(img, txt), 100 * np.maximum(cos, 0), atol=1e-4)


def write_clip_tokenizer(path):
  """A tiny CLIP BPE (vocab.json / merges.txt): 512 byte tokens, BOS 518, EOS 519."""
  chars = clip_byte_chars()
  vocab = {c: i for i, c in enumerate(chars)}
  vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
  merges = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>"), ("t", "h"), ("th", "e</w>")]
  for a, b in merges:
    vocab[a + b] = len(vocab)
  vocab["<|startoftext|>"], vocab["<|endoftext|>"] = 518, 519
  with open(os.path.join(path, "vocab.json"), "w") as f:
    json.dump(vocab, f)
  with open(os.path.join(path, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump(
      {
        "tokenizer_class": "CLIPTokenizer",
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "model_max_length": 16,
        "do_lower_case": True,
      },
      f,
    )


@pytest.fixture(scope="module")
def clip_dirs(tmp_path_factory):
  """A tiny random transformers CLIPModel with a tokenizer, and its conversion to our format."""
  root = tmp_path_factory.mktemp("clip")
  torch.manual_seed(0)
  t = TINY_CLIP["text"]
  v = TINY_CLIP["vision"]
  cfg = transformers.CLIPConfig(
    text_config=dict(
      vocab_size=520,
      hidden_size=t["hidden_size"],
      intermediate_size=48,
      num_hidden_layers=2,
      num_attention_heads=4,
      max_position_embeddings=16,
      bos_token_id=518,
      eos_token_id=519,
      pad_token_id=519,
    ),
    vision_config=dict(
      hidden_size=v["hidden_size"],
      intermediate_size=48,
      num_hidden_layers=2,
      num_attention_heads=4,
      image_size=32,
      patch_size=8,
    ),
    projection_dim=24,
  )
  m = transformers.CLIPModel(cfg).eval()
  m.save_pretrained(root / "hf")
  write_clip_tokenizer(str(root / "hf"))
  convert(root / "hf", root / "jax", "jax")
  return m, str(root / "hf"), str(root / "jax")


# ---------------------------------------------------------------------------------------------
# A tiny trained workdir and stand-ins for the SD3 text encoders / VAE (tests/tiny_run_helpers.py)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return train_tiny(str(tmp_path_factory.mktemp("run")))


PROMPTS = ["a cat", "the dog", "a cat with the dog", "the cat sat"]


def test_clip_score_end_to_end_equals_transformers(workdir, clip_dirs):
  """Samples -> our preprocessing, tokenization and CLIP -> score, against transformers'
  CLIPImageProcessor + CLIPTokenizer + CLIPModel on the same images."""
  from sd3_jax.storage import checkpoint as ckpt_lib
  from sd3_jax import sharding

  m, hf_dir, jax_dir = clip_dirs
  mesh = sharding.make_mesh(1, -1, 1)
  model, params, _, _ = ckpt_lib.load_workdir(workdir, mesh=mesh)
  seen = []
  clip = clip_metrics.CLIPFeatures.from_pretrained(jax_dir, mesh=mesh, batch_size=4)
  result = scoring.evaluate(
    model,
    params,
    _conditioner,
    PROMPTS,
    clip=clip,
    latent_shape=(8, 8, 4),
    decoder=_decoder,
    num_images=6,
    batch_size=4,
    num_steps=2,
    cfg_scale=2.0,
    mesh=mesh,
    on_batch=lambda start, images, prompts: seen.append((images, prompts)),
  )
  images = np.concatenate([s[0] for s in seen])
  prompts = sum((s[1] for s in seen), [])
  assert images.shape == (6, 8, 8, 3) and prompts == PROMPTS + PROMPTS[:2]
  proc = (getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor)(
    size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
  )
  tok = transformers.CLIPTokenizer.from_pretrained(hf_dir)
  ids = tok(prompts, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
  with torch.no_grad():
    img = m.get_image_features(
      pixel_values=torch.tensor(proc(images=list(images), return_tensors="np")["pixel_values"])
    )
    txt = m.get_text_features(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"])
  img, txt = (getattr(x, "pooler_output", x).numpy().astype(np.float64) for x in (img, txt))
  cos = np.sum(img * txt, -1) / np.linalg.norm(img, axis=-1) / np.linalg.norm(txt, axis=-1)
  # Scores are 100 * cosines of float32 embeddings (relative error ~1e-7, see test_clip_vision.py),
  # so they agree to ~1e-5 absolute; a random tiny CLIP gives cosines near 0 of both signs.
  assert (cos > 0).any() and (cos < 0).any()
  per_pair = clip.clip_scores(images, prompts)
  np.testing.assert_array_equal(per_pair.index, np.arange(6))
  np.testing.assert_allclose(per_pair.values, 100 * np.maximum(cos, 0), rtol=0, atol=1e-4)
  assert result.metrics["clip_score"] == pytest.approx(float(np.mean(100 * np.maximum(cos, 0))), abs=1e-4)
  assert result.metrics["num_images"] == 6 and "fid_clip" not in result.metrics and result.stats.count == 6


def test_reference_stats_evaluate_and_geneval_commands(workdir, clip_dirs, tmp_path, capsys):
  _, _, jax_dir = clip_dirs
  real = tmp_path / "real"
  os.makedirs(real / "sub")
  rng = np.random.default_rng(3)
  for i, (h, w) in enumerate(((40, 40), (33, 50), (64, 35), (20, 31), (48, 48))):
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(real / ("sub" if i % 2 else "") / f"{i}.png")
  ref = str(tmp_path / "ref.npz")
  reference_stats.main(["--images", str(real), "--clip", jax_dir, "--out", ref, "--batch_size", "4"])
  r = stats.load_stats(ref)
  assert r["count"] == 5 and r["mu"].shape == (24,) and r["feature_extractor"]["crop_rounding"] == "round"
  with pytest.raises(FileExistsError, match="--overwrite"):
    reference_stats.main(["--images", str(real), "--clip", jax_dir, "--out", ref])

  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text("".join(json.dumps({"caption": p}) + "\n" for p in PROMPTS))
  out = tmp_path / "eval"
  report = evaluate_cli.main(
    [
      "--workdir",
      workdir,
      "--prompts",
      str(prompts),
      "--clip",
      jax_dir,
      "--reference_stats",
      ref,
      "--num_images",
      "5",
      "--batch_size",
      "4",
      "--num_steps",
      "2",
      "--cfg_scale",
      "2",
      "--out",
      str(out),
      "--save_stats",
    ],
    conditioner=_conditioner,
    decoder=_decoder,
  )
  saved = json.loads((out / "eval.json").read_text())
  assert saved == json.loads(json.dumps(report))
  assert 0 <= saved["clip_score"] <= 100 and saved["num_images"] == 5 and saved["fid_clip"] > 0
  assert saved["settings"]["image_size"] == [8, 8] and saved["settings"]["num_steps"] == 2
  assert saved["settings"]["step"] == 2 and saved["settings"]["ema"] is True
  sample = stats.load_stats(str(out / "sample_stats.npz"))
  assert saved["fid_clip"] == pytest.approx(
    stats.frechet_distance(sample["mu"], sample["sigma"], r["mu"], r["sigma"]), rel=1e-9
  )
  assert np.asarray(Image.open(out / "samples.png")).shape == (2 * 10 + 2, 3 * 10 + 2, 3)  # 5 tiles, 3 columns
  assert '"clip_score"' in capsys.readouterr().out

  # Reference statistics from another CLIP are refused.
  bad = dict(np.load(ref))
  bad["feature_extractor"] = np.array(json.dumps({"crop_rounding": "floor"}))
  np.savez(tmp_path / "bad.npz", **bad)
  with pytest.raises(ValueError, match="different CLIP setting 'crop_rounding'"):
    evaluate_cli.main(
      [
        "--workdir",
        workdir,
        "--prompts",
        str(prompts),
        "--clip",
        jax_dir,
        "--reference_stats",
        str(tmp_path / "bad.npz"),
        "--num_steps",
        "1",
      ],
      conditioner=_conditioner,
      decoder=_decoder,
    )

  # GenEval: its prompt metadata in, its scorer's folder layout out; a rerun samples nothing.
  meta = [
    {"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"},
    {
      "tag": "two_object",
      "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1}],
      "prompt": "a photo of a dog and a cat",
    },
    {"tag": "colors", "include": [{"class": "cat", "count": 1, "color": "red"}], "prompt": "a red cat"},
  ]
  meta_file = tmp_path / "evaluation_metadata.jsonl"
  meta_file.write_text("".join(json.dumps(m) + "\n" for m in meta))
  gdir = tmp_path / "geneval"
  argv = [
    "--workdir",
    workdir,
    "--metadata",
    str(meta_file),
    "--outdir",
    str(gdir),
    "--num_per_prompt",
    "2",
    "--prompts_per_batch",
    "2",
    "--num_steps",
    "2",
  ]
  assert geneval_export.main(argv, conditioner=_conditioner, decoder=_decoder) == 3
  assert sorted(os.listdir(gdir)) == ["00000", "00001", "00002"]
  for i, m in enumerate(meta):
    folder = gdir / f"{i:05d}"
    with open(folder / "metadata.jsonl") as f:
      assert json.load(f) == m  # GenEval reads it with json.load
    names = sorted(os.listdir(folder / "samples"))
    assert names == ["00000.png", "00001.png"] and all(re.match(r"\d+\.png", n) for n in names)
    assert np.asarray(Image.open(folder / "samples" / names[0])).shape == (8, 8, 3)
  assert geneval_export.main(argv, conditioner=_conditioner, decoder=_decoder) == 0


def test_command_errors(capsys):
  with pytest.raises(SystemExit) as e:
    evaluate_cli.main(["--workdir", "W", "--prompts", "p.txt"])
  assert e.value.code == 2 and "--clip" in capsys.readouterr().err
  with pytest.raises(FileNotFoundError, match="no prompts file"):
    loader.read_prompts("/nonexistent/prompts.txt")
  for argv, message in ((["--help"], "--reference_stats"),):
    r = subprocess.run(
      [sys.executable, "-m", "sd3_jax.evaluation", *argv],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=120,
      env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert r.returncode == 0 and message in r.stdout


# ---------------------------------------------------------------------------------------------
# The trainer's hook


def test_training_logs_eval_metrics(tmp_path, clip_dirs, monkeypatch):
  _, _, jax_dir = clip_dirs
  rng = np.random.default_rng(4)
  ref_stats = stats.FeatureStats(24).update(rng.standard_normal((30, 24)))
  clip = clip_metrics.CLIPFeatures.from_pretrained(jax_dir)
  stats.save_stats(str(tmp_path / "ref.npz"), ref_stats, clip.description)
  c = config_lib.load_config_file(
    os.path.join(REPO, "configs/tiny.py"),
    overrides={
      "total_steps": 2,
      "log_every": 1,
      "checkpoint_every": 2,
      "val.every": 0,
      "mesh.fsdp": 1,
      "mesh.data": -1,
      "eval.every": 1,
      "eval.prompts": ("a cat", "the dog"),
      "eval.num_images": 4,
      "eval.batch_size": 4,
      "eval.num_steps": 2,
      "eval.clip": jax_dir,
      "eval.reference_stats": str(tmp_path / "ref.npz"),
      "sample.pixel_space": True,
      "sample.text_encoders": "unused",
      "model.in_channels": 3,
      "model.out_channels": 3,
      "data.latent_channels": 3,
    },
  )
  monkeypatch.setattr(text_conditioning, "load_conditioner", lambda path, **kw: _conditioner)
  train.train_and_evaluate(c, str(tmp_path / "run"))
  rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  evals = {r["step"]: r for r in rows if "eval/clip_score" in r}
  assert sorted(evals) == [1, 2]
  for r in evals.values():
    assert 0 <= r["eval/clip_score"] <= 100 and r["eval/fid_clip"] > 0 and r["eval/num_images"] == 4
  with pytest.raises(ValueError, match="config.eval.clip"):
    scoring.PeriodicEvaluator.from_settings({"every": 1, "clip": ""}, None)
