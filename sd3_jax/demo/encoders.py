"""The demo's text side: tokenizers trained on its captions (a CLIP BPE whose merges the
``tokenizers`` library learns, and a T5 unigram model with one piece per caption word) and small,
randomly initialised CLIP-L, CLIP-G and T5 encoders of the real architectures, written in the
diffusers pipeline layout that ``SD3TextConditioner.from_pretrained`` reads."""

from __future__ import annotations

import collections
import json
import os
from typing import Sequence

import numpy as np

CLIP_SPECIALS = ("<|startoftext|>", "<|endoftext|>")
T5_SPECIALS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in T5's vocabulary


# ---------------------------------------------------------------------------------------------
# Tokenizers trained on the captions


def clip_byte_chars() -> list[str]:
  """CLIP's byte -> unicode table, in the order of its vocabulary ('!' is id 0)."""
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
  cs, n = bs[:], 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return [chr(c) for c in cs]


def write_clip_tokenizer(path: str, captions: Sequence[str], pad_token: str) -> int:
  """A CLIP BPE tokenizer in the released file layout (vocab.json, merges.txt,
  tokenizer_config.json) whose merges are learned from ``captions`` with the ``tokenizers``
  library. The vocabulary is CLIP's: 256 byte symbols, the same with ``</w>``, the learned
  merges, then BOS and EOS (EOS has the largest id, as CLIP's pooling expects). Returns its size."""
  from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

  chars = clip_byte_chars()
  tok = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
  tok.normalizer = normalizers.Lowercase()
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.train_from_iterator(
    captions, trainers.BpeTrainer(vocab_size=10_000, min_frequency=1, end_of_word_suffix="</w>", show_progress=False)
  )
  merges = [
    tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in json.loads(tok.to_str())["model"]["merges"]
  ]
  vocab = {c: i for i, c in enumerate(chars)}
  vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
  for a, b in merges:
    vocab.setdefault(a + b, len(vocab))
  for special in CLIP_SPECIALS:
    vocab[special] = len(vocab)
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "vocab.json"), "w") as f:
    json.dump(vocab, f)
  with open(os.path.join(path, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump(
      {
        "tokenizer_class": "CLIPTokenizer",
        "bos_token": CLIP_SPECIALS[0],
        "eos_token": CLIP_SPECIALS[1],
        "unk_token": CLIP_SPECIALS[1],
        "pad_token": pad_token,
        "model_max_length": 77,
        "do_lower_case": True,
      },
      f,
    )
  return len(vocab)


def write_t5_tokenizer(path: str, captions: Sequence[str]) -> int:
  """A T5 (sentencepiece unigram) tokenizer: one piece per caption word, scored by its log
  frequency in ``captions`` (the unigram model's estimate for whole-word pieces), plus single
  letters so that any lowercase text still tokenizes. Returns its vocabulary size."""
  from sd3_jax import text_conditioning

  transformers = text_conditioning.import_transformers()

  counts = collections.Counter(w for c in captions for w in c.lower().split())
  total = sum(counts.values())
  pieces = [(s, 0.0) for s in T5_SPECIALS] + [("▁", -10.0)]
  pieces += [("▁" + w, float(np.log(n / total))) for w, n in sorted(counts.items())]
  pieces += [(ch, -12.0) for ch in "abcdefghijklmnopqrstuvwxyz"]
  transformers.T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512).save_pretrained(path)
  return len(pieces)


# ---------------------------------------------------------------------------------------------
# Random encoders of the real architectures


def make_text_encoders(
  out_dir: str, captions: Sequence[str], *, clip_l_dim: int, clip_g_dim: int, t5_dim: int, seed: int = 0
) -> None:
  """Writes tokenizer{,_2,_3}/ and randomly initialised text_encoder{,_2,_3}/ (our checkpoint
  format) under ``out_dir``, atomically (a half-written directory is never left behind)."""
  import jax
  from sd3_jax.storage import fileutil, pretrained
  from sd3_jax.models import text_encoders as te

  with fileutil.atomic_directory(out_dir) as tmp:
    clip_vocab = write_clip_tokenizer(os.path.join(tmp, "tokenizer"), captions, pad_token=CLIP_SPECIALS[1])
    write_clip_tokenizer(os.path.join(tmp, "tokenizer_2"), captions, pad_token="!")
    t5_vocab = write_t5_tokenizer(os.path.join(tmp, "tokenizer_3"), captions)
    clip = dict(vocab_size=clip_vocab, num_layers=2, num_heads=4, max_position_embeddings=77)
    configs = {
      # CLIP-L: quick_gelu; CLIP-G: gelu (as the released encoders). eos_token_id 2 is the
      # released configs' legacy value: pool at argmax(ids), i.e. at EOS (the largest id).
      "text_encoder": te.CLIPTextConfig(
        hidden_size=clip_l_dim,
        intermediate_size=4 * clip_l_dim,
        projection_dim=clip_l_dim,
        hidden_act="quick_gelu",
        **clip,
      ),
      "text_encoder_2": te.CLIPTextConfig(
        hidden_size=clip_g_dim, intermediate_size=4 * clip_g_dim, projection_dim=clip_g_dim, hidden_act="gelu", **clip
      ),
      "text_encoder_3": te.T5EncoderConfig(
        vocab_size=t5_vocab, d_model=t5_dim, d_kv=t5_dim // 4, d_ff=2 * t5_dim, num_layers=2, num_heads=4
      ),
    }
    for i, (name, config) in enumerate(configs.items()):
      module = te.build(config)
      params = te.init_params(module, jax.random.key(seed + 100 + i))
      pretrained.save_pretrained(os.path.join(tmp, name), params, config)
