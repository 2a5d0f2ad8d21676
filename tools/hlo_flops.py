"""Matmul FLOPs of a compiled XLA program, with loop bodies counted once per iteration.

XLA's ``cost_analysis()['flops']`` counts a while-loop body (a scanned layer stack) once, which
hides most of a scanned model's work and all of its rematerialisation. This reads the optimized
HLO text (``compiled.as_text()``) instead:

- every ``dot`` and ``convolution`` (TPU compiles matmuls to convolutions) contributes
  2 * prod(output shape) * (contracted elements per output), from the operand shapes;
- every computation is weighted by how many times it runs: a while body by its trip count (the
  s32 constant its condition compares the counter with, as scans compile), nested calls and
  fusions by their caller's weight.

Kernels (Pallas/Mosaic, cuDNN custom calls) have no visible FLOPs: they are counted by number.
"""

from __future__ import annotations

import collections
import math
import re

import numpy as np

_SHAPE = r"[a-z]+[0-9]*\[[0-9,]*\]"
_HEADER = re.compile(r"^(ENTRY )?%(\S+) \((.*)\) -> .* \{$")
_INSTR = re.compile(r"^\s*(?:ROOT )?%(\S+) = (\(.*?\)|" + _SHAPE + r")\S* ([a-z\-]+)\((.*)$")
_START = re.compile(r"^\s+(ROOT )?%")
_PARAM = re.compile(r"(\S+?): (" + _SHAPE + ")")
_CALLS = re.compile(r"\b(calls|body|condition|to_apply)=%([\w.\-]+)")
_KERNEL_TARGETS = ('"tpu_custom_call"', "cudnn", "triton")  # Pallas/Mosaic, cuDNN, Triton
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")


def _dims(shape: str) -> list[int]:
  inner = shape[shape.index("[") + 1 : shape.index("]")]
  return [int(x) for x in inner.split(",") if x]


def _split_computations(text: str) -> dict[str, tuple[bool, str, list[str]]]:
  comps, name, header, lines, entry = {}, None, "", [], False
  for line in text.splitlines():
    m = _HEADER.match(line)
    if m:
      name, entry, header, lines = m.group(2), bool(m.group(1)), m.group(3), []
      continue
    if name is not None and line.rstrip() == "}":
      comps[name] = (entry, header, lines)
      name = None
    elif name is not None and (_START.match(line) or not lines):
      lines.append(line)
    elif name is not None:  # a continuation (kernel configs span several lines)
      lines[-1] += " " + line
  return comps


def _operands(args: str) -> list[str]:
  head = args.split(")", 1)[0]
  return re.findall(r"%([\w.\-]+)", head)


def _op_flops(op: str, out_shape: str, args: str, shapes: dict[str, list[int]]) -> float:
  if out_shape.startswith("("):
    return 0.0
  out = math.prod(_dims(out_shape))
  ops = _operands(args)
  if op == "dot":
    m = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", args)
    lhs = shapes.get(ops[0]) if ops else None
    if m is None or lhs is None:
      return 0.0
    k = math.prod(lhs[int(i)] for i in m.group(1).split(",") if i)
    return 2.0 * out * k
  if op == "convolution":
    m = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", args)
    lhs = shapes.get(ops[0]) if ops else None
    kernel = shapes.get(ops[1]) if len(ops) > 1 else None
    if m is None or lhs is None or kernel is None:
      return 0.0
    return 2.0 * _conv_macs(m.groups(), lhs, kernel, _dims(out_shape), args)
  return 0.0


def _window_attr(args: str, key: str, n: int, default: int) -> list[list[int]]:
  m = re.search(key + r"=([0-9_x\-]+)", args)
  if m is None:
    return [[default]] * n
  return [[int(v) for v in part.split("_")] for part in m.group(1).split("x")]


def _conv_macs(labels, lhs, kernel, out, args: str) -> float:
  """Multiply-adds of a convolution, counting only window positions that land inside the
  (padded, dilated) input: TPU compiles many dots to windowed convolutions with padding, where
  output size times window size would overcount."""
  lhs_l, ker_l, out_l = labels
  spatial = sorted(c for c in ker_l if c.isdigit())
  n = len(spatial)
  sizes = _window_attr(args, "size", n, 1)
  pads = _window_attr(args, "pad", n, 0)
  strides = _window_attr(args, "stride", n, 1)
  lhs_dil = _window_attr(args, "lhs_dilate", n, 1)
  rhs_dil = _window_attr(args, "rhs_dilate", n, 1)
  macs = float(out[out_l.index("b")] * out[out_l.index("f")] * kernel[ker_l.index("i")])
  for j, d in enumerate(spatial):
    size_in, size_out = lhs[lhs_l.index(d)], out[out_l.index(d)]
    k_size = kernel[ker_l.index(d)] if len(sizes) <= j else sizes[j][0]
    lo = pads[j][0] if len(pads[j]) > 1 else 0
    s, ld, rd = strides[j][0], lhs_dil[j][0], rhs_dil[j][0]
    o = np.arange(size_out) * s - lo
    valid = 0
    for k in range(k_size):
      pos = o + k * rd
      valid += int(np.count_nonzero((pos >= 0) & (pos <= (size_in - 1) * ld) & (pos % ld == 0)))
    macs *= valid
  return macs


def _trip_count(cond_lines: list[str]) -> int | None:
  consts = {int(c) for c in re.findall(r"s32\[\]\S* constant\((\d+)\)", "\n".join(cond_lines))}
  return consts.pop() if len(consts) == 1 else None


def call_edges(op: str, args: str, comps: dict) -> tuple[list[tuple[str, int]], bool]:
  """The computations one instruction calls, each with how many times per execution of the
  instruction (a while body: its trip count, read from the condition; its condition: one more),
  and whether a trip count could not be read (then 1)."""
  targets = dict(_CALLS.findall(args))
  edges, unknown = [], False
  if op == "while" and "body" in targets:
    n = _trip_count(comps.get(targets.get("condition"), (0, "", []))[2])
    unknown = n is None
    edges.append((targets["body"], n or 1))
    if "condition" in targets:
      edges.append((targets["condition"], (n or 1) + 1))
  else:
    edges.extend((callee, 1) for callee in targets.values())
  b = _BRANCHES.search(args)
  if b:
    edges.extend((callee, 1) for callee in re.findall(r"%([\w.\-]+)", b.group(1)))
  return edges, unknown


def execution_counts(comps: dict) -> dict[str, int]:
  """How many times each computation of ``split_computations(text)`` runs per execution of the
  entry computation (loop bodies by their trip counts, nested calls multiplied)."""
  edges = collections.defaultdict(list)
  for name, (_, _, lines) in comps.items():
    for line in lines:
      m = _INSTR.match(line)
      if m:
        edges[name].extend(call_edges(m.group(3), m.group(4), comps)[0])
  entry = [n for n, (is_entry, _, _) in comps.items() if is_entry]
  order, seen = [], set()

  def visit(name):  # post-order DFS; its reverse is a topological order of the call graph
    if name in seen or name not in comps:
      return
    seen.add(name)
    for callee, _ in edges.get(name, ()):
      visit(callee)
    order.append(name)

  for e in entry:
    visit(e)
  counts = collections.Counter({e: 1 for e in entry})
  for name in reversed(order):
    for callee, n in edges.get(name, ()):
      counts[callee] += counts[name] * n
  return dict(counts)


split_computations = _split_computations
dims = _dims
INSTR = _INSTR


def matmul_flops(hlo_text: str) -> dict:
  """{'flops': matmul FLOPs of one execution (per device for an SPMD program),
  'flops_loops_once': the same with every loop body counted once (what cost_analysis does),
  'custom_calls': executions of kernel custom calls (Pallas/Mosaic, cuDNN, Triton),
  'unknown_trip_counts': loops whose trip count could not be read (counted once)}."""
  comps = _split_computations(hlo_text)
  local, local_cc, edges = {}, {}, collections.defaultdict(list)
  unknown = 0
  for name, (_, header, lines) in comps.items():
    shapes = {p: _dims(s) for p, s in _PARAM.findall(header)}
    flops, ccalls = 0.0, 0
    for line in lines:
      m = _INSTR.match(line)
      if not m:
        continue
      iname, shape, op, args = m.groups()
      if not shape.startswith("("):
        shapes[iname] = _dims(shape)
      flops += _op_flops(op, shape, args, shapes)
      ccalls += op == "custom-call" and any(t in args for t in _KERNEL_TARGETS)
      called, unread = call_edges(op, args, comps)
      unknown += unread
      edges[name].extend(called)
    local[name], local_cc[name] = flops, ccalls
  entry = [n for n, (is_entry, _, _) in comps.items() if is_entry]

  def total(name, weight_fn, memo, stack=()):
    if name in memo:
      return memo[name]
    if name in stack or name not in local:
      return 0.0, 0
    f, c = local[name], local_cc[name]
    for callee, n in edges.get(name, ()):
      cf, cc = total(callee, weight_fn, memo, stack + (name,))
      w = weight_fn(n)
      f, c = f + w * cf, c + w * cc
    memo[name] = (f, c)
    return f, c

  flops, cc = total(entry[0], lambda n: n, {}) if entry else (0.0, 0)
  once, _ = total(entry[0], lambda n: 1, {}) if entry else (0.0, 0)
  return {"flops": flops, "flops_loops_once": once, "custom_calls": cc, "unknown_trip_counts": unknown}
