"""Rematerialisation (activation checkpointing) policies of the MM-DiT's joint blocks.

Each joint block is wrapped in ``nn.remat`` with one policy (``jax.checkpoint_policies``).
The block tags three kinds of intermediates with ``jax.ad_checkpoint.checkpoint_name``:

  'qkv'       the q, k, v projections of both streams (after QK-norm), [B, L, H, Dh] each
  'attn_out'  the joint attention output (and the MMDiT-X image-only attention's), [B, S, H, Dh]
  'mlp_in'    the modulated LayerNorm output that enters each stream's MLP, [B, L, h]

Policies, from most memory / least recomputation to least memory / most recomputation:

  none                 no remat: every residual is kept (fastest when it fits)
  dots                 keep every matmul output (jax.checkpoint_policies.checkpoint_dots)
  dots_no_batch        keep matmul outputs without batch dimensions (i.e. only weight-like ones)
  save_qkv_attn_mlp    keep the three named tensors; recompute norms, softmax logits, MLP hidden
  save_attn_mlp        keep attention output and MLP input
  save_qkv_attn        keep q/k/v and attention output: the backward never reruns attention
  save_attn            keep the attention output only
  offload_qkv_attn_mlp the three named tensors go to host memory (pinned_host) instead of HBM
  offload_attn         the attention output goes to host memory
  full                 keep nothing: the whole block is recomputed in the backward pass

The offload policies need a backend with host memory spaces (TPU, GPU). ``tools.aot_compile
--pick_remat`` measures memory and recomputation per policy for a TPU topology.
"""

from __future__ import annotations

import jax
from jax.ad_checkpoint import checkpoint_name

QKV, ATTN_OUT, MLP_IN = "qkv", "attn_out", "mlp_in"
_cp = jax.checkpoint_policies


def _offload(*names):
  return _cp.save_and_offload_only_these_names(
    names_which_can_be_saved=[],
    names_which_can_be_offloaded=list(names),
    offload_src="device",
    offload_dst="pinned_host",
  )


POLICIES = {
  "none": None,
  "dots": _cp.checkpoint_dots,
  "dots_no_batch": _cp.checkpoint_dots_with_no_batch_dims,
  "save_qkv_attn_mlp": _cp.save_only_these_names(QKV, ATTN_OUT, MLP_IN),
  "save_attn_mlp": _cp.save_only_these_names(ATTN_OUT, MLP_IN),
  "save_qkv_attn": _cp.save_only_these_names(QKV, ATTN_OUT),
  "save_attn": _cp.save_only_these_names(ATTN_OUT),
  "offload_qkv_attn_mlp": _offload(QKV, ATTN_OUT, MLP_IN),
  "offload_attn": _offload(ATTN_OUT),
  "full": _cp.nothing_saveable,
}
OFFLOAD_POLICIES = ("offload_qkv_attn_mlp", "offload_attn")


def policy(name: str):
  """The jax.checkpoint policy called ``name`` (None for 'none')."""
  if name not in POLICIES:
    raise ValueError(f"remat must be one of {list(POLICIES)}, got {name!r}")
  return POLICIES[name]


def tag(x, name: str):
  """Name an intermediate for the policies above (identity otherwise)."""
  return checkpoint_name(x, name)
