"""Exact model FLOPs of the MM-DiT (the count behind MFU and scaling-law compute).

``mmdit_forward_flops`` is the analytic matmul count of one forward pass, ``train_step_flops``
the 3x-forward train-step convention used for MFU, ``approx_train_flops`` the 6ND-style
approximation beside it, and ``count_matmul_flops`` a jaxpr walk that checks the formula against
what the model actually traces.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
from jax.extend import core as jex_core

from sd3_jax.models.mmdit import MMDiTConfig

TIMESTEP_FREQ_DIM = 256  # width of the sinusoidal timestep features (layers.timestep_embedding)

# --------------------------------------------------------------------------------------------
# Model FLOPs


def mmdit_forward_flops_breakdown(
  config: MMDiTConfig, latent_h: int, latent_w: int, context_len: int
) -> dict[str, int]:
  """Matmul FLOPs of one forward pass for ONE example, by component (see mmdit_forward_flops)."""
  p = config.patch_size
  if latent_h % p or latent_w % p:
    raise ValueError(f"latent {latent_h}x{latent_w} is not divisible by the patch size {p}")
  h, r = config.hidden_size, config.mlp_ratio
  n = (latent_h // p) * (latent_w // p)  # image tokens
  lc = context_len
  s = n + lc  # joint sequence
  dual = set(config.dual_attention_layers)

  def attention(q_len, kv_len):  # QK^T and AV over all heads: 2 * 2*q*kv*h
    return 4 * q_len * kv_len * h

  terms = dict.fromkeys(
    (
      "patch_embed",
      "t_embedder_in",
      "y_embedder_in",
      "embedders_out",
      "context_embedder",
      "adaln",
      "qkv",
      "attention",
      "proj",
      "mlp",
      "attn2",
      "final_layer",
    ),
    0,
  )
  terms["patch_embed"] = 2 * n * (p * p * config.in_channels) * h
  terms["t_embedder_in"] = 2 * TIMESTEP_FREQ_DIM * h
  terms["y_embedder_in"] = 2 * config.pooled_dim * h
  terms["embedders_out"] = 2 * (2 * h * h)  # t_embedder/mlp_2 and y_embedder/mlp_2
  terms["context_embedder"] = 2 * lc * config.context_dim * h
  for i in range(config.depth):
    last = i == config.depth - 1
    x_mods = 9 if i in dual else 6
    ctx_mods = 2 if last else 6
    terms["adaln"] += 2 * h * (x_mods + ctx_mods) * h
    terms["qkv"] += 2 * s * h * 3 * h
    # All S query rows, also in the last block whose context outputs are discarded: that is
    # what the model computes (one einsum over the joint sequence).
    terms["attention"] += attention(s, s)
    out_tokens = n if last else s  # the last context stream has no proj / MLP
    terms["proj"] += 2 * out_tokens * h * h
    terms["mlp"] += 2 * 2 * out_tokens * h * (r * h)
    if i in dual:  # image-only self-attention: qkv, attention, proj
      terms["attn2"] += 2 * n * h * 3 * h + attention(n, n) + 2 * n * h * h
  terms["final_layer"] = 2 * h * 2 * h + 2 * n * h * (p * p * config.out_channels)
  return terms


def mmdit_forward_flops(config: MMDiTConfig, latent_h: int, latent_w: int, context_len: int) -> int:
  """Exact matmul FLOPs of one MM-DiT forward pass for one example (a matmul [m,k]x[k,n] = 2mkn).

  With h hidden, r mlp_ratio, p patch, N = (H/p)(W/p) image tokens, L context tokens,
  S = N + L, F = 256 timestep features, d blocks of which D are dual-attention (MMDiT-X):

    embed   = 2N(p^2 C_in)h + 2Fh + 2(pooled_dim)h + 4h^2 + 2L(context_dim)h
    block   = 24h^2 (adaLN, 6 mods per stream) + 6Sh^2 (qkv) + 4S^2 h (QK^T, AV)
              + 2Sh^2 (proj) + 4rSh^2 (MLP)                    for blocks 0..d-2
    last    = 16h^2 (adaLN 6 + 2 mods) + 6Sh^2 + 4S^2 h + 2Nh^2 + 4rNh^2
              (pre-only context stream: qkv but no proj/MLP; all S query rows are computed)
    dual    = 6h^2 (3 more mods) + 6Nh^2 + 4N^2 h + 2Nh^2      per dual block (attn2)
    final   = 4h^2 + 2Nh(p^2 C_out)

  total = embed + (d-1) block + last + D dual + final. Elementwise work (norms, softmax,
  modulation, activations) is not counted. This equals the dot_general FLOPs of the traced
  forward exactly (tests/test_metrics.py).
  """
  return sum(mmdit_forward_flops_breakdown(config, latent_h, latent_w, context_len).values())


def train_step_flops(config: MMDiTConfig, latent_h: int, latent_w: int, context_len: int, batch_size: int) -> int:
  """Model FLOPs of one train step: 3 x forward x batch (forward + backward = 2x forward).

  The usual MFU convention (as in diffusers' and maxtext's benchmarks): matmuls and attention only; recomputation by
  remat is not counted; elementwise ops and the optimizer update are not counted. (The exact
  backward is slightly less than 2x forward, because no gradient flows into the inputs of the
  patch / text / timestep embedders; the convention ignores that.) For d=24 at 256^2 (32x32
  latent, 154 tokens) this is 1.74e12 per image; 5.41e12 at 512^2; d=38: 6.80e12 / 20.6e12.
  """
  return 3 * batch_size * mmdit_forward_flops(config, latent_h, latent_w, context_len)


def approx_train_flops(num_params: int, num_tokens: int) -> int:
  """The 6ND rule of thumb for a whole run (Kaplan et al. 2020): 6 x parameters x tokens seen.

  For the MM-DiT a "token" is one position of the joint sequence (image patches + text
  tokens). The rule ignores attention and counts every parameter for every token, although each
  token only passes through its own stream's weights, so it can be far from ``train_step_flops``
  x steps at small widths and short sequences; it is reported beside the exact count, never
  instead of it.
  """
  if num_params < 0 or num_tokens < 0:
    raise ValueError(f"parameters ({num_params}) and tokens ({num_tokens}) must be >= 0")
  return 6 * int(num_params) * int(num_tokens)


def _dot_general_flops(eqn) -> int:
  (lc, _), (lb, _) = eqn.params["dimension_numbers"]
  lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
  contract = math.prod(lhs[i] for i in lc)
  batch = math.prod(lhs[i] for i in lb)
  free_l = math.prod(lhs) // (contract * batch)
  free_r = math.prod(rhs) // (contract * batch)
  return 2 * batch * free_l * free_r * contract


def _conv_flops(eqn) -> int:
  rhs = eqn.invars[1].aval.shape
  out_features = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
  # each output element: (in_features / groups) * kernel window multiply-adds
  return 2 * math.prod(eqn.outvars[0].aval.shape) * (math.prod(rhs) // out_features)


def jaxpr_matmul_flops(jaxpr) -> int:
  """dot_general + conv FLOPs of a (closed) jaxpr, recursing into jit/remat/custom_jvp calls
  and multiplying scan bodies by their length. Data-dependent loops raise."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      total += _dot_general_flops(eqn)
    elif name == "conv_general_dilated":
      total += _conv_flops(eqn)
    elif name == "while":
      raise ValueError("cannot count FLOPs through a while loop (unknown trip count)")
    elif name == "cond":
      branch = {jaxpr_matmul_flops(b) for b in eqn.params["branches"]}
      if len(branch) > 1:
        raise ValueError(f"cond branches have different matmul FLOPs {sorted(branch)}")
      total += branch.pop()
    else:
      mult = eqn.params["length"] if name == "scan" else 1
      total += mult * sum(jaxpr_matmul_flops(j) for j in jex_core.jaxprs_in_params(eqn.params))
  return total


def count_matmul_flops(fn: Callable, *args, **kwargs) -> int:
  """Matmul FLOPs of ``fn(*args, **kwargs)`` as traced (no compilation, args may be abstract)."""
  return jaxpr_matmul_flops(jax.make_jaxpr(fn)(*args, **kwargs))
