"""The MM-DiT's text inputs: where each encoder lives in ``context`` / ``pooled`` (TextLayout),
their reference assembly, and the per-encoder conditioning dropout of training (the paper,
section 5.3.3), which also makes classifier-free guidance possible for every formulation.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array
ArrayLike = Any


@dataclasses.dataclass(frozen=True)
class TextLayout:
  """Where each text encoder lives in ``context`` [B, L, D] and ``pooled`` [B, P] (docs/sampling.md).

  context[:, :clip_tokens, :clip_l_dim]                       CLIP-L tokens
  context[:, :clip_tokens, clip_l_dim:clip_l_dim+clip_g_dim]  CLIP-G tokens (rest: zero padding)
  context[:, clip_tokens:, :]                                 T5 tokens
  pooled[:, :clip_l_dim] / pooled[:, clip_l_dim:]             CLIP-L / CLIP-G pooled
  """

  clip_l_dim: int = 768
  clip_g_dim: int = 1280
  clip_tokens: int = 77

  @property
  def pooled_dim(self) -> int:
    return self.clip_l_dim + self.clip_g_dim


def assemble_conditioning(
  clip_l_seq: ArrayLike,
  clip_g_seq: ArrayLike,
  t5_seq: ArrayLike,
  clip_l_pooled: ArrayLike,
  clip_g_pooled: ArrayLike,
  context_dim: int = 4096,
) -> tuple[Array, Array]:
  """Reference assembly of the MM-DiT text inputs (sd3.5 reference code, ``sd3_infer.py``).

  Args: clip_l_seq [..., Tc, Dl], clip_g_seq [..., Tc, Dg], t5_seq [..., Tt, context_dim],
    clip_l_pooled [..., Dl], clip_g_pooled [..., Dg] (leading batch axes shared).
  Returns: context [..., Tc + Tt, context_dim] = [CLIP-L | CLIP-G | zeros] tokens then T5 tokens
    (CLIP first), and pooled [..., Dl + Dg] = CLIP-L pooled | CLIP-G pooled. Dtype is the
    promoted input dtype.
  """
  clip_l_seq, clip_g_seq, t5_seq = map(jnp.asarray, (clip_l_seq, clip_g_seq, t5_seq))
  clip_l_pooled, clip_g_pooled = jnp.asarray(clip_l_pooled), jnp.asarray(clip_g_pooled)
  if clip_l_seq.shape[:-1] != clip_g_seq.shape[:-1]:
    raise ValueError(
      f"CLIP-L and CLIP-G sequences must share batch and token axes, got {clip_l_seq.shape} and {clip_g_seq.shape}"
    )
  clip_width = clip_l_seq.shape[-1] + clip_g_seq.shape[-1]
  if clip_width > context_dim:
    raise ValueError(f"CLIP-L + CLIP-G width {clip_width} exceeds context_dim {context_dim}")
  if t5_seq.shape[-1] != context_dim or t5_seq.shape[:-2] != clip_l_seq.shape[:-2]:
    raise ValueError(
      f"t5_seq must be [..., T, {context_dim}] with batch axes {clip_l_seq.shape[:-2]}, got {t5_seq.shape}"
    )
  if (
    clip_l_pooled.shape[-1] != clip_l_seq.shape[-1]
    or clip_g_pooled.shape[-1] != clip_g_seq.shape[-1]
    or clip_l_pooled.shape[:-1] != clip_l_seq.shape[:-2]
    or clip_g_pooled.shape[:-1] != clip_g_seq.shape[:-2]
  ):
    raise ValueError(
      f"pooled shapes {clip_l_pooled.shape}, {clip_g_pooled.shape} do not match the "
      f"sequences {clip_l_seq.shape}, {clip_g_seq.shape}"
    )
  dtype = jnp.result_type(clip_l_seq, clip_g_seq, t5_seq)
  clip = jnp.concatenate([clip_l_seq, clip_g_seq], axis=-1).astype(dtype)  # [..., Tc, Dl+Dg]
  pad = [(0, 0)] * (clip.ndim - 1) + [(0, context_dim - clip_width)]
  context = jnp.concatenate([jnp.pad(clip, pad), t5_seq.astype(dtype)], axis=-2)
  pooled = jnp.concatenate([clip_l_pooled, clip_g_pooled], axis=-1)
  return context, pooled


def drop_text_conditioning(
  rng: Array, context: Array, pooled: Array, p: float, layout: TextLayout
) -> tuple[Array, Array]:
  """Zero each text encoder's outputs independently per example with probability p ([P] s5.3.3).

  Three independent Bernoulli(p) draws per example (CLIP-L, CLIP-G, T5); the paper uses
  p = 0.464 so all three are dropped (an unconditional step) in ~10% of examples. A dropped
  encoder's tokens/channels become exact zeros (not an encoded empty prompt, as the paper's training);
  everything else is returned unchanged. context [B, L, D] with L >= clip_tokens and
  D >= clip_l_dim + clip_g_dim; pooled [B, clip_l_dim + clip_g_dim].
  """
  if isinstance(p, (int, float)) and not 0.0 <= p <= 1.0:
    raise ValueError(f"dropout probability must be in [0, 1], got {p}")
  b, seq_len, width = context.shape
  lo, hi = layout.clip_l_dim, layout.clip_l_dim + layout.clip_g_dim
  if seq_len < layout.clip_tokens or width < hi:
    raise ValueError(f"context {context.shape} too small for {layout}")
  if pooled.shape != (b, layout.pooled_dim):
    raise ValueError(f"pooled must be [{b}, {layout.pooled_dim}] for {layout}, got {pooled.shape}")
  drop = jax.random.bernoulli(rng, p, (b, 3))  # [B, (clip_l, clip_g, t5)]
  drop_l, drop_g, drop_t5 = (drop[:, i, None, None] for i in range(3))  # each [B, 1, 1]

  tok = jnp.arange(seq_len)[None, :, None]  # [1, L, 1]
  ch = jnp.arange(width)[None, None, :]  # [1, 1, D]
  is_clip_tok = tok < layout.clip_tokens
  ctx_drop = (
    (is_clip_tok & (ch < lo) & drop_l) | (is_clip_tok & (ch >= lo) & (ch < hi) & drop_g) | (~is_clip_tok & drop_t5)
  )  # [B, L, D]
  pch = jnp.arange(layout.pooled_dim)[None, :]  # [1, P]
  pool_drop = ((pch < lo) & drop_l[:, :, 0]) | ((pch >= lo) & drop_g[:, :, 0])  # [B, P]
  # where(), not a multiply: exact zeros even for inf/nan inputs, and no -0.0.
  return (
    jnp.where(ctx_drop, jnp.zeros((), context.dtype), context),
    jnp.where(pool_drop, jnp.zeros((), pooled.dtype), pooled),
  )
