"""Checksums of a sharded train state, computed on the devices: what a training checkpoint
records per saved array, and what resuming checks, so that a flipped bit on disk is a damaged
checkpoint instead of a run that trains on bad weights.

The pretrained format (``storage.integrity``) hashes host bytes with SHA-256; a train state is
global arrays spread over many hosts, so here every array is hashed where it lives, in one
jitted pass: its elements as 32-bit words w_i (bf16/f16 widened, 8-byte types split in two),
each mixed with its position i in the whole array, summed mod 2^32, under two seeds:

    h = sum_i fmix32(w_i ^ fmix32(i ^ seed))      (fmix32: MurmurHash3's finaliser, a bijection)

The sum is exact integer arithmetic, so the value does not depend on how the array is sharded
(a restore onto another mesh checks the same numbers), and any change of a single word always
changes it (fmix32 is invertible). Two seeds give 64 bits against several changes cancelling.
It detects damage, not tampering.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

PREFIX = "fmix64:"
_SEEDS = (0x9E3779B9, 0x7F4A7C15)


def _fmix32(x):
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def _words(x) -> jax.Array:
  """The array's bits as uint32 words, in an array whose leading axes are the array's."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = jnp.dtype(x.dtype).itemsize
  if size == 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  if size < 4:
    return jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}[size]).astype(jnp.uint32)
  return jax.lax.bitcast_convert_type(x, jnp.uint32)  # 8 bytes: a trailing axis of 2 words


def _position(shape) -> jax.Array:
  """Row-major index of every element (mod 2^32), built from iotas (no host array)."""
  pos = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(len(shape))):
    pos = pos + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride % 2**32)
    stride *= shape[axis]
  return pos


def _leaf_hash(x) -> jax.Array:
  w = _words(x)
  pos = _position(w.shape)
  return jnp.stack([jnp.sum(_fmix32(w ^ _fmix32(pos ^ jnp.uint32(s))), dtype=jnp.uint32) for s in _SEEDS])


@functools.lru_cache(maxsize=8)
def _hasher(out_sharding):
  return jax.jit(lambda xs: [_leaf_hash(x) for x in xs], out_shardings=out_sharding)


def key_name(path) -> str:
  """'opt_state.0.mu.w': the dotted name of a leaf, whatever the node types."""
  parts = []
  for k in path:
    for attr in ("key", "idx", "name"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return ".".join(parts)


def checksums(tree: Any) -> dict[str, str]:
  """{dotted leaf name: "fmix64:<16 hex digits>"} of a pytree of (global) jax.Arrays. All
  processes must call it (it is one jitted computation over the sharded arrays)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  names = [key_name(p) for p, _ in leaves]
  arrays = [x for _, x in leaves]
  if not arrays:
    return {}
  # One jitted pass per set of devices (normally one: the state's mesh), with replicated
  # results so that every process can read them (multi-host).
  groups: dict[Any, list[int]] = {}
  for i, x in enumerate(arrays):
    groups.setdefault(frozenset(getattr(x, "sharding", None).device_set), []).append(i)
  host = [None] * len(arrays)
  for idx in groups.values():
    first = arrays[idx[0]].sharding
    out = jax.sharding.NamedSharding(first.mesh, jax.sharding.PartitionSpec()) if hasattr(first, "mesh") else None
    for i, s in zip(idx, _hasher(out)([arrays[i] for i in idx])):
      host[i] = np.asarray(jax.device_get(s)).astype(np.uint64)
  return {n: f"{PREFIX}{int((h[0] << np.uint64(32)) | h[1]):016x}" for n, h in zip(names, host)}


def mismatches(tree: Any, recorded: Mapping[str, str]) -> tuple[list[str], list[str]]:
  """(leaves whose checksum differs from ``recorded``, leaves ``recorded`` does not list)."""
  now = checksums(tree)
  differ = [n for n, v in now.items() if n in recorded and recorded[n] != v]
  unlisted = [n for n in now if n not in recorded]
  return differ, unlisted
