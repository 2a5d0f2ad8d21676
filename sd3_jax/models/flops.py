"""Exact model FLOPs of every backbone (the count behind MFU and scaling-law compute).

``forward_flops`` is the analytic matmul (and conv) count of one forward pass of any backbone,
``forward_flops_breakdown`` the same by component, ``train_step_flops`` the 3x-forward
train-step convention used for MFU, ``approx_train_flops`` the 6ND-style approximation beside
it, and ``count_matmul_flops`` a jaxpr walk that checks the formulas against what the models
actually trace (tests/test_flops.py, tests/test_backbones.py; tools/hlo_flops.py checks them
against the compiled program). ``mmdit_forward_flops*`` are the MM-DiT's names for the same.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import numpy as np
from jax.extend import core as jex_core

from sd3_jax.models.mmdit import MMDiTConfig
from sd3_jax.models.mmdit_config import uvit_widths
from sd3_jax.models.param_counts import TIMESTEP_FREQ_DIM

# Terms whose matmul input is a model input (latents, timestep features, pooled, text): the
# backward computes no input gradient for them (tools: train step = 3x forward minus these).
INPUT_TERMS = ("patch_embed", "conv_in", "t_embedder_in", "y_embedder_in", "context_embedder")

# --------------------------------------------------------------------------------------------
# Model FLOPs


def _attention_core(q_len: int, kv_len: int, h: int) -> int:  # QK^T and AV over all heads: 2 * 2*q*kv*h
  return 4 * q_len * kv_len * h


def conv3x3_taps(n: int) -> int:
  """Window taps of a 3x3 'SAME' conv that land inside an axis of n pixels (3n - 2): the zero
  padding is not multiplied (what tools/hlo_flops counts in the compiled program too)."""
  return 3 * n - 2


def _common(config: MMDiTConfig, n: int, lc: int) -> dict[str, int]:
  """Conditioning, text embedding, patch embedding and final layer of the patch-token backbones."""
  h, p = config.hidden_size, config.patch_size
  return {
    "patch_embed": 2 * n * (p * p * config.in_channels) * h,
    "t_embedder_in": 2 * TIMESTEP_FREQ_DIM * h,
    "y_embedder_in": 2 * config.pooled_dim * h,
    "embedders_out": 2 * (2 * h * h),  # t_embedder/mlp_2 and y_embedder/mlp_2
    "context_embedder": 2 * lc * config.context_dim * h,
    "final_layer": 2 * h * 2 * h + 2 * n * h * (p * p * config.out_channels),
  }


def _dit_blocks(config: MMDiTConfig, n: int, lc: int) -> dict[str, int]:
  """The DiT's d blocks over S = N + L tokens; the last block's proj and MLP run on the N image tokens."""
  h, r, d = config.hidden_size, config.mlp_ratio, config.depth
  s = n + lc
  return {
    "adaln": d * 2 * h * 6 * h,
    "qkv": d * 2 * s * h * 3 * h,
    "attention": d * _attention_core(s, s, h),
    "proj": 2 * h * h * ((d - 1) * s + n),
    "mlp": 4 * r * h * h * ((d - 1) * s + n),
  }


def _mmdit(config: MMDiTConfig, n: int, lc: int) -> dict[str, int]:
  h, r = config.hidden_size, config.mlp_ratio
  s = n + lc  # joint sequence
  dual = set(config.dual_attention_layers)
  n_text = len(config.text_streams)
  terms = dict.fromkeys(("adaln", "qkv", "attention", "proj", "mlp", "attn2"), 0)
  for i in range(config.depth):
    last = i == config.depth - 1
    x_mods = 9 if i in dual else 6
    ctx_mods = 2 if last else 6
    terms["adaln"] += 2 * h * (x_mods + n_text * ctx_mods) * h
    terms["qkv"] += 2 * s * h * 3 * h
    # All S query rows, also in the last block whose text outputs are discarded: that is
    # what the model computes (one einsum over the joint sequence).
    terms["attention"] += _attention_core(s, s, h)
    out_tokens = n if last else s  # the last text streams have no proj / MLP
    terms["proj"] += 2 * out_tokens * h * h
    terms["mlp"] += 2 * 2 * out_tokens * h * (r * h)
    if i in dual:  # image-only self-attention: qkv, attention, proj
      terms["attn2"] += 2 * n * h * 3 * h + _attention_core(n, n, h) + 2 * n * h * h
  return terms


def _crossdit(config: MMDiTConfig, n: int, lc: int) -> dict[str, int]:
  h, r, d = config.hidden_size, config.mlp_ratio, config.depth
  return {
    "adaln": d * 2 * h * 6 * h,
    "qkv": d * (2 * n * h * 3 * h + 2 * n * h * h + 2 * lc * h * 2 * h),  # self qkv, cross q, cross kv
    "attention": d * (_attention_core(n, n, h) + _attention_core(n, lc, h)),  # self, cross
    "proj": d * 2 * (2 * n * h * h),  # self and cross output projections
    "mlp": d * 4 * r * n * h * h,
  }


def _uvit(config: MMDiTConfig, latent_h: int, latent_w: int, n: int, lc: int) -> dict[str, int]:
  h, widths, n_res = config.hidden_size, uvit_widths(config), config.uvit_res_blocks

  def conv(hh, ww, c_in, c_out):
    return 2 * conv3x3_taps(hh) * conv3x3_taps(ww) * c_in * c_out

  def res(hh, ww, c_in, c_out):  # conv1, conv2 (+ the 1x1 skip); the adaLN is counted apart
    return conv(hh, ww, c_in, c_out) + conv(hh, ww, c_out, c_out) + (2 * hh * ww * c_in * c_out if c_in != c_out else 0)

  terms = {**_common(config, n, lc), **_dit_blocks(config, n, lc)}
  del terms["patch_embed"]
  c0 = widths[0]
  terms["conv_in"] = conv(latent_h, latent_w, config.in_channels, c0)
  terms["final_layer"] = 2 * h * 2 * c0 + conv(latent_h, latent_w, c0, config.out_channels)
  blocks = resample = 0
  for s, c in enumerate(widths):
    hh, ww = latent_h >> s, latent_w >> s
    wider = widths[s + 1] if s + 1 < len(widths) else h
    blocks += n_res * res(hh, ww, c, c) + (n_res + 1) * res(hh, ww, 2 * c, c)
    terms["adaln"] += (2 * n_res + 1) * 2 * h * 3 * c
    resample += 2 * 2 * (hh // 2) * (ww // 2) * (4 * c) * wider  # 2x2 patch conv down and transposed up
  terms["conv_blocks"], terms["resample"] = blocks, resample
  return terms


def forward_flops_breakdown(config: MMDiTConfig, latent_h: int, latent_w: int, context_len: int) -> dict[str, int]:
  """Matmul FLOPs of one forward pass of the backbone of ``config`` for ONE example, by component
  ('attention' is every attention core, QK^T and AV: the part a fused kernel hides)."""
  p = config.patch_size
  if latent_h % p or latent_w % p:
    raise ValueError(f"latent {latent_h}x{latent_w} is not divisible by the patch size {p}")
  n = (latent_h // p) * (latent_w // p)  # image tokens
  if config.backbone == "uvit":
    return _uvit(config, latent_h, latent_w, n, context_len)
  body = {"mmdit": _mmdit, "mmdit3": _mmdit, "dit": _dit_blocks, "crossdit": _crossdit}[config.backbone]
  return {**_common(config, n, context_len), **body(config, n, context_len)}


def forward_flops(config: MMDiTConfig, latent_h: int, latent_w: int, context_len: int) -> int:
  """Exact matmul FLOPs of one forward pass for one example, any backbone (a matmul [m,k]x[k,n]
  = 2mkn; a 3x3 conv over an H x W map = 2(3H-2)(3W-2) Cin Cout, the taps inside the map).

  With h hidden, r mlp_ratio, p patch, N = (H/p)(W/p) image tokens, L text tokens, S = N + L,
  F = 256 timestep features, d blocks:

    embed     = 2N(p^2 C_in)h + 2Fh + 2(pooled_dim)h + 4h^2 + 2L(context_dim)h
    final     = 4h^2 + 2Nh(p^2 C_out)
    mmdit     block 0..d-2: 12(1+T)h^2 adaLN (T text streams: 1; 'mmdit3': 2) + 6Sh^2 qkv
              + 4S^2 h attention + 2Sh^2 proj + 4rSh^2 MLP; last block: adaLN 12h^2 + 4Th^2,
              qkv and attention over S, proj and MLP over N; dual (MMDiT-X) blocks add
              6h^2 + 6Nh^2 + 4N^2 h + 2Nh^2
    dit       every block: 12h^2 + 6Sh^2 + 4S^2 h, proj + MLP (2 + 4r)h^2 over S tokens (last: N)
    crossdit  every block: 12h^2 + 6Nh^2 + 4N^2 h (self) + 2Nh^2 + 4Lh^2 + 4NLh (cross: q, kv,
              attention) + 4Nh^2 (both projections) + 4rNh^2
    uvit      the DiT's blocks at N tokens and its embed without the patch conv; plus, per conv
              stage s at H_s x W_s with c_s channels: R res blocks c_s -> c_s and R+1 with
              2c_s -> c_s (two 3x3 convs; the up blocks' 1x1 skip 2 H_s W_s 2c_s c_s; adaLN
              6h c_s each), a 2x2 patch conv down and a transposed one up
              (2 (H_s W_s / 4)(4 c_s) c_{s+1} each); conv_in and the final 3x3 conv
              (+ adaLN 4h c_0)

  Elementwise work (norms, softmax, modulation, activations) is not counted. This equals the
  dot_general / conv FLOPs of the traced forward exactly (tests/test_flops.py,
  tests/test_backbones.py).
  """
  return sum(forward_flops_breakdown(config, latent_h, latent_w, context_len).values())


def mmdit_forward_flops_breakdown(
  config: MMDiTConfig, latent_h: int, latent_w: int, context_len: int
) -> dict[str, int]:
  """``forward_flops_breakdown`` (the name from before the other backbones)."""
  return forward_flops_breakdown(config, latent_h, latent_w, context_len)


def mmdit_forward_flops(config: MMDiTConfig, latent_h: int, latent_w: int, context_len: int) -> int:
  """``forward_flops`` (the name from before the other backbones)."""
  return forward_flops(config, latent_h, latent_w, context_len)


def train_step_flops(config: MMDiTConfig, latent_h: int, latent_w: int, context_len: int, batch_size: int) -> int:
  """Model FLOPs of one train step: 3 x forward x batch (forward + backward = 2x forward).

  The usual MFU convention (as in diffusers' and maxtext's benchmarks): matmuls and attention only; recomputation by
  remat is not counted; elementwise ops and the optimizer update are not counted. (The exact
  backward is slightly less than 2x forward, because no gradient flows into the inputs of the
  patch / text / timestep embedders; the convention ignores that.) For d=24 at 256^2 (32x32
  latent, 154 tokens) this is 1.74e12 per image; 5.41e12 at 512^2; d=38: 6.80e12 / 20.6e12.
  """
  return 3 * batch_size * forward_flops(config, latent_h, latent_w, context_len)


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
  """2 x multiply-adds of a convolution over the window taps that land inside the (dilated)
  input: zero padding is not multiplied (as tools/hlo_flops counts the compiled program)."""
  lhs, rhs, out = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape, eqn.outvars[0].aval.shape
  dn, prm = eqn.params["dimension_numbers"], eqn.params
  macs = out[dn.out_spec[0]] * rhs[dn.rhs_spec[0]] * rhs[dn.rhs_spec[1]]  # batch x out x (in / groups)
  for j in range(len(dn.lhs_spec) - 2):
    size_in, size_out, k_size = lhs[dn.lhs_spec[2 + j]], out[dn.out_spec[2 + j]], rhs[dn.rhs_spec[2 + j]]
    ld, rd, stride = prm["lhs_dilation"][j], prm["rhs_dilation"][j], prm["window_strides"][j]
    o = np.arange(size_out) * stride - prm["padding"][j][0]
    macs *= sum(
      int(np.count_nonzero((o + k * rd >= 0) & (o + k * rd <= (size_in - 1) * ld) & ((o + k * rd) % ld == 0)))
      for k in range(k_size)
    )
  return 2 * macs


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
