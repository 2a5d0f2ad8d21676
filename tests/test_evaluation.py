"""Evaluation: Frechet distance against closed forms, float64 statistics in batches and across
2 processes, CLIP score on constructed embeddings and end to end against transformers, the
reference-statistics / evaluate / GenEval-export commands on a tiny trained workdir, and the
trainer's config.eval hook."""

import json
import os
import re
import subprocess
import sys
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import portpicker
import pytest
import scipy.linalg
import torch
import transformers
from PIL import Image

from sd3_jax import config as config_lib
from sd3_jax import evaluate as evaluate_cli
from sd3_jax import geneval_export, reference_stats, text_conditioning, train
from sd3_jax.convert import convert
from sd3_jax.demo.run import clip_byte_chars
from sd3_jax.evaluation import clip_metrics, preprocess as pp, run, stats
from sd3_jax.models import clip_vision as cv

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------
# Frechet distance and statistics


def test_frechet_distance_of_known_gaussians():
  rng = np.random.default_rng(0)
  mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
  a, b = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
  # Commuting (diagonal) covariances: ||mu1 - mu2||^2 + sum (sqrt(a) - sqrt(b))^2
  want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  assert stats.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-12)
  # Same covariance up to a rotation of both: the distance is rotation invariant.
  q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
  got = stats.frechet_distance(q @ mu1, q @ np.diag(a) @ q.T, q @ mu2, q @ np.diag(b) @ q.T)
  assert got == pytest.approx(want, rel=1e-10)
  # General covariances: the textbook formula with scipy's sqrtm (what clean-fid computes).
  s1 = np.cov(rng.standard_normal((40, 6)) @ rng.standard_normal((6, 6)), rowvar=False)
  s2 = np.cov(rng.standard_normal((40, 6)) @ rng.standard_normal((6, 6)), rowvar=False)
  ref = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2).real)
  assert stats.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-9)
  assert abs(stats.frechet_distance(mu1, s1, mu1, s1)) < 1e-9
  # Singular covariances (fewer samples than dimensions) stay real and non-negative.
  low = np.cov(rng.standard_normal((3, 6)), rowvar=False)
  assert stats.frechet_distance(mu1, low, mu2, s1) > 0
  with pytest.raises(ValueError, match="same feature extractor"):
    stats.frechet_distance(mu1, s1, mu2[:5], s2[:5, :5])


def test_statistics_in_batches_equal_one_shot(tmp_path):
  rng = np.random.default_rng(1)
  feats = (rng.standard_normal((203, 7)) * rng.uniform(0.01, 5, 7) + 1e3).astype(np.float32)  # a large mean
  s = stats.FeatureStats(7)
  for a, b in ((0, 1), (1, 8), (8, 8), (8, 150), (150, 203)):
    s.update(feats[a:b])
  x = feats.astype(np.float64)
  np.testing.assert_allclose(s.mean, x.mean(0), rtol=1e-14)
  np.testing.assert_allclose(s.cov, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-12)
  other = stats.FeatureStats(7).update(feats[:100]).merge(stats.FeatureStats(7).update(feats[100:]))
  np.testing.assert_allclose(other.cov, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-12)
  assert s.all_reduce().count == 203  # one process: itself
  stats.save_stats(str(tmp_path / "r.npz"), s, {"name": "test"})
  back = stats.load_stats(str(tmp_path / "r.npz"))
  np.testing.assert_array_equal(back["mu"], s.mean)
  assert back["count"] == 203 and back["feature_extractor"] == {"name": "test"}
  with pytest.raises(ValueError, match=r"features must be \[B, 7\]"):
    s.update(feats[:, :3])
  with pytest.raises(FileNotFoundError, match="sd3_jax.reference_stats"):
    stats.load_stats(str(tmp_path / "missing.npz"))


TINY_CLIP = dict(
  text=dict(
    vocab_size=520,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    max_position_embeddings=16,
    projection_dim=24,
    eos_token_id=519,
    bos_token_id=518,
    pad_token_id=519,
    hidden_layer=-1,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
  ),
  vision=dict(
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    image_size=32,
    patch_size=8,
    num_channels=3,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    projection_dim=24,
  ),
)

MP_SCRIPT = """
import sys, numpy as np, jax
pid, port, out, cfg = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_num_cpu_devices", 2)
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid,
                           initialization_timeout=120)
import json
from sd3_jax import sharding
from sd3_jax.evaluation import clip_metrics, stats
from sd3_jax.models import clip_vision as cv
feats = np.random.default_rng(0).standard_normal((37, 5)) * 3 + 50
mine = feats[pid::2]
st = stats.FeatureStats(5).update(mine[:4]).update(mine[4:]).all_reduce()
total = stats.all_reduce_sum(np.array([mine.sum(), len(mine)]))
model = cv.CLIPModel(cv.CLIPConfig.from_dict(json.loads(cfg)))
params = cv.init_params(model, jax.random.key(0))
images = np.random.default_rng(1).integers(0, 256, (10, 40, 48, 3), dtype=np.uint8)
clip = clip_metrics.CLIPFeatures(model, params, mesh=sharding.make_mesh(1, -1, 1), batch_size=4)
assert clip.mesh.size == 4
rows = clip.image_features(images)
cs = stats.FeatureStats(24).update(rows.values).all_reduce()
np.savez(out, mean=st.mean, cov=st.cov, count=st.count, total=total, idx=rows.index, cmean=cs.mean,
         ccov=cs.cov, ccount=cs.count)
jax.distributed.shutdown()
"""


def test_statistics_across_two_processes_equal_one_shot(tmp_path):
  script = tmp_path / "mp.py"
  script.write_text(MP_SCRIPT)
  port = portpicker.pick_unused_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, XLA_FLAGS="")
  procs = [
    subprocess.Popen(
      [sys.executable, str(script), str(pid), str(port), str(tmp_path / f"out{pid}.npz"), json.dumps(TINY_CLIP)],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for pid in range(2)
  ]
  for p in procs:
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out
  outs = [np.load(tmp_path / f"out{pid}.npz") for pid in range(2)]
  feats = np.random.default_rng(0).standard_normal((37, 5)) * 3 + 50
  for o in outs:  # every process holds the same merged statistics
    assert int(o["count"]) == 37
    np.testing.assert_allclose(o["mean"], feats.mean(0), rtol=1e-13)
    np.testing.assert_allclose(o["cov"], np.cov(feats, rowvar=False), rtol=1e-10)
    np.testing.assert_allclose(o["total"], [feats.sum(), 37], rtol=1e-13)
  np.testing.assert_array_equal(outs[0]["cmean"], outs[1]["cmean"])
  # The sharded CLIP features: each process computed disjoint rows, together all 10 ...
  idx = np.concatenate([o["idx"] for o in outs])
  assert sorted(idx.tolist()) == list(range(10)) and len(outs[0]["idx"]) and len(outs[1]["idx"])
  # ... and their statistics equal one unsharded pass.
  model = cv.CLIPModel(cv.CLIPConfig.from_dict(TINY_CLIP))
  params = cv.init_params(model, jax.random.key(0))
  images = np.random.default_rng(1).integers(0, 256, (10, 40, 48, 3), dtype=np.uint8)
  pixels = pp.preprocess(images, size=32, crop_size=32, crop_rounding="round")
  ref = np.asarray(model.apply({"params": params}, pixels, method=model.encode_image), np.float64)
  assert int(outs[0]["ccount"]) == 10
  np.testing.assert_allclose(outs[0]["cmean"], ref.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(outs[0]["ccov"], np.cov(ref, rowvar=False), rtol=1e-4, atol=1e-6)


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
# A tiny trained workdir and stand-ins for the SD3 text encoders / VAE (as tests/test_sampling.py)


def _conditioner(prompts):
  rs = [np.random.default_rng(zlib.crc32(p.encode())) for p in prompts]
  return (
    jnp.asarray(np.stack([r.standard_normal((8, 32)) for r in rs]), jnp.float32),
    jnp.asarray(np.stack([r.standard_normal(32) for r in rs]), jnp.float32),
  )


def _decoder(z):
  return jnp.tanh(3.0 * z[..., :3])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  w = str(tmp_path_factory.mktemp("run"))
  subprocess.run(
    [
      sys.executable,
      "-m",
      "sd3_jax.main",
      "--config",
      "configs/tiny.py",
      "--workdir",
      w,
      "--config.total_steps=2",
      "--config.val.every=0",
    ],
    cwd=REPO,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
    check=True,
    capture_output=True,
    timeout=600,
  )
  return w


PROMPTS = ["a cat", "the dog", "a cat with the dog", "the cat sat"]


def test_clip_score_end_to_end_equals_transformers(workdir, clip_dirs):
  """Samples -> our preprocessing, tokenization and CLIP -> score, against transformers'
  CLIPImageProcessor + CLIPTokenizer + CLIPModel on the same images."""
  from sd3_jax import checkpoint as ckpt_lib, sharding

  m, hf_dir, jax_dir = clip_dirs
  mesh = sharding.make_mesh(1, -1, 1)
  model, params, _, _ = ckpt_lib.load_workdir(workdir, mesh=mesh)
  seen = []
  clip = clip_metrics.CLIPFeatures.from_pretrained(jax_dir, mesh=mesh, batch_size=4)
  result = run.evaluate(
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
    evaluate_cli.read_prompts("/nonexistent/prompts.txt")
  for argv, message in ((["--help"], "--reference_stats"),):
    r = subprocess.run(
      [sys.executable, "-m", "sd3_jax.evaluate", *argv],
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
    run.PeriodicEvaluator.from_settings({"every": 1, "clip": ""}, None)
