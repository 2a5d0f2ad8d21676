"""Rematerialisation (activation checkpointing) policies of the backbones' blocks, and how a stack
of blocks runs (``run_blocks``: rematerialised, scanned or unrolled).

Each transformer block (and each UViT conv block) is wrapped in ``nn.remat`` with one policy
(``jax.checkpoint_policies``). The blocks tag three kinds of intermediates with
``jax.ad_checkpoint.checkpoint_name``:

  'qkv'       the q, k, v projections of every stream (after QK-norm; also cross-attention's),
              [B, L, H, Dh] each
  'attn_out'  every attention output (joint, self, cross, MMDiT-X image-only), [B, S, H, Dh]
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

from typing import Callable, Sequence

import jax
from flax import linen as nn
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


def wrap(block_cls, remat: str, prevent_cse: bool = True):
  """``block_cls`` under ``nn.remat`` with the named policy ('none': unchanged). prevent_cse
  can be off inside a scan (jax's advice)."""
  if remat == "none":
    policy(remat)
    return block_cls
  return nn.remat(block_cls, policy=policy(remat), prevent_cse=prevent_cse)


def run_blocks(
  block_cls,
  block_kwargs: Callable[[int], dict],
  runs: Sequence[tuple[int, int]],
  carry,
  cond,
  *,
  prefix: str,
  scan_layers: bool,
  remat: str,
  skip: Sequence[int] = (),
  initializing: bool = False,
  prevent_cse: bool | None = None,
):
  """Applies the blocks [start, stop) of every run to ``carry`` (``carry, _ = block(carry, cond)``),
  created in the calling module. Scanned: one ``nn.scan`` per run, parameters stacked on a
  leading 'layers' axis under ``scan_blocks_{start}_{stop}``. Unrolled: one module per block,
  ``{prefix}{i}``; blocks in ``skip`` are bypassed (skip-layer guidance; they are still created
  while ``initializing``). ``block_kwargs(start)`` gives the blocks' attributes (equal within a
  run)."""
  cls = wrap(block_cls, remat, prevent_cse=not scan_layers if prevent_cse is None else prevent_cse)
  for start, stop in runs:
    kw = block_kwargs(start)
    if scan_layers:
      if skip:
        raise ValueError("skip_layers needs an unscanned model (scan_layers=False)")
      scanned = nn.scan(
        cls,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast,),
        length=stop - start,
        metadata_params={nn.PARTITION_NAME: "layers"},
      )
      carry, _ = scanned(name=f"scan_blocks_{start}_{stop}", **kw)(carry, cond)
    else:
      for i in range(start, stop):
        if i in skip and not initializing:
          continue
        carry, _ = cls(name=f"{prefix}{i}", **kw)(carry, cond)
  return carry
