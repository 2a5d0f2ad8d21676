"""Tiny tokenizers and text encoders shared by the text-encoder and text-conditioning tests: a
hand-written CLIP BPE (vocab.json/merges.txt), a T5 unigram tokenizer, small transformers CLIP/T5
configs, and in-memory conversion of a torch model to ours."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from sd3_jax.convert import text_keys as TK
from sd3_jax.demo.encoders import clip_byte_chars
from sd3_jax.models import text_encoders as te

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


# A tiny two-tower CLIP (our CLIPConfig layout) for the evaluation tests.
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
