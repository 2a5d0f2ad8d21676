"""SD3 text conditioning: the reference's tokenization rules (``tokenize_clip``, ``tokenize_t5``)
and the three-encoder conditioner (``SD3TextConditioner``: prompts -> (context, pooled)), read
from the diffusers pipeline layout (``from_pretrained`` / ``load_conditioner``). The rules and
the layout are in docs/sampling.md.
"""

from __future__ import annotations

import os
import sys
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sd3_jax.flow import conditioning
from sd3_jax.models import text_encoders as te

CLIP_LENGTH = 77
T5_PAD_ID = 0
T5_EOS_ID = 1
CLIP_G_PAD_ID = 0
ENCODER_DIRS = ("text_encoder", "text_encoder_2", "text_encoder_3")
TOKENIZER_DIRS = ("tokenizer", "tokenizer_2", "tokenizer_3")


# ---------------------------------------------------------------------------------------------
# Tokenization


def _token_ids(tokenizer, prompts: Sequence[str], max_length: int) -> list[list[int]]:
  if isinstance(prompts, str):
    raise TypeError("prompts must be a list of strings, not one string")
  out = tokenizer(list(prompts), add_special_tokens=True, truncation=True, max_length=max_length, padding=False)
  return [list(ids) for ids in out["input_ids"]]


def _pad(seqs: list[list[int]], length: int, pad_id: int) -> np.ndarray:
  ids = np.full((len(seqs), length), pad_id, np.int32)
  for i, s in enumerate(seqs):
    if len(s) > length:
      raise ValueError(f"tokenizer returned {len(s)} ids for max_length {length}")
    ids[i, : len(s)] = s
  return ids


def tokenize_clip(
  tokenizer, prompts: Sequence[str], pad_id: int | None = None, length: int = CLIP_LENGTH
) -> np.ndarray:
  """[B, length] int32: BOS, the prompt's tokens (truncated to length - 2), EOS, then pad_id.

  pad_id None pads with the tokenizer's EOS (CLIP-L); SD3's CLIP-G pads with 0."""
  bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
  if bos is None or eos is None:
    raise ValueError("a CLIP tokenizer needs BOS and EOS tokens")
  seqs = _token_ids(tokenizer, prompts, length)
  for s in seqs:
    if len(s) < 2 or s[0] != bos or s[-1] != eos:
      raise ValueError(f"the CLIP tokenizer did not add BOS {bos} / EOS {eos} (got {s[:3]}...{s[-3:]})")
  return _pad(seqs, length, eos if pad_id is None else pad_id)


def tokenize_t5(tokenizer, prompts: Sequence[str], length: int = 77, pad_id: int = T5_PAD_ID) -> np.ndarray:
  """[B, length] int32: the prompt's tokens (truncated to length - 1), EOS, then pad_id (0)."""
  eos = tokenizer.eos_token_id
  seqs = _token_ids(tokenizer, prompts, length)
  for s in seqs:
    if not s or s[-1] != eos:
      raise ValueError(f"the T5 tokenizer did not append EOS {eos} (got ...{s[-3:]})")
  return _pad(seqs, length, pad_id)


def import_transformers():
  """``transformers``, imported without its "PyTorch was not found" advice: we use its tokenizers
  and configs only, never its PyTorch models, so the warning means nothing to our users."""
  if "transformers" in sys.modules:
    return sys.modules["transformers"]
  key = "TRANSFORMERS_NO_ADVISORY_WARNINGS"
  before = os.environ.get(key)
  os.environ[key] = "1"
  try:
    import transformers
  finally:
    if before is None:
      del os.environ[key]
    else:
      os.environ[key] = before
  return transformers


def load_tokenizer(path):
  """A transformers tokenizer from a LOCAL directory (never the hub)."""
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no tokenizer directory {path}")
  return import_transformers().AutoTokenizer.from_pretrained(path, local_files_only=True)


# ---------------------------------------------------------------------------------------------
# Encoders


class TextEncoder(NamedTuple):
  """One encoder: its flax module, parameters and tokenizer."""

  module: Any
  params: Any
  tokenizer: Any


def load_text_encoder(path, *, dtype=jnp.float32):
  """(module, params) from our checkpoint (sd3_jax.clip_text / t5_encoder) or, converted in
  memory one tensor at a time, from a transformers directory. Reading our format never imports
  the converter (``sd3_jax.convert``)."""
  from sd3_jax.storage import pretrained

  path = os.fspath(path)
  if pretrained.is_checkpoint(path):
    module, params = pretrained.load_pretrained(path, dtype=dtype)
    if not isinstance(module, (te.CLIPTextEncoder, te.T5Encoder)):
      raise ValueError(f"{path} holds a {type(module).__name__}, not a text encoder")
    return module, params
  from sd3_jax.convert import encoders  # a transformers directory

  return encoders.load_text_encoder(path, dtype=dtype)


class SD3TextConditioner:
  """CLIP-L, CLIP-G and (optionally) T5 with their tokenizers: prompts -> (context, pooled).

  Args:
    clip_l, clip_g: TextEncoder with a CLIPTextEncoder (hidden = penultimate layer by config).
    t5: TextEncoder with a T5Encoder, or None (its tokens are zeros, as the reference).
    t5_length: T5 tokens (77 for training as the paper / dreambooth; diffusers infers with 256).
    clip_length: CLIP tokens per encoder (SD3: 77). Shorter sequences are for small models such
      as the embedded demo's; a model must be trained and sampled with the same lengths.
    context_dim: context width; must equal T5's d_model when T5 is given (default that, else
      4096). The CLIP channels (D_l + D_g) are zero-padded to it.
    clip_l_pad_id: None pads CLIP-L with its tokenizer's EOS; clip_g_pad_id: 0 ("!").
    project_clip_l: use CLIP-L's projected pooled output (diffusers' text_embeds) instead of the
      reference's un-projected one; identical when text_projection is the identity (SD3).
  """

  def __init__(
    self,
    clip_l: TextEncoder,
    clip_g: TextEncoder,
    t5: TextEncoder | None = None,
    *,
    t5_length: int = 77,
    clip_length: int = CLIP_LENGTH,
    context_dim: int | None = None,
    clip_l_pad_id: int | None = None,
    clip_g_pad_id: int = CLIP_G_PAD_ID,
    project_clip_l: bool = False,
  ):
    for name, enc in (("clip_l", clip_l), ("clip_g", clip_g)):
      if not isinstance(enc.module, te.CLIPTextEncoder):
        raise TypeError(f"{name} must hold a CLIPTextEncoder, got {type(enc.module).__name__}")
      if enc.module.config.max_position_embeddings < clip_length:
        raise ValueError(
          f"{name} has {enc.module.config.max_position_embeddings} positions, fewer than clip_length {clip_length}"
        )
    for name, enc, projected in (("clip_l", clip_l, project_clip_l), ("clip_g", clip_g, True)):
      c = enc.module.config
      if projected and c.projection_dim != c.hidden_size:
        raise ValueError(
          f"{name}'s projected pooled output is used, so its projection_dim "
          f"{c.projection_dim} must equal its hidden_size {c.hidden_size} (SD3's layout)"
        )
    if t5 is not None:
      if not isinstance(t5.module, te.T5Encoder):
        raise TypeError(f"t5 must hold a T5Encoder, got {type(t5.module).__name__}")
      d_t5 = t5.module.config.d_model
      if context_dim is not None and context_dim != d_t5:
        raise ValueError(f"context_dim {context_dim} != T5 d_model {d_t5}")
      context_dim = d_t5
    context_dim = 4096 if context_dim is None else context_dim
    if clip_length < 2:
      raise ValueError(f"clip_length must be >= 2 (BOS and EOS), got {clip_length}")
    self.layout = conditioning.TextLayout(
      clip_l_dim=clip_l.module.config.hidden_size, clip_g_dim=clip_g.module.config.hidden_size, clip_tokens=clip_length
    )
    if self.layout.pooled_dim > context_dim:
      raise ValueError(f"CLIP-L + CLIP-G width {self.layout.pooled_dim} exceeds context_dim {context_dim}")
    if t5_length < 1:
      raise ValueError(f"t5_length must be >= 1, got {t5_length}")
    self.clip_l, self.clip_g, self.t5 = clip_l, clip_g, t5
    self.t5_length, self.clip_length, self.context_dim = int(t5_length), int(clip_length), int(context_dim)
    self.clip_l_pad_id, self.clip_g_pad_id = clip_l_pad_id, clip_g_pad_id
    self.project_clip_l = project_clip_l
    self._encode_ids = jax.jit(self._encode_ids_impl)  # recompiles per batch shape only
    self._empty = None

  # -- loading

  @classmethod
  def from_pretrained(cls, path, *, dtype=jnp.float32, use_t5: bool = True, **kwargs) -> "SD3TextConditioner":
    """From the pipeline layout in the module docstring; T5 is used when text_encoder_3/
    exists and use_t5. kwargs go to the constructor (t5_length, context_dim, ...)."""
    path = os.fspath(path)
    need = [ENCODER_DIRS[0], ENCODER_DIRS[1], TOKENIZER_DIRS[0], TOKENIZER_DIRS[1]]
    missing = [d for d in need if not os.path.isdir(os.path.join(path, d))]
    if missing:
      raise FileNotFoundError(
        f"{path} lacks {missing}: expected the diffusers pipeline layout {list(ENCODER_DIRS)} "
        f"(converted with `sd3-convert --to jax`, or transformers directories) "
        f"and {list(TOKENIZER_DIRS)} (tokenizer files)"
      )

    def enc(i):
      module, params = load_text_encoder(os.path.join(path, ENCODER_DIRS[i]), dtype=dtype)
      return TextEncoder(module, params, load_tokenizer(os.path.join(path, TOKENIZER_DIRS[i])))

    t5 = None
    if use_t5 and os.path.isdir(os.path.join(path, ENCODER_DIRS[2])):
      t5 = enc(2)
    return cls(enc(0), enc(1), t5, **kwargs)

  # -- tokenizing and encoding

  def tokenize(self, prompts: Sequence[str]) -> dict[str, np.ndarray | None]:
    """{'clip_l': [B, clip_length], 'clip_g': [B, clip_length], 't5': [B, t5_length] or None}
    int32 ids."""
    return {
      "clip_l": tokenize_clip(self.clip_l.tokenizer, prompts, self.clip_l_pad_id, self.clip_length),
      "clip_g": tokenize_clip(self.clip_g.tokenizer, prompts, self.clip_g_pad_id, self.clip_length),
      "t5": None if self.t5 is None else tokenize_t5(self.t5.tokenizer, prompts, self.t5_length),
    }

  def _encode_ids_impl(self, p_l, p_g, p_t5, ids_l, ids_g, ids_t5):
    out_l = self.clip_l.module.apply({"params": p_l}, ids_l)
    out_g = self.clip_g.module.apply({"params": p_g}, ids_g)
    b = ids_l.shape[0]
    if self.t5 is None:
      t5_seq = jnp.zeros((b, self.t5_length, self.context_dim), jnp.float32)
    else:
      t5_seq = self.t5.module.apply({"params": p_t5}, ids_t5)
    pooled_l = out_l.projected if self.project_clip_l else out_l.pooled
    return conditioning.assemble_conditioning(
      out_l.hidden, out_g.hidden, t5_seq, pooled_l, out_g.projected, context_dim=self.context_dim
    )

  def encode_ids(self, clip_l_ids, clip_g_ids, t5_ids=None) -> tuple[jax.Array, jax.Array]:
    """Already tokenized ids -> (context [B, clip_length + t5_length, context_dim], pooled [B, D_l+D_g])."""
    if (t5_ids is None) != (self.t5 is None):
      raise ValueError("give t5_ids exactly when the conditioner has a T5 encoder")
    return self._encode_ids(
      self.clip_l.params,
      self.clip_g.params,
      None if self.t5 is None else self.t5.params,
      jnp.asarray(clip_l_ids, jnp.int32),
      jnp.asarray(clip_g_ids, jnp.int32),
      None if t5_ids is None else jnp.asarray(t5_ids, jnp.int32),
    )

  def encode(self, prompts: Sequence[str]) -> tuple[jax.Array, jax.Array]:
    """Prompts -> (context [B, clip_length + t5_length, context_dim], pooled [B, D_l + D_g]), float32."""
    if not len(prompts):
      raise ValueError("no prompts")
    ids = self.tokenize(prompts)
    return self.encode_ids(ids["clip_l"], ids["clip_g"], ids["t5"])

  def encode_empty(self) -> tuple[jax.Array, jax.Array]:
    """The CFG negative: the encoded empty prompt "" ([1, L, D], [1, P]), computed once."""
    if self._empty is None:
      self._empty = self.encode([""])
    return self._empty

  def __call__(self, prompts: Sequence[str]) -> tuple[jax.Array, jax.Array]:
    return self.encode(prompts)


def load_conditioner(
  path: str,
  *,
  dtype: str = "float32",
  t5_length: int = 77,
  use_t5: bool = True,
  clip_length: int = 77,
  project_clip_l: bool = False,
):
  """SD3 text conditioning (CLIP-L, CLIP-G and, when present, T5) from the diffusers pipeline
  layout in ``path`` (text_encoder*/ as our converted checkpoints or transformers directories,
  tokenizer*/ files); see ``SD3TextConditioner.from_pretrained``. ``t5_length``: 77 T5 tokens as
  the reference (diffusers samples with 256); with ``clip_length`` (77 as SD3; the embedded demo
  uses 12) it must give the context length the model expects. ``project_clip_l``: CLIP-L's
  projected pooled vector (diffusers) instead of the reference's un-projected one."""
  return SD3TextConditioner.from_pretrained(
    path,
    dtype=jnp.dtype(dtype),
    use_t5=use_t5,
    t5_length=t5_length,
    clip_length=clip_length,
    project_clip_l=project_clip_l,
  )
