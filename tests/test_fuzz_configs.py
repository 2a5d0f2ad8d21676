"""Crafted model configs (our ``from_dict`` and the transformers / diffusers ``config.json``
values we read) and damaged checkpoints through ``load_pretrained``.

Every bad config value is a ValueError naming the class and field (no ZeroDivisionError, JAX
shape error or silently cast string); 64 flipped bytes in ``params/`` are an error naming the
damaged leaf; ``verify=False`` skips the check; a checkpoint written before checksums existed
still loads, with a warning in the log.
"""

import json
import logging
import os
import shutil

import numpy as np
import pytest

from sd3_jax.storage import pretrained
from sd3_jax.storage import trees
from sd3_jax.convert import text_keys
from sd3_jax.models.mmdit import MMDiTConfig
from sd3_jax.models.t5 import T5EncoderConfig
from sd3_jax.models.text_encoders import CLIPTextConfig
from sd3_jax.models.vae import TINY_VAE, VAEConfig

MMDIT = dict(
  depth=2,
  hidden_size=32,
  num_heads=4,
  in_channels=4,
  out_channels=4,
  pooled_dim=16,
  context_dim=24,
  pos_embed_max_size=8,
)

BAD_MODEL_CONFIGS = [  # (class, base dict, field, value, message)
  (MMDiTConfig, MMDIT, "qk_norm", "false", "MMDiTConfig.qk_norm must be true or false"),
  (MMDiTConfig, MMDIT, "qk_norm", 1, "MMDiTConfig.qk_norm must be true or false"),
  (MMDiTConfig, MMDIT, "num_heads", 0, "MMDiTConfig.num_heads must be >= 1"),
  (MMDiTConfig, MMDIT, "depth", -3, "MMDiTConfig.depth must be >= 1"),
  (MMDiTConfig, MMDIT, "depth", 2.0, "MMDiTConfig.depth must be an integer"),
  (MMDiTConfig, MMDIT, "hidden_size", "32", "MMDiTConfig.hidden_size must be an integer"),
  (MMDiTConfig, MMDIT, "mlp_ratio", 0, "MMDiTConfig.mlp_ratio must be >= 1"),
  (MMDiTConfig, MMDIT, "patch_size", 0, "MMDiTConfig.patch_size must be >= 1"),
  (MMDiTConfig, MMDIT, "pos_embed_max_size", -8, "MMDiTConfig.pos_embed_max_size must be >= 1"),
  (MMDiTConfig, MMDIT, "pos_embed_scale", 0.0, "MMDiTConfig.pos_embed_scale must be > 0"),
  (MMDiTConfig, MMDIT, "pos_embed_scale", "1.0", "MMDiTConfig.pos_embed_scale must be a finite number"),
  (MMDiTConfig, MMDIT, "dual_attention_layers", "01", "MMDiTConfig.dual_attention_layers must be a list"),
  (MMDiTConfig, MMDIT, "dual_attention_layers", [-1], "MMDiTConfig.dual_attention_layers must be >= 0"),
  (MMDiTConfig, MMDIT, "in_channels", None, "MMDiTConfig.in_channels must be set"),
  (MMDiTConfig, MMDIT, "colour", 1, "unknown MMDiTConfig keys"),
  (CLIPTextConfig, {}, "num_heads", 0, "CLIPTextConfig.num_heads must be >= 1"),
  (CLIPTextConfig, {}, "hidden_size", 768.0, "CLIPTextConfig.hidden_size must be an integer"),
  (CLIPTextConfig, {}, "layer_norm_eps", -1e-5, "CLIPTextConfig.layer_norm_eps must be > 0"),
  (CLIPTextConfig, {}, "hidden_act", 3, "CLIPTextConfig.hidden_act must be a string"),
  (CLIPTextConfig, {}, "num_layers", 0, "CLIPTextConfig.num_layers must be >= 1"),
  (CLIPTextConfig, {}, "eos_token_id", -2, "CLIPTextConfig.eos_token_id must be >= 0"),
  (T5EncoderConfig, {}, "d_model", 0, "T5EncoderConfig.d_model must be >= 1"),
  (T5EncoderConfig, {}, "num_heads", "64", "T5EncoderConfig.num_heads must be an integer"),
  (T5EncoderConfig, {}, "feed_forward_proj", None, "T5EncoderConfig.feed_forward_proj must be set"),
  (T5EncoderConfig, {}, "layer_norm_epsilon", float("inf"), "T5EncoderConfig.layer_norm_epsilon must be a finite"),
  (T5EncoderConfig, {}, "relative_attention_num_buckets", 0, "relative_attention_num_buckets must be >= 1"),
  (VAEConfig, {}, "layers_per_block", 0, "VAEConfig.layers_per_block must be >= 1"),
  (VAEConfig, {}, "norm_num_groups", 0, "VAEConfig.norm_num_groups must be >= 1"),
  (VAEConfig, {}, "block_out_channels", "128", "VAEConfig.block_out_channels must be a list of integers"),
  (VAEConfig, {}, "block_out_channels", [128, 0], "VAEConfig.block_out_channels must be >= 1"),
  (VAEConfig, {}, "scaling_factor", "1.5", "VAEConfig.scaling_factor must be a finite number"),
  (VAEConfig, {}, "latent_channels", True, "VAEConfig.latent_channels must be an integer"),
]


@pytest.mark.parametrize(
  "cls,base,field,value,message",
  BAD_MODEL_CONFIGS,
  ids=[f"{c.__name__}.{f}={v!r}" for c, _, f, v, _ in BAD_MODEL_CONFIGS],
)
def test_bad_model_config_values_name_the_field(cls, base, field, value, message):
  cls.from_dict(dict(base))  # the base is valid
  with pytest.raises(ValueError, match=message.replace("(", r"\(")):
    cls.from_dict({**base, field: value})


CLIP_HF = {
  "model_type": "clip_text_model",
  "architectures": ["CLIPTextModelWithProjection"],
  "hidden_size": 64,
  "intermediate_size": 128,
  "num_hidden_layers": 2,
  "num_attention_heads": 4,
  "projection_dim": 64,
}
T5_HF = {
  "model_type": "t5",
  "architectures": ["T5EncoderModel"],
  "d_model": 64,
  "d_kv": 16,
  "d_ff": 128,
  "num_layers": 2,
  "num_heads": 4,
  "feed_forward_proj": "gated-gelu",
}
VAE_DF = {
  "_class_name": "AutoencoderKL",
  "in_channels": 3,
  "out_channels": 3,
  "latent_channels": 4,
  "block_out_channels": [32, 64],
  "down_block_types": ["DownEncoderBlock2D"] * 2,
  "up_block_types": ["UpDecoderBlock2D"] * 2,
  "layers_per_block": 1,
  "norm_num_groups": 8,
  "use_quant_conv": False,
  "use_post_quant_conv": False,
  "scaling_factor": 1.5,
  "shift_factor": 0.1,
}

BAD_HF_CONFIGS = [  # (reader, base, key, value, message)
  ("clip", CLIP_HF, "num_attention_heads", "4", "CLIPTextConfig.num_heads must be an integer"),
  ("clip", CLIP_HF, "hidden_size", 0, "CLIPTextConfig.hidden_size must be >= 1"),
  ("clip", CLIP_HF, "layer_norm_eps", "1e-5", "CLIPTextConfig.layer_norm_eps must be a finite number"),
  ("t5", T5_HF, "d_model", 0, "T5EncoderConfig.d_model must be >= 1"),
  ("t5", T5_HF, "feed_forward_proj", 5, "T5EncoderConfig.feed_forward_proj must be a string"),
  ("t5", T5_HF, "num_heads", 4.5, "T5EncoderConfig.num_heads must be an integer"),
  ("vae", VAE_DF, "layers_per_block", "1", "VAEConfig.layers_per_block must be an integer"),
  ("vae", VAE_DF, "latent_channels", 4.7, "VAEConfig.latent_channels must be an integer"),
  ("vae", VAE_DF, "use_quant_conv", "false", "use_quant_conv must be true or false"),
  ("vae", VAE_DF, "block_out_channels", "3264", "block_out_channels must be a list"),
  ("vae", VAE_DF, "scaling_factor", "1.5", "VAEConfig.scaling_factor must be a finite number"),
]


@pytest.mark.parametrize(
  "reader,base,key,value,message", BAD_HF_CONFIGS, ids=[f"{r}.{k}={v!r}" for r, _, k, v, _ in BAD_HF_CONFIGS]
)
def test_bad_hf_config_values_name_the_field(reader, base, key, value, message):
  read = VAEConfig.from_diffusers_config if reader == "vae" else lambda d: text_keys.config_from_hf(d, "x/config.json")
  read(dict(base))  # the base is valid
  with pytest.raises(ValueError, match=message):
    read({**base, key: value})


# ----------------------------------------------------------------------------- our checkpoints


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  d = tmp_path_factory.mktemp("ck")
  rng = np.random.default_rng(0)
  cfg = MMDiTConfig(**MMDIT)
  flat = {k: (0.05 * rng.standard_normal(s)).astype(np.float32) for k, s in pretrained.expected_shapes(cfg).items()}
  pretrained.save_pretrained(d / "m", trees.unflatten(flat), cfg)
  vae = {k: (0.05 * rng.standard_normal(s)).astype(np.float32) for k, s in pretrained.expected_shapes(TINY_VAE).items()}
  pretrained.save_pretrained(d / "vae", trees.unflatten(vae), TINY_VAE)
  return d


def _copy(ckpt, name, tmp_path, edit=None):
  p = tmp_path / name
  shutil.copytree(ckpt / name, p)
  if edit is not None:
    m = json.loads((p / pretrained.CONFIG_FILE).read_text())
    edit(m)
    (p / pretrained.CONFIG_FILE).write_text(json.dumps(m))
  return p


def _flip_64_bytes(path):
  files = [os.path.join(r, f) for r, _, fs in os.walk(path / "params") for f in fs if os.sep + "d" in r]
  target = max(files, key=os.path.getsize)
  raw = bytearray(open(target, "rb").read())
  mid = len(raw) // 2
  raw[mid : mid + 64] = bytes(b ^ 0xFF for b in raw[mid : mid + 64])
  open(target, "wb").write(raw)


BAD_METADATA = {  # name -> (model, edit of sd3_jax_config.json, message)
  "qk_norm_string": ("m", lambda m: m["config"].update(qk_norm="false"), "MMDiTConfig.qk_norm must be true or false"),
  "heads_zero": ("m", lambda m: m["config"].update(num_heads=0), "MMDiTConfig.num_heads must be >= 1"),
  "grid_4096": ("m", lambda m: m["config"].update(pos_embed_max_size=4096), r"needs \[1, 16777216, 32\]"),
  "format_version_string": ("m", lambda m: m.update(format_version="1"), "format_version 1 is not supported"),
  "config_list": ("m", lambda m: m.update(config=[1]), 'has no "config" object'),
  "checksum_not_sha": ("m", lambda m: m["checksums"].update(pos_embed="md5:00"), '"checksums" must map'),
  "vae_groups_string": (
    "vae",
    lambda m: m["config"].update(norm_num_groups="8"),
    "VAEConfig.norm_num_groups must be an integer",
  ),
}


@pytest.mark.parametrize("name", sorted(BAD_METADATA))
def test_bad_checkpoint_metadata_names_the_field(ckpt, tmp_path, name):
  model, edit, message = BAD_METADATA[name]
  p = _copy(ckpt, model, tmp_path, edit)
  with pytest.raises(ValueError, match=message):
    pretrained.load_pretrained(p)


@pytest.mark.parametrize("model", ["m", "vae"])
def test_flipped_bytes_name_the_damaged_leaf(ckpt, tmp_path, model):
  p = _copy(ckpt, model, tmp_path)
  _flip_64_bytes(p)
  with pytest.raises(ValueError, match=r"damaged parameter\(s\) \['([^']+)'\]") as e:
    pretrained.load_pretrained(p)
  leaf = str(e.value).split("['", 1)[1].split("'", 1)[0]
  assert leaf in pretrained.stored_params(p)
  _, params = pretrained.load_pretrained(p, verify=False)  # the escape hatch loads it as it is
  assert leaf.split("/")[0] in params


def test_checkpoint_without_checksums_loads_with_a_warning(ckpt, tmp_path, caplog):
  p = _copy(ckpt, "m", tmp_path, lambda m: m.pop("checksums"))
  with caplog.at_level(logging.WARNING, logger="sd3_jax.storage.pretrained"):
    _, params = pretrained.load_pretrained(p)
  assert "has no parameter checksums" in caplog.text and "not verified" in caplog.text
  want = pretrained.load_params(ckpt / "m")
  np.testing.assert_array_equal(np.asarray(params["pos_embed"]), want["pos_embed"])
  written = json.loads((ckpt / "m" / pretrained.CONFIG_FILE).read_text())["checksums"]
  assert sorted(written) == sorted(pretrained.stored_params(ckpt / "m"))  # one per leaf
