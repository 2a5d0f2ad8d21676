"""Text encoders (CLIP, T5), their conversion and checkpoints, and SD3 text conditioning.

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

from sd3_jax import pretrained, text_conditioning as tc
from sd3_jax.flow import conditioning
from sd3_jax.demo.run import clip_byte_chars
from sd3_jax.models import t5 as t5_lib
from sd3_jax.models import text_encoders as te
from sd3_jax.convert import convert, detect_model, text_keys as TK
from sd3_jax.convert.cli import main as cli_main

PROMPTS = ["a cat", "the dog sat on a mat with a cat", ""]


def rel_err(ours, ref) -> float:
  ref = ref.detach().numpy() if hasattr(ref, "detach") else np.asarray(ref)
  return float(np.linalg.norm(np.asarray(ours, np.float64) - ref) / np.linalg.norm(ref))


# ---------------------------------------------------------------------------------------------
# Tiny tokenizers and models


MERGES = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>"), ("t", "h"), ("th", "e</w>")]


def write_clip_tokenizer(path, pad_token: str) -> None:
  """The released file layout: vocab.json, merges.txt, tokenizer_config.json."""
  chars = clip_byte_chars()
  vocab = {c: i for i, c in enumerate(chars)}
  vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
  for a, b in MERGES:
    vocab[a + b] = len(vocab)
  vocab["<|startoftext|>"] = len(vocab)
  vocab["<|endoftext|>"] = len(vocab)
  os.makedirs(path)
  with open(os.path.join(path, "vocab.json"), "w") as f:
    json.dump(vocab, f)
  with open(os.path.join(path, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES))
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump(
      {
        "tokenizer_class": "CLIPTokenizer",
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad_token,
        "model_max_length": 77,
        "do_lower_case": True,
      },
      f,
    )


def write_t5_tokenizer(path) -> None:
  pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
  pieces += [("▁" + w, -3.0) for w in ("a", "cat", "dog", "the", "sat", "on", "mat", "with")]
  pieces += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"]
  transformers.T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512).save_pretrained(path)


CLIP_VOCAB = 520  # 512 byte tokens + 6 merges; BOS 518, EOS 519
CLIP_L_HF = dict(
  vocab_size=CLIP_VOCAB,
  hidden_size=32,
  intermediate_size=48,
  num_hidden_layers=2,
  num_attention_heads=4,
  max_position_embeddings=77,
  projection_dim=32,
  hidden_act="quick_gelu",
  bos_token_id=0,
  eos_token_id=2,
  pad_token_id=1,
)
CLIP_G_HF = dict(
  CLIP_L_HF, hidden_size=48, intermediate_size=64, num_attention_heads=4, projection_dim=48, hidden_act="gelu"
)
T5_HF = dict(
  vocab_size=40,
  d_model=96,
  d_kv=8,
  d_ff=64,
  num_layers=2,
  num_heads=4,
  feed_forward_proj="gated-gelu",
  dropout_rate=0.0,
)


def torch_clip(hf: dict, seed: int, identity_projection: bool = False):
  torch.manual_seed(seed)
  m = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**hf)).eval()
  if identity_projection:  # SD3's CLIP-L (diffusers' single-file loader sets it to the identity)
    with torch.no_grad():
      m.text_projection.weight.copy_(torch.eye(hf["hidden_size"]))
  return m


def torch_t5(hf: dict, seed: int):
  torch.manual_seed(seed)
  return transformers.T5EncoderModel(transformers.T5Config(**hf)).eval()


def ours(m):
  """(module, params) converted from a torch model in memory."""
  config, params = TK.state_dict_to_params(m.state_dict(), m.config.to_dict())
  return te.build(config), jax.tree.map(jnp.asarray, params)


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
    params = pretrained.unflatten({k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()})
    pretrained.save_pretrained(tmp_path / str(i), params, cfg, dtype=jnp.bfloat16)
    meta = json.loads((tmp_path / str(i) / pretrained.CONFIG_FILE).read_text())
    assert meta["format"] == pretrained.format_of_config(cfg).name and meta["param_dtype"] == "bfloat16"
    loaded, lp = pretrained.load_pretrained(tmp_path / str(i), dtype=jnp.bfloat16)
    assert type(loaded) is type(model) and loaded.config == cfg and loaded.dtype == jnp.bfloat16
    flat = pretrained.flatten(lp)
    assert sorted(flat) == sorted(pretrained.flatten(params)) and all(v.dtype == jnp.float32 for v in flat.values())
    for k, v in pretrained.flatten(params).items():
      assert np.array_equal(np.asarray(flat[k]), v.astype(jnp.bfloat16).astype(np.float32)), k
  assert [f for f in pretrained.FORMATS] == [
    "sd3_jax.mmdit",
    "sd3_jax.clip_text",
    "sd3_jax.t5_encoder",
    "sd3_jax.vae",
    "sd3_jax.clip_vision",
    "sd3_jax.clip",
  ]


# ---------------------------------------------------------------------------------------------
# Tokenization and conditioning


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
  d = tmp_path_factory.mktemp("tok")
  write_clip_tokenizer(d / "tokenizer", "<|endoftext|>")  # as the released tokenizer/
  write_clip_tokenizer(d / "tokenizer_2", "!")  # as the released tokenizer_2/
  write_t5_tokenizer(d / "tokenizer_3")
  return d, [tc.load_tokenizer(d / n) for n in tc.TOKENIZER_DIRS]


def test_tokenization_rules(tokenizers):
  _, (tok_l, tok_g, tok_t5) = tokenizers
  assert tok_l.bos_token_id == 518 and tok_l.eos_token_id == 519 and tok_t5.eos_token_id == 1
  l = tc.tokenize_clip(tok_l, ["a cat", ""])
  assert l.shape == (2, 77) and l.dtype == np.int32
  # "a cat" -> a</w> (320 = 256 + 'a') cat</w> (513): BOS, tokens, EOS, then EOS padding.
  assert l[0, :4].tolist() == [518, 320, 513, 519] and (l[0, 4:] == 519).all()
  assert l[1, :2].tolist() == [518, 519] and (l[1, 2:] == 519).all()
  g = tc.tokenize_clip(tok_g, ["a cat", ""], pad_id=0)
  assert g[0, :4].tolist() == [518, 320, 513, 519] and (g[0, 4:] == 0).all() and (g[1, 2:] == 0).all()
  long = tc.tokenize_clip(tok_l, [" ".join(["the dog"] * 60)])  # truncated: BOS + 75 + EOS
  assert long[0, 0] == 518 and long[0, 76] == 519 and (long[0, 1:76] != 519).all()
  t = tc.tokenize_t5(tok_t5, ["a cat", "", "the dog sat on a mat"], length=6)
  assert t.tolist() == [[4, 5, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0], [7, 6, 8, 9, 4, 1]]
  with pytest.raises(TypeError, match="list of strings"):
    tc.tokenize_clip(tok_l, "a cat")


@pytest.fixture(scope="module")
def pipeline_dir(tokenizers, tmp_path_factory):
  """A diffusers-layout directory: CLIP-L as our checkpoint, CLIP-G and T5 as transformers."""
  d = tmp_path_factory.mktemp("pipe")
  tok_dir, _ = tokenizers
  for n in tc.TOKENIZER_DIRS:
    os.symlink(tok_dir / n, d / n)
  torch_l = torch_clip(CLIP_L_HF, seed=10, identity_projection=True)
  torch_g = torch_clip(CLIP_G_HF, seed=11)
  torch_t5_ = torch_t5(T5_HF, seed=12)
  torch_l.save_pretrained(d / "clip_l_hf")
  convert(d / "clip_l_hf", d / "text_encoder", "jax")
  torch_g.save_pretrained(d / "text_encoder_2")
  torch_t5_.save_pretrained(d / "text_encoder_3")
  return d, (torch_l, torch_g, torch_t5_)


def test_project_clip_l_is_diffusers_pooled_vector(tokenizers, pipeline_dir, tmp_path):
  """diffusers' encode_prompt pools CLIP-L's *projected* output, the reference its un-projected
  one: equal only for an identity text_projection (released SD3). With a random projection,
  project_clip_l=True reproduces diffusers and the default does not."""
  from diffusers import StableDiffusion3Pipeline

  d, (_, torch_g, torch_t5_) = pipeline_dir
  _, (tok_l, tok_g, tok_t5) = tokenizers
  torch_l = torch_clip(CLIP_L_HF, seed=13)  # random projection
  for n in os.listdir(d):
    if n != "text_encoder" and not n.startswith("clip_l"):
      os.symlink(d / n, tmp_path / n)
  torch_l.save_pretrained(tmp_path / "text_encoder")
  pipe = StableDiffusion3Pipeline(
    transformer=None,
    scheduler=None,
    vae=None,
    text_encoder=torch_l,
    tokenizer=tok_l,
    text_encoder_2=torch_g,
    tokenizer_2=tok_g,
    text_encoder_3=torch_t5_,
    tokenizer_3=tok_t5,
  )
  with torch.no_grad():
    _, _, ref_pool, _ = pipe.encode_prompt(
      PROMPTS, None, None, device=torch.device("cpu"), do_classifier_free_guidance=False, max_sequence_length=20
    )
  _, projected = tc.load_conditioner(str(tmp_path), t5_length=20, project_clip_l=True).encode(PROMPTS)
  _, reference = tc.load_conditioner(str(tmp_path), t5_length=20).encode(PROMPTS)
  assert rel_err(projected, ref_pool) < 1e-5
  assert rel_err(reference[:, :32], ref_pool[:, :32]) > 1e-2  # CLIP-L's part differs
  np.testing.assert_allclose(reference[:, 32:], projected[:, 32:], rtol=1e-6)  # CLIP-G's does not


def test_conditioner_matches_diffusers(tokenizers, pipeline_dir):
  from diffusers import StableDiffusion3Pipeline

  d, (torch_l, torch_g, torch_t5_) = pipeline_dir
  _, (tok_l, tok_g, tok_t5) = tokenizers
  cond = tc.SD3TextConditioner.from_pretrained(d, t5_length=20)
  assert cond.context_dim == 96 and cond.layout == conditioning.TextLayout(32, 48, 77)
  context, pooled = cond.encode(PROMPTS)
  assert context.shape == (3, 77 + 20, 96) and pooled.shape == (3, 80)
  pipe = StableDiffusion3Pipeline(
    transformer=None,
    scheduler=None,
    vae=None,
    text_encoder=torch_l,
    tokenizer=tok_l,
    text_encoder_2=torch_g,
    tokenizer_2=tok_g,
    text_encoder_3=torch_t5_,
    tokenizer_3=tok_t5,
  )
  with torch.no_grad():
    ref_ctx, neg_ctx, ref_pool, neg_pool = pipe.encode_prompt(
      PROMPTS, None, None, device=torch.device("cpu"), do_classifier_free_guidance=True, max_sequence_length=20
    )
  assert rel_err(context, ref_ctx) < 1e-5 and rel_err(pooled, ref_pool) < 1e-5
  empty_ctx, empty_pool = cond.encode_empty()  # the CFG negative: the encoded ""
  assert empty_ctx.shape == (1, 97, 96)
  assert rel_err(empty_ctx, neg_ctx[:1]) < 1e-5 and rel_err(empty_pool, neg_pool[:1]) < 1e-5
  np.testing.assert_allclose(empty_ctx[0], context[2], rtol=1e-5, atol=1e-6)
  # Layout: CLIP-L | CLIP-G | zeros on the first 77 tokens, T5 after them.
  ids = cond.tokenize(PROMPTS)
  with torch.no_grad():
    l_hidden = torch_l(torch.tensor(ids["clip_l"]).long(), output_hidden_states=True).hidden_states[-2]
    t5_out = torch_t5_(torch.tensor(ids["t5"]).long()).last_hidden_state
  assert rel_err(context[:, :77, :32], l_hidden) < 1e-5 and rel_err(context[:, 77:], t5_out) < 1e-5
  assert not np.asarray(context[:, :77, 80:]).any()
  # Without T5: its tokens are zeros (as the reference); the CLIP part is unchanged.
  no_t5 = tc.SD3TextConditioner.from_pretrained(d, use_t5=False, t5_length=20, context_dim=96)
  ctx0, pool0 = no_t5.encode(PROMPTS)
  assert ctx0.shape == context.shape and not np.asarray(ctx0[:, 77:]).any()
  np.testing.assert_array_equal(np.asarray(ctx0[:, :77]), np.asarray(context[:, :77]))
  np.testing.assert_array_equal(np.asarray(pool0), np.asarray(pooled))
  with pytest.raises(ValueError, match="context_dim 64 != T5 d_model 96"):
    tc.SD3TextConditioner(cond.clip_l, cond.clip_g, cond.t5, context_dim=64)


def test_conditioner_short_clip_length(pipeline_dir):
  """clip_length < 77 (the embedded demo's 12): CLIP attention is causal and pooling reads the
  first EOS, so for prompts that fit, the CLIP part equals the first tokens of the 77-token one."""
  d, _ = pipeline_dir
  full = tc.SD3TextConditioner.from_pretrained(d, t5_length=20)
  short = tc.SD3TextConditioner.from_pretrained(d, t5_length=20, clip_length=12)
  assert short.layout == conditioning.TextLayout(32, 48, 12)
  prompts = PROMPTS[:1] + PROMPTS[2:]  # the second prompt needs more than 12 tokens
  ctx_s, pool_s = short.encode(prompts)
  ctx_f, pool_f = full.encode(prompts)
  assert ctx_s.shape == (2, 12 + 20, 96)
  np.testing.assert_allclose(ctx_s[:, :12], ctx_f[:, :12], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(pool_s, pool_f, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ctx_s[:, 12:], ctx_f[:, 77:], rtol=1e-5, atol=1e-6)  # T5 unchanged
  assert short.tokenize([PROMPTS[1]])["clip_l"][0, -1] == 519  # truncated, still ends with EOS
  with pytest.raises(ValueError, match="fewer than clip_length 100"):
    tc.SD3TextConditioner(full.clip_l, full.clip_g, full.t5, clip_length=100)


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
