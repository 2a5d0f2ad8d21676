"""CLIP image tower and two-tower CLIP model: parity with transformers on random tiny configs,
conversion of transformers directories both ways, load_pretrained, and the preprocessing
against transformers' CLIPImageProcessor (PIL backend) on random images."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from sd3_jax.storage import pretrained
from sd3_jax.convert import convert, detect_model, text_keys as TK
from sd3_jax.convert.cli import main as cli_main
from sd3_jax.evaluation import preprocess as pp
from sd3_jax.models import clip_vision as cv

VISION_HF = dict(
  hidden_size=32,
  intermediate_size=48,
  num_hidden_layers=2,
  num_attention_heads=4,
  image_size=32,
  patch_size=8,
  projection_dim=24,
)
TEXT_HF = dict(
  vocab_size=99,
  hidden_size=40,
  intermediate_size=56,
  num_hidden_layers=2,
  num_attention_heads=4,
  max_position_embeddings=16,
  bos_token_id=97,
  eos_token_id=98,
  pad_token_id=98,
)


def rel_err(ours, ref) -> float:
  ref = ref.detach().numpy() if hasattr(ref, "detach") else np.asarray(ref)
  return float(np.linalg.norm(np.asarray(ours, np.float64) - ref) / np.linalg.norm(ref))


def pooled(x):
  """transformers 5's get_*_features return an output object whose pooler_output is the
  projected embedding (older versions return the tensor)."""
  return getattr(x, "pooler_output", x)


def torch_vision(seed: int, **kw):
  torch.manual_seed(seed)
  return transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**dict(VISION_HF, **kw))).eval()


def torch_clip_model(seed: int, act: str = "quick_gelu"):
  torch.manual_seed(seed)
  cfg = transformers.CLIPConfig(
    text_config=dict(TEXT_HF, hidden_act=act), vision_config=dict(VISION_HF, hidden_act=act), projection_dim=24
  )
  m = transformers.CLIPModel(cfg).eval()
  with torch.no_grad():
    m.logit_scale.fill_(3.1)
  return m


def pixels(b: int, seed: int = 0, size: int = 32) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal((b, 3, size, size)).astype(np.float32)  # NCHW


def token_ids(b: int, seed: int = 1) -> np.ndarray:
  ids = np.random.default_rng(seed).integers(0, 97, (b, 16))
  ids[:, 0] = 97
  ids[0, 6:] = 98  # EOS, then EOS padding: pooled at the first EOS
  ids[1:, 15] = 98
  return ids


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_vision_tower_parity(act):
  m = torch_vision(0, hidden_act=act)
  config, params = TK.state_dict_to_params(m.state_dict(), m.config.to_dict())
  assert config == cv.CLIPVisionConfig(
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    image_size=32,
    patch_size=8,
    hidden_act=act,
    projection_dim=24,
  )
  x = pixels(3)
  with torch.no_grad():
    ref = m(torch.tensor(x))
  module = cv.CLIPVisionEncoder(config)
  nhwc = jnp.asarray(x.transpose(0, 2, 3, 1))
  emb = jax.jit(module.apply)({"params": params}, nhwc)
  assert emb.shape == (3, 24) and emb.dtype == jnp.float32
  assert rel_err(emb, ref.image_embeds) < 1e-5
  out = module.apply({"params": params}, nhwc, return_all=True)
  assert rel_err(out.hidden, ref.last_hidden_state) < 1e-5
  with torch.no_grad():
    ref_pool = m.vision_model(torch.tensor(x)).pooler_output
  assert rel_err(out.pooled, ref_pool) < 1e-5
  with pytest.raises(ValueError, match="channels last"):
    module.apply({"params": params}, jnp.asarray(x))  # NCHW by mistake


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_clip_model_parity(act):
  m = torch_clip_model(1, act)
  config, params = TK.state_dict_to_params(m.state_dict(), m.config.to_dict())
  assert isinstance(config, cv.CLIPConfig) and config.projection_dim == 24
  x, ids = pixels(2, seed=2), token_ids(2)
  with torch.no_grad():
    ref_img = pooled(m.get_image_features(pixel_values=torch.tensor(x)))
    ref_txt = pooled(m.get_text_features(input_ids=torch.tensor(ids)))
    ref = m(input_ids=torch.tensor(ids), pixel_values=torch.tensor(x))
  module = cv.CLIPModel(config)
  out = jax.jit(module.apply)({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(ids))
  assert rel_err(out.image_embeds, ref_img) < 1e-5
  assert rel_err(out.text_embeds, ref_txt) < 1e-5
  assert float(out.logit_scale) == pytest.approx(3.1)
  # transformers' logits: exp(logit_scale) * cosine similarity
  ie = out.image_embeds / jnp.linalg.norm(out.image_embeds, axis=-1, keepdims=True)
  te = out.text_embeds / jnp.linalg.norm(out.text_embeds, axis=-1, keepdims=True)
  assert rel_err(jnp.exp(out.logit_scale) * ie @ te.T, ref.logits_per_image) < 1e-5
  one = module.apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)), method=module.encode_image)
  np.testing.assert_allclose(one, out.image_embeds, rtol=1e-6, atol=1e-6)


def _write_tokenizer(path):
  """A stand-in for the tokenizer files of a hub CLIPModel directory (only copied here)."""
  with open(os.path.join(path, "vocab.json"), "w") as f:
    json.dump({"a": 0}, f)
  with open(os.path.join(path, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n")


def test_clip_model_directory_conversion_and_load_pretrained(tmp_path, capsys):
  m = torch_clip_model(3)
  m.save_pretrained(tmp_path / "hf")
  _write_tokenizer(tmp_path / "hf")
  assert detect_model(tmp_path / "hf")[:2] == ("clip", "transformers")
  assert cli_main(["--src", str(tmp_path / "hf"), "--dst", str(tmp_path / "jax"), "--to", "jax"]) == 0
  assert "CLIP model: image tower CLIP image tower: 2 layers" in capsys.readouterr().out
  assert detect_model(tmp_path / "jax")[:2] == ("clip", "jax")
  assert sorted(os.listdir(tmp_path / "jax" / "tokenizer")) == ["merges.txt", "vocab.json"]
  module, params = pretrained.load_pretrained(tmp_path / "jax")
  assert isinstance(module, cv.CLIPModel) and params["logit_scale"].shape == ()
  x, ids = pixels(2, seed=4), token_ids(2, seed=5)
  with torch.no_grad():
    ref_img = pooled(m.get_image_features(pixel_values=torch.tensor(x)))
    ref_txt = pooled(m.get_text_features(input_ids=torch.tensor(ids)))
  out = module.apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(ids))
  assert rel_err(out.image_embeds, ref_img) < 1e-5 and rel_err(out.text_embeds, ref_txt) < 1e-5
  # Back to transformers: bit-exact, loads with no missing or unexpected keys, tokenizer along.
  convert(tmp_path / "jax", tmp_path / "back", "transformers")
  back = transformers.CLIPModel.from_pretrained(tmp_path / "back").eval()
  for k, v in m.state_dict().items():
    if not k.endswith("position_ids"):
      assert torch.equal(back.state_dict()[k], v), k
  assert os.path.isfile(tmp_path / "back" / "vocab.json")


def test_vision_directory_conversion_and_errors(tmp_path):
  m = torch_vision(5)
  m.save_pretrained(tmp_path / "hf")
  assert detect_model(tmp_path / "hf")[0] == "clip_vision"
  config = convert(tmp_path / "hf", tmp_path / "jax", "jax")
  assert isinstance(config, cv.CLIPVisionConfig)
  module, params = pretrained.load_pretrained(tmp_path / "jax")
  assert isinstance(module, cv.CLIPVisionEncoder)
  x = pixels(2, seed=6)
  with torch.no_grad():
    ref = m(torch.tensor(x)).image_embeds
  assert rel_err(module.apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1))), ref) < 1e-5
  convert(tmp_path / "jax", tmp_path / "back", "transformers")
  back = transformers.CLIPVisionModelWithProjection.from_pretrained(tmp_path / "back")
  assert all(torch.equal(back.state_dict()[k], v) for k, v in m.state_dict().items() if "position_ids" not in k)
  with pytest.raises(ValueError, match="converts to 'jax' or 'transformers'"):
    convert(tmp_path / "jax", tmp_path / "x", "sd3")
  bad = dict(m.state_dict())
  bad["vision_model.embeddings.patch_embedding.weight"] = torch.zeros(32, 3, 4, 4)
  with pytest.raises(ValueError, match=r"patch_embedding.weight: found \[32, 3, 4, 4\], expected \[32, 3, 8, 8\]"):
    TK.state_dict_to_params(bad, m.config.to_dict())


def test_presets_have_the_released_shapes():
  b32, l14 = cv.PRESETS["vit_b_32"], cv.PRESETS["vit_l_14"]
  assert (b32.vision.num_positions, b32.projection_dim, b32.text.hidden_size) == (50, 512, 512)
  assert (l14.vision.num_positions, l14.projection_dim, l14.vision.hidden_size) == (257, 768, 1024)
  shapes = pretrained.expected_shapes(b32)  # ViT-B/32 has 151,277,313 parameters (openai/clip-vit-base-patch32)
  assert sum(int(np.prod(s)) for s in shapes.values()) == 151_277_313
  with pytest.raises(ValueError, match="share one embedding space"):
    cv.CLIPConfig(vision=cv.CLIPVisionConfig(projection_dim=7))


# ---------------------------------------------------------------------------------------------
# Preprocessing


def _processor(**kw):
  cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
  return cls(**kw)


@pytest.mark.parametrize("hw", [(256, 256), (64, 64), (300, 451), (513, 199), (224, 224), (225, 1000)])
def test_preprocess_equals_transformers(hw):
  """Bit-exact pixels (any grey-level difference would be 1/255/0.27 ~ 1.5e-2 after the
  normalisation); what remains is float32 rounding of (x/255 - mean)/std."""
  images = np.random.default_rng(sum(hw)).integers(0, 256, (2, *hw, 3), dtype=np.uint8)
  ref = _processor()(images=list(images), return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
  out = np.asarray(pp.preprocess(images))
  assert out.shape == ref.shape == (2, 224, 224, 3)
  assert np.abs(out - ref).max() < 1e-5 and rel_err(out, ref) < 1e-6


def test_preprocess_of_mixed_sizes_and_other_sizes():
  rng = np.random.default_rng(7)
  images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((300, 451), (64, 64), (130, 97))]
  ref = _processor()(images=images, return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
  assert np.abs(np.asarray(pp.preprocess_list(images)) - ref).max() < 1e-5
  # A smaller CLIP input (tiny test towers): shortest side 32, crop 32.
  small = _processor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32})
  ref = small(images=images, return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
  out = pp.preprocess_list(images, size=40, crop_size=32)
  assert np.abs(np.asarray(out) - ref).max() < 1e-5


def test_preprocess_crop_rounding_and_errors():
  # 224 x 451 keeps its size; the crop starts at (451 - 224) / 2 = 113.5: 113 (floor) or 114
  rows, cols = pp.resize_crop_matrices(224, 451, crop_rounding="floor")
  _, cols_r = pp.resize_crop_matrices(224, 451, crop_rounding="round")
  assert pp.resized_size(224, 451, 224) == (224, 451) and pp.resized_size(225, 1000, 224) == (224, 995)
  np.testing.assert_array_equal(cols_r[:-1], cols[1:])  # torchvision's crop starts one column later
  assert (rows.sum(1) == 1 << pp.PRECISION_BITS).all()  # the identity on the unchanged axis
  with pytest.raises(ValueError, match="uint8 RGB"):
    pp.preprocess(np.zeros((1, 8, 8, 3), np.float32))
  with pytest.raises(ValueError, match="crop_rounding"):
    pp.resize_crop_matrices(8, 8, crop_rounding="ceil")
