"""sd3_jax.build_dataset: folder/JSONL and tfds inputs, corrupt images, resume, processes, mixing."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from sd3_jax import build_dataset as bd
from sd3_jax.data import builder, image_sources
from sd3_jax.data import records, sources

L, D, P = 3, 8, 4


def text_encoder(prompts):
  """Deterministic fake conditioner: context/pooled derived from the prompt's length and hash."""
  ctx = np.zeros((len(prompts), L, D), np.float32)
  pooled = np.zeros((len(prompts), P), np.float32)
  for i, t in enumerate(prompts):
    ctx[i] = len(t) / 10.0
    pooled[i] = (sum(map(ord, t)) % 97) / 97.0
  return ctx, pooled


def image_encoder(images, seeds):
  """Fake VAE, f=2, 4 channels: 2x2 average pooling plus the seed's fraction in channel 3."""
  b, h, w, _ = images.shape
  pooled = images.reshape(b, h // 2, 2, w // 2, 2, 3).mean((2, 4))
  extra = np.broadcast_to((seeds % 1000 / 1000.0)[:, None, None, None], (b, h // 2, w // 2, 1))
  return np.concatenate([pooled, extra], -1)


def _make_folder(tmp_path, n, corrupt=(), sizes=None, caption2=False):
  img_dir = tmp_path / "imgs"
  img_dir.mkdir()
  rows = []
  rng = np.random.default_rng(0)
  for i in range(n):
    name = f"sub/im{i:03d}.png" if i % 2 else f"im{i:03d}.jpg"
    os.makedirs(img_dir / os.path.dirname(name) if os.path.dirname(name) else img_dir, exist_ok=True)
    if i in corrupt:
      (img_dir / name).write_bytes(b"not an image at all")
    else:
      h, w = sizes[i] if sizes else (20 + i % 5, 24)
      Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(img_dir / name)
    row = {"file": name, "caption": f"caption number {i}"}
    if caption2:
      row["caption2"] = f"alt {i}"
    rows.append(row)
  jsonl = tmp_path / "caps.jsonl"
  jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  return image_sources.FolderSource(str(img_dir), str(jsonl))


def _read(directory):
  src = sources.RecordSource(directory)
  return {src[i].metadata["id"]: src[i] for i in range(len(src))}, src


def _same(a, b):
  assert sorted(a) == sorted(b)
  for k in a:
    assert dict(a[k].metadata) == dict(b[k].metadata)
    for t in ("latent", "context", "pooled"):
      np.testing.assert_array_equal(getattr(a[k], t), getattr(b[k], t))


KW = dict(
  image_encoder=image_encoder, text_encoder=text_encoder, resolution=8, batch_size=3, chunk_size=4, records_per_shard=3
)


def test_folder_end_to_end_and_corrupt(tmp_path):
  source = _make_folder(tmp_path, 10, corrupt={3, 8})
  out = str(tmp_path / "out")
  with pytest.warns(UserWarning, match="skipping example"):
    result = builder.build(source, out, **KW)
  assert result["summary"]["num_records"] == 8 and result["summary"]["skipped_examples"] == 2
  got, src = _read(out)
  assert len(src) == 8
  assert src.element_spec["latent"][0] == (4, 4, 4) and src.element_spec["latent"][1] == np.float16
  assert src.element_spec["context"] == ((L, D), np.dtype(np.float16))
  assert src.element_spec["pooled"] == ((P,), np.dtype(np.float16))
  want_ids = {r["file"] for i, r in enumerate(source.rows) if i not in (3, 8)}
  assert set(got) == want_ids
  for i, row in enumerate(source.rows):
    if i in (3, 8):
      continue
    ex = got[row["file"]]
    assert ex.metadata["caption"] == row["caption"]
    # the stored latent is the encoder's output on the centre-cropped, resized image
    pixels = image_sources.crop_resize(source[i]["image"], 8, 8)
    want = image_encoder(pixels[None], np.array([builder.example_seed(0, row["file"])], np.uint32))[0]
    np.testing.assert_allclose(ex.latent.astype(np.float32), want, atol=2e-3)
    np.testing.assert_allclose(ex.context.astype(np.float32), text_encoder([row["caption"]])[0][0], atol=2e-3)
  assert src.info["metadata"]["skipped_examples"] == 2
  assert sorted(src.info["metadata"]["skipped_indices"]) == ["3", "8"]


def test_resume_after_interruption_equals_uninterrupted(tmp_path):
  source = _make_folder(tmp_path, 11, corrupt={5})
  full = str(tmp_path / "full")
  with pytest.warns(UserWarning):
    builder.build(source, full, **KW)
  calls = {"n": 0}

  def flaky(images, seeds):
    calls["n"] += 1
    if calls["n"] == 3:  # chunk 0 needs 2 batches; die inside chunk 1
      raise KeyboardInterrupt("simulated kill")
    return image_encoder(images, seeds)

  part = str(tmp_path / "part")
  with pytest.raises(KeyboardInterrupt):
    builder.build(source, part, **dict(KW, image_encoder=flaky))
  assert not os.path.exists(os.path.join(part, records.INFO_FILE))
  with pytest.warns(UserWarning):
    result = builder.build(source, part, **KW)
  assert result["skipped_chunks"] == [0] and result["processed_chunks"] == [1, 2]
  _same(_read(part)[0], _read(full)[0])
  assert len(_read(part)[1]) == 10
  again = builder.build(source, part, **KW)  # all done: nothing recomputed
  assert again["processed_chunks"] == [] and again["summary"]["num_records"] == 10


def test_two_processes_disjoint_complete(tmp_path):
  source = _make_folder(tmp_path, 13)
  out = str(tmp_path / "out")
  r1 = builder.build(source, out, process_index=1, process_count=2, **KW)
  assert r1["summary"] is None and r1["processed_chunks"] == [1, 3]
  assert not os.path.exists(os.path.join(out, records.INFO_FILE))
  r0 = builder.build(source, out, process_index=0, process_count=2, **KW)
  assert r0["processed_chunks"] == [0, 2] and r0["summary"]["num_records"] == 13
  got, src = _read(out)
  assert len(src) == 13 and set(got) == {r["file"] for r in source.rows}
  single = str(tmp_path / "single")
  builder.build(source, single, **KW)
  _same(got, _read(single)[0])


def test_caption_mixing_statistics_and_determinism(tmp_path):
  picks = [builder.choose_caption(7, f"id{i}", "a", "b")[1] for i in range(4000)]
  frac = picks.count("caption2") / len(picks)
  assert abs(frac - 0.5) < 0.03  # ~4 sigma
  assert picks == [builder.choose_caption(7, f"id{i}", "a", "b")[1] for i in range(4000)]
  other = [builder.choose_caption(8, f"id{i}", "a", "b")[1] for i in range(4000)]
  assert other != picks
  assert builder.choose_caption(7, "x", "a", None) == ("a", "caption")
  source = _make_folder(tmp_path, 12, caption2=True)
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  builder.build(source, a, seed=3, **KW)
  builder.build(source, b, seed=3, **KW)
  ga, gb = _read(a)[0], _read(b)[0]
  _same(ga, gb)
  sources = {ex.metadata["caption_source"] for ex in ga.values()}
  assert sources == {"caption", "caption2"}
  for i, row in enumerate(source.rows):
    cap, which = builder.choose_caption(3, row["file"], row["caption"], row["caption2"])
    assert ga[row["file"]].metadata["caption"] == cap


def test_buckets_and_identity(tmp_path):
  buckets = image_sources.aspect_buckets(64, multiple=16, max_aspect=2.0)
  assert (64, 64) in buckets and all(abs(h * w - 64 * 64) <= 0.3 * 64 * 64 for h, w in buckets)
  sizes = {0: (40, 80), 1: (80, 40), 2: (50, 50), 3: (42, 84), 4: (60, 60)}
  source = _make_folder(tmp_path, 5, sizes=sizes)
  out = str(tmp_path / "out")
  res = builder.build(
    source,
    out,
    image_encoder=builder.identity_image_encoder,
    text_encoder=text_encoder,
    resolution=64,
    buckets=image_sources.aspect_buckets(64, 16),
    batch_size=2,
    chunk_size=3,
    latent_dtype="float32",
  )
  dirs = res["summary"]["directories"]
  assert sum(dirs.values()) == 5 and dirs["64x64"] == 2 and len(dirs) == 3
  wide = [k for k in dirs if int(k.split("x")[1]) > int(k.split("x")[0])]
  assert len(wide) == 1 and dirs[wide[0]] == 2
  got, src = _read(os.path.join(out, "64x64"))
  ex = got[source.rows[2]["file"]]
  np.testing.assert_allclose(ex.latent, image_sources.crop_resize(source[2]["image"], 64, 64), atol=1e-6)
  assert ex.latent.min() >= -1 and ex.latent.max() <= 1


def test_cli_folder_identity(tmp_path):
  source = _make_folder(tmp_path, 4, corrupt={1})
  out = str(tmp_path / "cli")
  with pytest.warns(UserWarning):
    res = bd.main(
      [
        "--images",
        source.image_dir,
        "--captions",
        str(tmp_path / "caps.jsonl"),
        "--out",
        out,
        "--identity_vae",
        "--resolution",
        "8",
        "--batch_size",
        "2",
        "--process_index",
        "0",
        "--process_count",
        "1",
      ],
      text_encoder=text_encoder,
    )
  assert res["summary"]["num_records"] == 3
  src = sources.RecordSource(out)
  assert src.element_spec["latent"][0] == (8, 8, 3) and src.info["metadata"]["vae"] == "identity"


def test_tfds_source(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")

  class TinyCaps(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict(
          {"image": tfds.features.Image(shape=(None, None, 3)), "caption": tfds.features.Text()}
        ),
      )

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      rng = np.random.default_rng(1)
      for i in range(5):
        img = Image.fromarray(rng.integers(0, 256, (10 + i, 12, 3), dtype=np.uint8))
        yield i, {"image": img, "caption": f"tfds caption {i}"}

  data_dir = str(tmp_path / "tfds")
  tfds_builder = TinyCaps(data_dir=data_dir, file_format="array_record")
  tfds_builder.download_and_prepare()
  source = image_sources.TfdsSource.from_name("tiny_caps", data_dir, "train")
  assert len(source) == 5
  out = str(tmp_path / "out")
  builder.build(source, out, **KW)
  got, src = _read(out)
  assert len(src) == 5
  assert sorted(ex.metadata["caption"] for ex in got.values()) == [f"tfds caption {i}" for i in range(5)]
  assert set(got) == {f"tiny_caps/train/{i}" for i in range(5)}


def test_vae_encoder_mean_and_per_example_sample():
  import jax
  from sd3_jax.models import vae as V

  model = V.AutoencoderKL(V.VAEConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8))
  x = np.random.default_rng(0).uniform(-1, 1, (3, 8, 8, 3)).astype(np.float32)
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  seeds = np.array([5, 6, 5], np.uint32)
  mean = builder.make_vae_encoder(model, params, sample=False)(x, seeds)
  want = model.apply({"params": params}, x, method="latents_from_images")
  np.testing.assert_allclose(np.asarray(mean), np.asarray(want), atol=1e-5)
  enc = builder.make_vae_encoder(model, params, sample=True, seed=1)
  xs = np.stack([x[0], x[0], x[0]])
  z = np.asarray(enc(xs, seeds))
  np.testing.assert_array_equal(z[0], z[2])  # same example key -> same sample
  assert not np.allclose(z[0], z[1])  # another key -> another sample
  z2 = np.asarray(enc(xs[::-1], seeds[::-1]))  # independent of batch position
  np.testing.assert_allclose(z2[::-1], z, atol=1e-6)
  assert not np.allclose(z[0], np.asarray(mean)[0])
