"""Bytes a compiled XLA program moves between chips per execution, split into the traffic that
stays inside a TPU slice (ICI) and the traffic that crosses slices (DCN).

Read from the optimized HLO text (``compiled.as_text()``), every computation weighted by how
many times it runs (``tools.hlo_flops.execution_counts``: a scanned layer's collectives count
once per layer):

- ICI: every collective (all-reduce, all-gather, reduce-scatter, all-to-all,
  collective-permute, and their async ``-start`` forms) whose replica groups stay inside one
  slice. A multi-slice TPU program is compiled per slice (``num_partitions`` = chips per slice),
  so all its collectives are of this kind; in a program compiled for all chips at once the
  groups are mapped to slices through the device order.
- DCN: the transfers libtpu's multi-slice runtime makes between slices (``send``/``recv`` to
  ``xla_megascale_runtime``: the TPU compiler splits a collective over slices into collectives
  inside each slice plus these), and any collective whose replica groups span slices.

A collective's bytes are its buffer on one chip: the larger of its input and its output (an
all-reduce's gradient, an all-gather's gathered result), in the layout the compiler chose (TPU
tiles pad small dimensions). Wire bytes depend on the algorithm (a ring all-reduce puts about
twice the buffer on the wire).
"""

from __future__ import annotations

import math
import re
from typing import Sequence

import numpy as np

from tools import hlo_flops

_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "ragged-all-to-all", "collective-permute")
_ARRAY = re.compile(r"([a-z]+[0-9]*)\[([0-9,]*)\]")
_BITS = {"pred": 8, "s4": 4, "u4": 4, "f8e4m3fn": 8, "f8e5m2": 8}
_MEGASCALE = "xla_megascale_runtime"
_RENDEZVOUS = re.compile(r'_xla_host_transfer_rendezvous="([^"]*)"')
_GROUPS_LIST = re.compile(r"replica_groups=\{((?:\{[0-9,]*\},?)*)\}")
_GROUPS_IOTA = re.compile(r"replica_groups=\[([0-9,]+)\]<=\[([0-9,]+)\](?:T\(([0-9,]+)\))?")
_PAIRS = re.compile(r"source_target_pairs=\{((?:\{[0-9,]*\},?)*)\}")


def _array_bytes(shape: str) -> list[int]:
  """Bytes of every array in a shape string (an array or a tuple of arrays)."""
  out = []
  for dtype, dims in _ARRAY.findall(shape):
    if dtype == "token":
      continue
    bits = _BITS.get(dtype) or int(re.sub(r"[^0-9]", "", dtype) or 32)
    out.append(math.prod(int(d) for d in dims.split(",") if d) * bits // 8)
  return out


def _groups(args: str) -> list[list[int]]:
  m = _GROUPS_IOTA.search(args)
  if m:  # [G,S]<=[dims]T(perm): iota over dims, transposed, reshaped to G groups of S
    shape = [int(x) for x in m.group(1).split(",")]
    dims = [int(x) for x in m.group(2).split(",")]
    ids = np.arange(math.prod(dims)).reshape(dims)
    if m.group(3):
      ids = ids.transpose([int(x) for x in m.group(3).split(",")])
    return ids.reshape(shape).tolist()
  m = _GROUPS_LIST.search(args) or _PAIRS.search(args)
  if m:
    return [[int(x) for x in g.split(",") if x] for g in re.findall(r"\{([0-9,]*)\}", m.group(1))]
  return []


def collective_bytes(hlo_text: str, slice_of_partition: Sequence[int] | None = None) -> dict:
  """{'ici_bytes', 'dcn_bytes': per chip per execution, 'ici_collectives', 'dcn_transfers':
  how many ran (loops counted per iteration)}. ``slice_of_partition[i]``: the slice of the
  device that runs partition i (the compiled program's device order); None or a program with
  fewer partitions than that (compiled per slice): every collective stays in its slice."""
  comps = hlo_flops.split_computations(hlo_text)
  counts = hlo_flops.execution_counts(comps)
  m = re.search(r"num_partitions=(\d+)", hlo_text.split("\n", 1)[0])
  partitions = int(m.group(1)) if m else 1
  slices = list(slice_of_partition or [])
  per_slice_program = len(slices) != partitions

  ici = dcn = 0
  n_ici = n_dcn = 0
  for name, (_, header, lines) in comps.items():
    runs = counts.get(name, 0)
    if not runs:
      continue
    sizes = {p: sum(_array_bytes(s)) for p, s in re.findall(r"(\S+?): (\S+)", header)}
    sends, recvs = {}, {}
    for line in lines:
      mi = hlo_flops.INSTR.match(line)
      if not mi:
        continue
      iname, shape, op, args = mi.groups()
      out = _array_bytes(shape)
      sizes[iname] = sum(out)
      if op in ("send", "recv") and _MEGASCALE in args:
        key = _RENDEZVOUS.search(args)
        # (payload..., u32[] context, token[]): every array but the scalar context
        payload = sum(b for b, (dt, dims) in zip(out, _ARRAY.findall(shape)) if dt != "token" and dims)
        (sends if op == "send" else recvs)[key.group(1) if key else iname] = payload
        continue
      base = op[: -len("-start")] if op.endswith("-start") else op
      if base not in _COLLECTIVES:
        continue
      operands = sum(sizes.get(o, 0) for o in re.findall(r"%([\w.\-]+)", args.split(")", 1)[0]))
      result = sum(out)
      if op.endswith("-start") and result >= operands:  # (inputs, outputs[, context]) tuples
        result -= operands
      buffer = max(operands, result)
      groups = _groups(args)
      crosses = (
        not per_slice_program and slices and any(len({slices[i] for i in g if i < len(slices)}) > 1 for g in groups)
      )
      if crosses:
        dcn, n_dcn = dcn + runs * buffer, n_dcn + runs
      else:
        ici, n_ici = ici + runs * buffer, n_ici + runs
    for key in set(sends) | set(recvs):
      dcn += runs * max(sends.get(key, 0), recvs.get(key, 0))
      n_dcn += runs
  return {"ici_bytes": ici, "dcn_bytes": dcn, "ici_collectives": n_ici, "dcn_transfers": n_dcn}
