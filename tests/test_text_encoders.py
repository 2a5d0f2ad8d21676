"""Text encoders (CLIP, T5), their conversion and checkpoints (SD3 text conditioning: test_text_conditioning.py).

Oracles: transformers' CLIPTextModelWithProjection / T5EncoderModel (tiny random configs,
float32) and diffusers' StableDiffusion3Pipeline.encode_prompt, with tiny tokenizers built
here (a hand-written CLIP BPE vocab.json/merges.txt, a T5 unigram tokenizer).
"""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from sd3_jax.storage import pretrained
from sd3_jax.storage import trees
from sd3_jax.models import t5 as t5_lib
from sd3_jax.models import text_encoders as te
from sd3_jax.convert import convert, detect_model, text_keys as TK
from sd3_jax.convert.cli import main as cli_main

from text_encoder_helpers import T5_HF, rel_err, CLIP_VOCAB, CLIP_L_HF, CLIP_G_HF, torch_clip, torch_t5, ours  # noqa: E402


# ---------------------------------------------------------------------------------------------
# Model parity


@pytest.mark.parametrize("act,eos", [("quick_gelu", 2), ("gelu", 2), ("gelu", CLIP_VOCAB - 1)])
def test_clip_parity(act, eos):
  m = torch_clip(dict(CLIP_L_HF, hidden_act=act, eos_token_id=eos, projection_dim=24), seed=1)
  module, params = ours(m)
  assert module.config.hidden_act == act and module.config.eos_token_id == eos
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 500, (3, 77))
  ids[:, 0] = 518
  ids[0, 5:] = 519  # CLIP-L style: EOS then EOS padding (pooled at the FIRST EOS)
  ids[1, 9], ids[1, 10:] = 519, 0  # CLIP-G style: EOS then 0 padding
  ids[2, 76] = 519  # full-length prompt
  tid = torch.tensor(ids)
  with torch.no_grad():
    ref = m(tid, output_hidden_states=True)
    ref_pool = m.text_model(tid).pooler_output
  out = jax.jit(module.apply)({"params": params}, jnp.asarray(ids))
  assert out.hidden.shape == (3, 77, 32) and out.projected.shape == (3, 24)
  assert rel_err(out.hidden, ref.hidden_states[-2]) < 1e-5
  assert rel_err(out.pooled, ref_pool) < 1e-5
  assert rel_err(out.projected, ref.text_embeds) < 1e-5
  for layer in (0, -1):  # other hidden layers index transformers' hidden_states the same way
    cfg = dataclasses.replace(module.config, hidden_layer=layer)
    out_l = te.CLIPTextEncoder(cfg).apply({"params": params}, jnp.asarray(ids[:1]))
    assert rel_err(out_l.hidden, ref.hidden_states[layer][:1]) < 1e-5


@pytest.mark.parametrize("ff", ["gated-gelu", "relu"])
def test_t5_parity(ff):
  m = torch_t5(dict(T5_HF, feed_forward_proj=ff), seed=2)
  module, params = ours(m)
  ids = np.random.default_rng(1).integers(0, 40, (2, 150))  # > max_distance: every bucket kind
  with torch.no_grad():
    ref = m(torch.tensor(ids)).last_hidden_state
  out = jax.jit(module.apply)({"params": params}, jnp.asarray(ids))
  assert out.dtype == jnp.float32 and rel_err(out, ref) < 1e-5
  if ff == "gated-gelu":  # bf16 compute: float32 params, norms and outputs; close to float32
    bf16 = te.T5Encoder(module.config, dtype=jnp.bfloat16)
    out16 = jax.jit(bf16.apply)({"params": params}, jnp.asarray(ids))
    assert out16.dtype == jnp.float32 and 1e-6 < rel_err(out16, ref) < 3e-2


def test_relative_position_buckets_match_transformers():
  from transformers.models.t5.modeling_t5 import T5Attention

  n = 600
  rel = torch.arange(n)[None, :] - torch.arange(n)[:, None]
  for nb, md in ((32, 128), (8, 20)):
    ref = T5Attention._relative_position_bucket(rel, bidirectional=True, num_buckets=nb, max_distance=md)
    assert np.array_equal(t5_lib.relative_position_buckets(n, n, nb, md), ref.numpy())


def test_configs():
  # Missing keys take transformers' defaults.
  assert te.CLIPTextConfig.from_hf_config({}) == te.CLIPTextConfig.from_hf_config(
    transformers.CLIPTextConfig().to_dict()
  )
  assert te.T5EncoderConfig.from_hf_config({}) == te.T5EncoderConfig.from_hf_config(transformers.T5Config().to_dict())
  # A full CLIPConfig: its text part and the top-level projection_dim.
  full = transformers.CLIPConfig(text_config=dict(hidden_size=64, num_attention_heads=4), projection_dim=48).to_dict()
  c = te.CLIPTextConfig.from_hf_config(full)
  assert (c.hidden_size, c.num_heads, c.projection_dim) == (64, 4, 48)
  # Presets (the released pipeline's text_encoder{,_2,_3} configs) and round trips through our dicts and transformers' configs.
  assert (
    te.CLIP_L.num_layers,
    te.CLIP_L.hidden_size,
    te.CLIP_L.num_heads,
    te.CLIP_L.intermediate_size,
    te.CLIP_L.hidden_act,
    te.CLIP_L.projection_dim,
  ) == (12, 768, 12, 3072, "quick_gelu", 768)
  assert (
    te.CLIP_G.num_layers,
    te.CLIP_G.hidden_size,
    te.CLIP_G.num_heads,
    te.CLIP_G.intermediate_size,
    te.CLIP_G.hidden_act,
    te.CLIP_G.projection_dim,
  ) == (32, 1280, 20, 5120, "gelu", 1280)
  t = te.T5_XXL
  assert (t.d_model, t.d_ff, t.num_layers, t.num_heads, t.d_kv, t.vocab_size, t.activation) == (
    4096,
    10240,
    24,
    64,
    64,
    32128,
    "gelu_new",
  )
  for cfg in (te.CLIP_L, te.CLIP_G, te.T5_XXL):
    assert type(cfg).from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    hf_cls = transformers.CLIPTextConfig if isinstance(cfg, te.CLIPTextConfig) else transformers.T5Config
    assert type(cfg).from_hf_config(hf_cls(**cfg.to_hf_config()).to_dict()) == cfg
  with pytest.raises(ValueError, match="unknown CLIPTextConfig keys"):
    te.CLIPTextConfig.from_dict({"hidden": 3})
  with pytest.raises(ValueError, match="unsupported CLIP hidden_act"):
    te.CLIPTextConfig(hidden_act="swish2")
  with pytest.raises(ValueError, match="is_decoder"):
    te.T5EncoderConfig.from_hf_config({"is_decoder": True})
  with pytest.raises(ValueError, match="gated-"):
    te.T5EncoderConfig(feed_forward_proj="fancy-gelu")


# ---------------------------------------------------------------------------------------------
# Key conversion


def test_state_dict_round_trip_and_errors():
  m = torch_clip(CLIP_G_HF, seed=3)
  sd = m.state_dict()
  cfg, params = TK.state_dict_to_params(sd, m.config.to_dict())
  back = TK.params_to_state_dict(params, cfg)
  assert sorted(back) == sorted(sd)
  assert all(np.array_equal(back[k], sd[k].numpy()) for k in sd)  # bit-exact
  fresh = torch_clip(CLIP_G_HF, seed=4)
  fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
  hf = m.config.to_dict()
  bad = dict(sd)
  del bad["text_model.encoder.layers.1.mlp.fc2.bias"]
  bad["text_model.encoder.layers.0.self_attn.q_proj.weight"] = torch.zeros(48, 47)
  bad["text_model.encoder.layers.2.mlp.fc1.weight"] = torch.zeros(2, 2)
  with pytest.raises(ValueError) as e:
    TK.state_dict_to_params(bad, hf)
  msg = str(e.value)
  assert "missing (1): text_model.encoder.layers.1.mlp.fc2.bias" in msg
  assert "unexpected (1): text_model.encoder.layers.2.mlp.fc1.weight" in msg
  assert "q_proj.weight: found [48, 47], expected [48, 48]" in msg
  # Ignored: the vision tower of a CLIPModel, buffers. A bare CLIPTextModel (no prefix, no
  # projection) gets the identity projection.
  extra = dict(
    sd,
    **{
      "vision_model.x.weight": torch.zeros(1),
      "logit_scale": torch.zeros(()),
      "text_model.embeddings.position_ids": torch.arange(77),
    },
  )
  assert TK.state_dict_to_params(extra, hf)[0] == cfg
  bare = {k[len("text_model.") :]: v for k, v in sd.items() if k.startswith("text_model.")}
  hf_bare = dict(hf, architectures=["CLIPTextModel"], projection_dim=hf["hidden_size"])
  cfg2, p2 = TK.state_dict_to_params(bare, hf_bare)
  assert np.array_equal(p2["text_projection"]["kernel"], np.eye(48, dtype=np.float32))
  # T5: the tied embedding may be stored twice, but then it must agree.
  t5 = torch_t5(T5_HF, seed=5)
  tsd = dict(t5.state_dict())
  tsd["encoder.embed_tokens.weight"] = tsd["shared.weight"].clone()
  tcfg, tparams = TK.state_dict_to_params(tsd, t5.config.to_dict())
  assert np.array_equal(tparams["shared"]["embedding"], tsd["shared.weight"].numpy())
  tsd["encoder.embed_tokens.weight"] = tsd["shared.weight"] + 1
  with pytest.raises(ValueError, match="differ"):
    TK.state_dict_to_params(tsd, t5.config.to_dict())
  with pytest.raises(ValueError, match="not a text encoder we convert"):
    TK.config_from_hf({"model_type": "bert"})


# ---------------------------------------------------------------------------------------------
# CLI, checkpoints, load_pretrained


def test_cli_end_to_end(tmp_path, capsys):
  clip = torch_clip(CLIP_G_HF, seed=6)
  t5 = torch_t5(T5_HF, seed=7)
  clip.save_pretrained(tmp_path / "clip_hf")
  t5.save_pretrained(tmp_path / "t5_hf", max_shard_size="40KB")  # sharded + index
  assert os.path.isfile(tmp_path / "t5_hf" / "model.safetensors.index.json")
  assert detect_model(tmp_path / "t5_hf")[:2] == ("t5_encoder", "transformers")
  for name in ("clip", "t5"):
    assert cli_main(["--src", str(tmp_path / f"{name}_hf"), "--dst", str(tmp_path / f"{name}_jax"), "--to", "jax"]) == 0
  out = capsys.readouterr().out
  assert "CLIP text encoder: 2 layers, hidden 48" in out and "T5 encoder: 2 layers, d_model 96" in out
  ids = np.random.default_rng(2).integers(0, 40, (2, 77))
  ids[:, -1] = 39
  for name, tm in (("clip", clip), ("t5", t5)):
    module, params = pretrained.load_pretrained(tmp_path / f"{name}_jax")
    assert pretrained.read_format(tmp_path / f"{name}_jax").name == (
      "sd3_jax.clip_text" if name == "clip" else "sd3_jax.t5_encoder"
    )
    with torch.no_grad():
      ref = tm(torch.tensor(ids), output_hidden_states=True)
    got = module.apply({"params": params}, jnp.asarray(ids))
    if name == "clip":
      assert rel_err(got.hidden, ref.hidden_states[-2]) < 1e-5
      assert rel_err(got.projected, ref.text_embeds) < 1e-5
    else:
      assert rel_err(got, ref.last_hidden_state) < 1e-5
  # Back to transformers (bf16, sharded): loads with from_pretrained and equals the source.
  assert (
    cli_main(
      [
        "--src",
        str(tmp_path / "t5_jax"),
        "--dst",
        str(tmp_path / "t5_back"),
        "--to",
        "transformers",
        "--dtype",
        "bfloat16",
        "--max-shard-size",
        "30KB",
      ]
    )
    == 0
  )
  back = transformers.T5EncoderModel.from_pretrained(tmp_path / "t5_back", dtype=torch.bfloat16)
  for k, v in t5.state_dict().items():
    assert torch.equal(back.state_dict()[k], v.to(torch.bfloat16)), k
  assert cli_main(["--src", str(tmp_path / "clip_jax"), "--dst", str(tmp_path / "clip_back"), "--to", "diffusers"]) == 0
  back = transformers.CLIPTextModelWithProjection.from_pretrained(tmp_path / "clip_back")
  assert all(torch.equal(back.state_dict()[k], v) for k, v in clip.state_dict().items())
  # Errors: wrong target, MM-DiT-only options, a text checkpoint where an MM-DiT is expected.
  assert cli_main(["--src", str(tmp_path / "clip_jax"), "--dst", str(tmp_path / "x"), "--to", "sd3"]) == 2
  assert "converts to 'jax' or 'transformers'" in capsys.readouterr().err
  with pytest.raises(ValueError, match="MM-DiT checkpoints only"):
    convert(tmp_path / "clip_hf", tmp_path / "y", "jax", num_heads=4)
  with pytest.raises(ValueError, match="holds a CLIP text encoder"):
    pretrained.read_config(tmp_path / "clip_jax")
  with pytest.raises(ValueError, match="only supported for MM-DiT"):
    pretrained.load_pretrained(tmp_path / "clip_jax", scan_layers=True)


def test_save_load_pretrained_text_formats(tmp_path):
  configs = [te.CLIPTextConfig.from_hf_config(CLIP_L_HF), te.T5EncoderConfig.from_hf_config(T5_HF)]
  for i, cfg in enumerate(configs):
    model = pretrained.format_of_config(cfg).build(cfg)
    shapes = pretrained.expected_shapes(cfg)
    rng = np.random.default_rng(i)
    params = trees.unflatten({k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()})
    pretrained.save_pretrained(tmp_path / str(i), params, cfg, dtype=jnp.bfloat16)
    meta = json.loads((tmp_path / str(i) / pretrained.CONFIG_FILE).read_text())
    assert meta["format"] == pretrained.format_of_config(cfg).name and meta["param_dtype"] == "bfloat16"
    loaded, lp = pretrained.load_pretrained(tmp_path / str(i), dtype=jnp.bfloat16)
    assert type(loaded) is type(model) and loaded.config == cfg and loaded.dtype == jnp.bfloat16
    flat = trees.flatten(lp)
    assert sorted(flat) == sorted(trees.flatten(params)) and all(v.dtype == jnp.float32 for v in flat.values())
    for k, v in trees.flatten(params).items():
      assert np.array_equal(np.asarray(flat[k]), v.astype(jnp.bfloat16).astype(np.float32)), k
  assert [f for f in pretrained.FORMATS] == [
    "sd3_jax.mmdit",
    "sd3_jax.clip_text",
    "sd3_jax.t5_encoder",
    "sd3_jax.vae",
    "sd3_jax.clip_vision",
    "sd3_jax.clip",
  ]


def test_vae_cli(tmp_path):
  """The VAE's diffusers directory <-> our sd3_jax.vae checkpoint (parity: tests/test_vae.py)."""
  from diffusers import AutoencoderKL
  from sd3_jax.models import vae

  torch.manual_seed(0)
  tm = AutoencoderKL(
    block_out_channels=(32, 32),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    latent_channels=4,
    use_quant_conv=False,
    use_post_quant_conv=False,
    shift_factor=0.0609,
    scaling_factor=1.5305,
  ).eval()
  tm.save_pretrained(tmp_path / "vae_df")
  assert detect_model(tmp_path / "vae_df")[:2] == ("vae", "diffusers")
  assert cli_main(["--src", str(tmp_path / "vae_df"), "--dst", str(tmp_path / "vae_jax"), "--to", "jax"]) == 0
  module, params = pretrained.load_pretrained(tmp_path / "vae_jax")
  assert isinstance(module, vae.AutoencoderKL) and module.config.latent_channels == 4
  assert module.config.block_out_channels == (32, 32) and module.config.shift_factor == 0.0609
  assert cli_main(["--src", str(tmp_path / "vae_jax"), "--dst", str(tmp_path / "vae_back"), "--to", "diffusers"]) == 0
  back = AutoencoderKL.from_pretrained(tmp_path / "vae_back")
  assert all(torch.equal(back.state_dict()[k], v) for k, v in tm.state_dict().items())
  assert cli_main(["--src", str(tmp_path / "vae_jax"), "--dst", str(tmp_path / "x"), "--to", "sd3"]) == 2
