"""Attention of the diffusion backbones: the q/k/v projections with their logical axes
(``AttentionProjections``; ``CrossAttentionProjections`` for queries and keys from different
sequences), the kernels and the choice between them. Every kernel takes queries and keys of
different lengths (cross-attention) as well as one joint sequence.

- 'xla': einsum + float32 softmax (``layers.dot_product_attention``); any backend, and it
  materialises the [B, H, S, S] float32 logits (S = image + text tokens).
- 'splash': the Pallas TPU splash (flash) attention kernel from
  ``jax.experimental.pallas.ops.tpu.splash_attention`` (the kernel maxtext uses), run under
  ``shard_map`` over the batch and head axes of the current mesh. The joint sequence is padded
  to a multiple of the block size and the padded keys are masked with segment ids.
- 'splash_interpret': the same kernel in Pallas interpret mode (any backend, slow): the CPU check
  that 'splash' computes what 'xla' computes.
- 'cudnn': ``jax.nn.dot_product_attention(implementation='cudnn')`` (fused flash attention on
  NVIDIA GPUs; bfloat16/float16 only).
- 'auto': resolved once per run by ``resolve_impl(requested, platform, dtype)``: splash on TPU,
  cudnn on GPU in bf16/fp16 (float32 on GPU falls back to xla with a log line), xla elsewhere.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from sd3_jax.models import layers as L
from sd3_jax.models import remat as R

log = logging.getLogger(__name__)

IMPLEMENTATIONS = ("auto", "xla", "splash", "splash_interpret", "cudnn")
_BLOCK_CHOICES = (512, 256, 128)  # TPU-friendly tile sizes (multiples of the 128-lane width)


def resolve_impl(requested: str, platform: str, dtype) -> str:
  """The concrete implementation for ``requested`` on ``platform`` ('tpu', 'gpu'/'cuda',
  'cpu', ...) with compute ``dtype``. Errors name the fix."""
  if requested not in IMPLEMENTATIONS:
    raise ValueError(f"attention_impl must be one of {IMPLEMENTATIONS}, got {requested!r}")
  platform = "gpu" if platform in ("cuda", "rocm") else platform
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  if requested == "auto":
    if platform == "tpu":
      return "splash"
    if platform == "gpu" and half:
      return "cudnn"
    if platform == "gpu":
      log.info(
        "attention_impl='auto': cuDNN flash attention needs bfloat16/float16 compute, "
        "the compute dtype is %s; using the XLA attention",
        jnp.dtype(dtype).name,
      )
    return "xla"
  if requested == "splash" and platform != "tpu":
    raise ValueError(
      f"attention_impl='splash' is a TPU kernel, but the devices are {platform!r}; "
      "use 'auto' (or 'xla'), or 'splash_interpret' to run the kernel slowly on CPU"
    )
  if requested == "cudnn" and platform != "gpu":
    raise ValueError(f"attention_impl='cudnn' needs NVIDIA GPUs, but the devices are {platform!r}; use 'auto' or 'xla'")
  if requested == "cudnn" and not half:
    raise ValueError(
      f"attention_impl='cudnn' needs bfloat16 or float16 compute, got "
      f"{jnp.dtype(dtype).name}; set --config.dtype=bfloat16 or use attention_impl='xla'"
    )
  return requested


def default_block(seq_len: int) -> int:
  """Splash tile for a joint sequence of ``seq_len`` tokens: the largest of 512/256/128 whose
  padded length is within 5% of the least padding. 256^2 (256 image + 154 text = 410 tokens):
  512 (one block, padded to 512); 1024^2 (4096 + 154 = 4250): 256 (padded to 4352; 512 would
  pad to 4608, 17% more attention work)."""
  padded = {b: -(-seq_len // b) * b for b in _BLOCK_CHOICES}
  least = min(padded.values())
  return next(b for b in _BLOCK_CHOICES if padded[b] <= 1.05 * least)


@dataclasses.dataclass(frozen=True)
class SplashBlocks:
  """Splash tile sizes; 0 = ``default_block`` of the sequence length. ``block_q``/``block_kv``
  apply to the forward and both backward kernels."""

  block_q: int = 0
  block_kv: int = 0

  def resolve(self, seq_len: int, kv_len: int | None = None) -> tuple[int, int]:
    """(block_q, block_kv) for ``seq_len`` queries and ``kv_len`` keys (default: the same)."""
    bq = self.block_q or default_block(seq_len)
    bkv = self.block_kv or default_block(seq_len if kv_len is None else kv_len)
    for name, b in (("block_q", bq), ("block_kv", bkv)):
      if b <= 0 or b % 128:
        raise ValueError(f"splash {name} must be a positive multiple of 128, got {b}")
    return bq, bkv


def _splash_local(q, k, v, *, blocks: tuple[int, int], interpret: bool, scale: float | None = None):
  """Splash on one shard: q [b, Lq, h, D], k/v [b, Lk, h, D] -> [b, Lq, h, D]. Pads the queries
  and the keys to their blocks (one joint sequence: to both blocks) and masks the padded keys
  (segment id 0 against 1 for real keys; every query, padded or not, has segment id 1, so no
  row is fully masked). ``scale``: logit scale (None: 1/sqrt(D))."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

  _, length, heads, dh = q.shape
  kv_length = k.shape[1]
  bq, bkv = blocks
  if kv_length == length:  # self-attention: q and k/v padded alike
    unit = math.lcm(bq, bkv)
    padded = kv_padded = -(-length // unit) * unit
  else:
    padded, kv_padded = -(-length // bq) * bq, -(-kv_length // bkv) * bkv
  mask = sm.MultiHeadMask([sm.FullMask((padded, kv_padded)) for _ in range(heads)])
  sizes = sk.BlockSizes(
    block_q=bq,
    block_kv=bkv,
    block_kv_compute=bkv,
    block_q_dkv=bq,
    block_kv_dkv=bkv,
    block_kv_dkv_compute=bkv,
    block_q_dq=bq,
    block_kv_dq=bkv,
  )
  kernel = sk.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=sizes, interpret=interpret)
  segments = sk.SegmentIds(
    q=jnp.ones((padded,), jnp.int32), kv=jnp.asarray(np.arange(kv_padded) < kv_length, jnp.int32)
  )

  def prep(x, to):  # [b, L, h, D] -> [b, h, to, D]
    return jnp.pad(x.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, to - x.shape[1]), (0, 0)))

  scale = 1.0 / math.sqrt(dh) if scale is None else scale  # the kernel does not scale q
  qs = (q.astype(jnp.float32) * scale).astype(q.dtype)
  out = jax.vmap(lambda a, b, c: kernel(a, b, c, segment_ids=segments))(
    prep(qs, padded), prep(k, kv_padded), prep(v, kv_padded)
  )
  return out[:, :, :length].transpose(0, 2, 1, 3).astype(q.dtype)


def splash_attention(
  q, k, v, *, blocks: SplashBlocks = SplashBlocks(), interpret: bool = False, scale: float | None = None
):
  """Unmasked softmax attention through the splash kernel, q [B, Lq, H, Dh], k/v [B, Lk, H, Dh]
  -> [B, Lq, H, Dh].

  Inside ``sharding.logical_axes(mesh)`` (the train step) the kernel runs under shard_map with
  the batch split like the activations ('act_batch') and the heads like 'act_heads'; outside
  a mesh it runs on the whole arrays.
  """
  fn = functools.partial(_splash_local, blocks=blocks.resolve(q.shape[1], k.shape[1]), interpret=interpret, scale=scale)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return fn(q, k, v)
  spec = P(*nn.logical_to_mesh_axes((L.ACT_BATCH, L.ACT_LENGTH, L.ACT_HEADS, None)))
  # check_vma=False: the kernel's pallas_call carries no varying-axis annotations.
  return jax.shard_map(fn, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec, check_vma=False)(q, k, v)


def attention(q, k, v, implementation: str = "xla", blocks: SplashBlocks = SplashBlocks(), scale: float | None = None):
  """Softmax attention q [B, Lq, H, Dh], k/v [B, Lk, H, Dh] -> [B, Lq, H, Dh] with a resolved implementation
  ('auto' is resolved here from the default backend; the trainer resolves it from the mesh's
  devices with ``resolve_impl`` instead, which is what an ahead-of-time TPU compile needs).
  ``scale`` multiplies the logits (None: 1/sqrt(Dh); muP passes its own, models/mup.py)."""
  if implementation == "auto":
    implementation = resolve_impl("auto", jax.default_backend(), q.dtype)
  if implementation == "xla":
    return L.dot_product_attention(q, k, v, "xla", scale=scale)
  if implementation in ("splash", "splash_interpret"):
    return splash_attention(q, k, v, blocks=blocks, interpret=implementation == "splash_interpret", scale=scale)
  if implementation == "cudnn":
    if jnp.dtype(q.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
      raise ValueError(
        f"attention_impl='cudnn' needs bfloat16 or float16 inputs, got {q.dtype}; "
        "set the compute dtype to bfloat16 or use attention_impl='xla'"
      )
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")
  raise ValueError(f"attention_impl must be one of {IMPLEMENTATIONS}, got {implementation!r}")


# --------------------------------------------------------------------------------------------
# Projections


class AttentionProjections(nn.Module):
  """qkv projection (+ optional QK RMSNorm) and output projection of one stream."""

  hidden: int
  heads: int
  qk_norm: bool
  has_proj: bool = True
  dtype: object = jnp.float32

  def setup(self):
    hd = self.hidden // self.heads
    self.qkv = L.Dense((3, self.heads, hd), ("embed", "qkv", "heads", "kv"), dtype=self.dtype)
    if self.qk_norm:
      self.ln_q = L.RMSNorm()
      self.ln_k = L.RMSNorm()
    if self.has_proj:
      self.proj = L.Dense(self.hidden, ("heads", "kv", "embed"), n_in=2, dtype=self.dtype)

  def qkv_heads(self, x_BxLxD):
    qkv = self.qkv(x_BxLxD)  # [B, L, 3, H, Dh]
    qkv = nn.with_logical_constraint(qkv, (L.ACT_BATCH, L.ACT_LENGTH, None, L.ACT_HEADS, None))
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if self.qk_norm:
      q, k = self.ln_q(q), self.ln_k(k)
    return R.tag(q, R.QKV), R.tag(k, R.QKV), R.tag(v, R.QKV)

  def out(self, a_BxLxHxDh):
    return self.proj(a_BxLxHxDh)


class CrossAttentionProjections(nn.Module):
  """Queries from one sequence (``q``), keys and values from another (``kv``), optional QK
  RMSNorm, output projection ``proj`` (zero-initialised when ``zero_proj``: the branch starts
  switched off, as PixArt-alpha's cross-attention)."""

  hidden: int
  heads: int
  qk_norm: bool
  zero_proj: bool = True
  dtype: object = jnp.float32

  def setup(self):
    hd = self.hidden // self.heads
    self.q = L.Dense((self.heads, hd), ("embed", "heads", "kv"), dtype=self.dtype)
    self.kv = L.Dense((2, self.heads, hd), ("embed", "qkv", "heads", "kv"), dtype=self.dtype)
    if self.qk_norm:
      self.ln_q = L.RMSNorm()
      self.ln_k = L.RMSNorm()
    init = nn.initializers.zeros_init() if self.zero_proj else None
    self.proj = L.Dense(self.hidden, ("heads", "kv", "embed"), n_in=2, dtype=self.dtype, kernel_init=init)

  def heads_of(self, x_BxNxD, ctx_BxLxD):
    """(q [B, N, H, Dh], k, v [B, L, H, Dh])."""
    q = nn.with_logical_constraint(self.q(x_BxNxD), (L.ACT_BATCH, L.ACT_LENGTH, L.ACT_HEADS, None))
    kv = nn.with_logical_constraint(self.kv(ctx_BxLxD), (L.ACT_BATCH, L.ACT_LENGTH, None, L.ACT_HEADS, None))
    k, v = kv[:, :, 0], kv[:, :, 1]
    if self.qk_norm:
      q, k = self.ln_q(q), self.ln_k(k)
    return R.tag(q, R.QKV), R.tag(k, R.QKV), R.tag(v, R.QKV)

  def out(self, a_BxNxHxDh):
    return self.proj(a_BxNxHxDh)
