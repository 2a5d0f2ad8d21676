"""Key tables and tensor transforms between our parameter tree, the original SD3 single file
and diffusers' SD3Transformer2DModel (diffusers'
``convert_sd3_to_diffusers.py`` holds the same table), plus config inference from shapes.

Everything goes through the ORIGINAL layout (torch [out, in] weights, original key names
without the ``model.diffusion_model.`` prefix):

  ours <-> original   pure transpose/reshape: Linear weight [out, in] <-> kernel [in..., out...]
                      (qkv [3h, h] <-> [h, 3, H, Dh]; proj [h, h] <-> [H, Dh, h]); patch conv
                      [h, C, p, p] <-> [p, p, C, h]; ln_q.weight <-> ln_q/scale; pos_embed as is.
  original <-> diffusers   copies, qkv ``chunk3`` into to_q/to_k/to_v, and the shift/scale
                      SWAP of final_layer and of the last block's context adaLN.

A format is described by ``entries(config, fmt)``: one Entry per tensor of that format, naming
the original tensor it comes from and the op. ``to_native`` makes the tensor from its original,
``to_original`` inverts (concatenating the three chunks of a qkv), so any format converts to
any other one tensor at a time. Every op is a reshape, transpose, split, concatenation or row
swap, so round trips are bit-exact.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Mapping, Sequence

import numpy as np

from sd3_jax.storage import pretrained
from sd3_jax.models.mmdit import MMDiTConfig

FORMATS = ("jax", "sd3", "diffusers")
SD3_PREFIX = "model.diffusion_model."
# Other components of an original single file; ignored when reading the MM-DiT.
SD3_OTHER_PREFIXES = ("first_stage_model.", "text_encoders.")

# Our module path -> original module path (top level; leaves: kernel/scale -> weight, bias).
_TOP = {
  "x_embedder/proj": "x_embedder.proj",
  "t_embedder/mlp_0": "t_embedder.mlp.0",
  "t_embedder/mlp_2": "t_embedder.mlp.2",
  "y_embedder/mlp_0": "y_embedder.mlp.0",
  "y_embedder/mlp_2": "y_embedder.mlp.2",
  "context_embedder": "context_embedder",
  "final_layer/adaLN_modulation": "final_layer.adaLN_modulation.1",
  "final_layer/linear": "final_layer.linear",
}
# Inside joint_blocks_{i}/{context_block,x_block} <-> joint_blocks.{i}.{stream}.
_STREAM = {
  "adaLN_modulation": "adaLN_modulation.1",
  "attn/qkv": "attn.qkv",
  "attn/ln_q": "attn.ln_q",
  "attn/ln_k": "attn.ln_k",
  "attn/proj": "attn.proj",
  "attn2/qkv": "attn2.qkv",
  "attn2/ln_q": "attn2.ln_q",
  "attn2/ln_k": "attn2.ln_k",
  "attn2/proj": "attn2.proj",
  "mlp/fc1": "mlp.fc1",
  "mlp/fc2": "mlp.fc2",
}
_LEAF = {"kernel": "weight", "bias": "bias", "scale": "weight"}

# Original -> diffusers (as diffusers' convert_sd3_to_diffusers.py). Top level:
_DF_TOP = {
  "pos_embed": "pos_embed.pos_embed",
  "x_embedder.proj": "pos_embed.proj",
  "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
  "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
  "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
  "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
  "context_embedder": "context_embedder",
  "final_layer.linear": "proj_out",
  "final_layer.adaLN_modulation.1": "norm_out.linear",  # swapped
}
# Per block: joint_blocks.{i}.{stream}.{module} -> transformer_blocks.{i}.{diffusers module(s)}.
_DF_STREAM = {
  ("x_block", "adaLN_modulation.1"): "norm1.linear",
  ("x_block", "attn.qkv"): ("attn.to_q", "attn.to_k", "attn.to_v"),
  ("x_block", "attn.ln_q"): "attn.norm_q",
  ("x_block", "attn.ln_k"): "attn.norm_k",
  ("x_block", "attn.proj"): "attn.to_out.0",
  ("x_block", "attn2.qkv"): ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
  ("x_block", "attn2.ln_q"): "attn2.norm_q",
  ("x_block", "attn2.ln_k"): "attn2.norm_k",
  ("x_block", "attn2.proj"): "attn2.to_out.0",
  ("x_block", "mlp.fc1"): "ff.net.0.proj",
  ("x_block", "mlp.fc2"): "ff.net.2",
  ("context_block", "adaLN_modulation.1"): "norm1_context.linear",  # swapped in the last block
  ("context_block", "attn.qkv"): ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
  ("context_block", "attn.ln_q"): "attn.norm_added_q",
  ("context_block", "attn.ln_k"): "attn.norm_added_k",
  ("context_block", "attn.proj"): "attn.to_add_out",
  ("context_block", "mlp.fc1"): "ff_context.net.0.proj",
  ("context_block", "mlp.fc2"): "ff_context.net.2",
}


@dataclasses.dataclass(frozen=True)
class Entry:
  """One tensor of a format and how it derives from an original tensor.

  op: 'copy', 'swap' (exchange the two row halves), 'chunk' (part `part` of 3 row chunks),
  'dense' (jax kernel with `n_in` input axes), 'bias' (jax bias, flat in torch), 'conv'.
  """

  name: str
  shape: tuple[int, ...]
  orig: str
  orig_shape: tuple[int, ...]
  op: str = "copy"
  part: int = 0
  n_in: int = 1


# ---------------------------------------------------------------------------------------------
# Tables


def _jax_to_original(name: str, shape: tuple[int, ...]) -> tuple[str, tuple[int, ...], str, int]:
  """Our flat parameter name -> (original key, original shape, op, n_in)."""
  if name == "pos_embed":
    return "pos_embed", shape, "copy", 1
  *mod_parts, leaf = name.split("/")
  module = "/".join(mod_parts)
  m = re.fullmatch(r"joint_blocks_(\d+)/(context_block|x_block)/(.+)", module)
  if m and m.group(3) in _STREAM:
    orig_mod = f"joint_blocks.{m.group(1)}.{m.group(2)}.{_STREAM[m.group(3)]}"
  elif module in _TOP:
    orig_mod = _TOP[module]
  else:
    raise KeyError(f"no original-key mapping for our parameter {name!r}")
  if leaf not in _LEAF:
    raise KeyError(f"no original-key mapping for our parameter {name!r}")
  key = f"{orig_mod}.{_LEAF[leaf]}"
  if leaf == "kernel" and module == "x_embedder/proj":  # [p, p, C, h] <-> [h, C, p, p]
    return key, (shape[3], shape[2], shape[0], shape[1]), "conv", 1
  if leaf == "kernel":
    n_in = 2 if module.endswith("/proj") and "attn" in module else 1
    return key, (math.prod(shape[n_in:]), math.prod(shape[:n_in])), "dense", n_in
  if leaf == "bias":
    return key, (math.prod(shape),), "bias", 1
  return key, shape, "copy", 1


def _group_rank(name: str) -> tuple:
  """Natural order: embedders, blocks 0..d-1, final layer (so readers see each block once)."""
  head = name.split("/")[0].split(".")[0]
  if head.startswith("joint_blocks"):
    i = int(re.match(r"joint_blocks[._](\d+)", name).group(1))
    return (1, i)
  order = ["pos_embed", "x_embedder", "t_embedder", "y_embedder", "context_embedder"]
  return (0, order.index(head)) if head in order else (2, 0)


def require_mmdit(config, where: str) -> None:
  """The key tables exist for the MM-DiT only (no PyTorch reference implements the other
  backbones of the study): a one-line ValueError for any other."""
  backbone = getattr(config, "backbone", "mmdit")
  if backbone != "mmdit":
    from sd3_jax.models.backbones import DESCRIPTIONS

    raise ValueError(
      f"conversion to PyTorch is MM-DiT only: {where} holds a {DESCRIPTIONS[backbone]} (backbone "
      f"{backbone!r}), which no PyTorch reference implements; it stays in the sd3_jax format (--to jax)"
    )


def original_entries(config: MMDiTConfig) -> list[Entry]:
  """Our parameters (from the model itself) as entries of the 'jax' format."""
  out = []
  shapes = pretrained.expected_shapes(config)
  for name in sorted(shapes, key=lambda n: (_group_rank(n), n)):
    key, oshape, op, n_in = _jax_to_original(name, shapes[name])
    out.append(Entry(name, shapes[name], key, oshape, op, 0, n_in))
  return out


def _diffusers_names(key: str, depth: int) -> tuple[tuple[str, ...], str]:
  """Original key -> (diffusers key(s), op)."""
  if key == "pos_embed":
    return (_DF_TOP["pos_embed"],), "copy"
  mod, leaf = key.rsplit(".", 1)
  if mod in _DF_TOP:
    return (f"{_DF_TOP[mod]}.{leaf}",), "swap" if mod == "final_layer.adaLN_modulation.1" else "copy"
  m = re.fullmatch(r"joint_blocks\.(\d+)\.(context_block|x_block)\.(.+)", mod)
  if not m or (m.group(2), m.group(3)) not in _DF_STREAM:
    raise KeyError(f"no diffusers mapping for original key {key!r}")
  i, stream, sub = int(m.group(1)), m.group(2), m.group(3)
  target = _DF_STREAM[(stream, sub)]
  prefix = f"transformer_blocks.{i}."
  if isinstance(target, tuple):
    return tuple(f"{prefix}{t}.{leaf}" for t in target), "chunk"
  swap = stream == "context_block" and sub == "adaLN_modulation.1" and i == depth - 1
  return (f"{prefix}{target}.{leaf}",), "swap" if swap else "copy"


def entries(config: MMDiTConfig, fmt: str) -> list[Entry]:
  """Every tensor of format ``fmt`` ('jax', 'sd3' without prefix, 'diffusers'), in a
  streaming-friendly order."""
  ours = original_entries(config)
  if fmt == "jax":
    return ours
  if fmt == "sd3":
    return [Entry(e.orig, e.orig_shape, e.orig, e.orig_shape) for e in ours]
  if fmt == "diffusers":
    out = []
    for e in ours:
      names, op = _diffusers_names(e.orig, config.depth)
      if op == "chunk":
        shape = (e.orig_shape[0] // 3,) + e.orig_shape[1:]
        out += [Entry(n, shape, e.orig, e.orig_shape, "chunk", j) for j, n in enumerate(names)]
      else:
        out.append(Entry(names[0], e.orig_shape, e.orig, e.orig_shape, op))
    return out
  raise ValueError(f"unknown format {fmt!r}; choose one of {FORMATS}")


# ---------------------------------------------------------------------------------------------
# Transforms


def _swap_halves(x: np.ndarray) -> np.ndarray:
  a, b = np.split(x, 2, axis=0)
  return np.concatenate([b, a], axis=0)


def to_native(e: Entry, orig: np.ndarray) -> np.ndarray:
  """The tensor ``e`` computed from its original tensor (torch layout)."""
  if tuple(orig.shape) != e.orig_shape:
    raise ValueError(f"{e.orig}: shape {list(orig.shape)}, expected {list(e.orig_shape)}")
  if e.op == "copy":
    return orig
  if e.op == "swap":
    return _swap_halves(orig)
  if e.op == "chunk":
    return np.split(orig, 3, axis=0)[e.part]
  if e.op == "dense":
    return orig.T.reshape(e.shape)
  if e.op == "bias":
    return orig.reshape(e.shape)
  if e.op == "conv":
    return orig.transpose(2, 3, 1, 0)
  raise ValueError(f"unknown op {e.op!r}")


def to_original(es: Sequence[Entry], arrays: Sequence[np.ndarray]) -> np.ndarray:
  """Inverse of ``to_native``: the original tensor from all entries that derive from it."""
  for e, a in zip(es, arrays):
    if tuple(a.shape) != e.shape:
      raise ValueError(f"{e.name}: shape {list(a.shape)}, expected {list(e.shape)}")
  e, a = es[0], arrays[0]
  if e.op == "chunk":
    parts = sorted(zip((x.part for x in es), arrays), key=lambda p: p[0])
    if [p for p, _ in parts] != [0, 1, 2]:
      raise ValueError(f"{e.orig}: need the three q/k/v chunks, got parts {[p for p, _ in parts]}")
    return np.concatenate([x for _, x in parts], axis=0)
  if len(es) != 1:
    raise ValueError(f"{e.orig}: {len(es)} tensors for a one-to-one op {e.op!r}")
  if e.op in ("copy",):
    return a
  if e.op == "swap":
    return _swap_halves(a)
  if e.op == "dense":
    return a.reshape(math.prod(e.shape[: e.n_in]), -1).T
  if e.op == "bias":
    return a.reshape(-1)
  if e.op == "conv":
    return a.transpose(3, 2, 0, 1)
  raise ValueError(f"unknown op {e.op!r}")


# ---------------------------------------------------------------------------------------------
# Config inference


_PROBES = {
  "sd3": dict(
    patch="x_embedder.proj.weight",
    pooled="y_embedder.mlp.0.weight",
    context="context_embedder.weight",
    final="final_layer.linear.weight",
    pos="pos_embed",
    block=r"joint_blocks\.(\d+)\.",
    fc1="joint_blocks.0.x_block.mlp.fc1.weight",
    qk=r"joint_blocks\.\d+\.(?:x_block|context_block)\.attn2?\.ln_[qk]\.weight",
    dual=r"joint_blocks\.(\d+)\.x_block\.attn2\.",
  ),
  "diffusers": dict(
    patch="pos_embed.proj.weight",
    pooled="time_text_embed.text_embedder.linear_1.weight",
    context="context_embedder.weight",
    final="proj_out.weight",
    pos="pos_embed.pos_embed",
    block=r"transformer_blocks\.(\d+)\.",
    fc1="transformer_blocks.0.ff.net.0.proj.weight",
    qk=r"transformer_blocks\.\d+\.attn2?\.norm_(?:added_)?[qk]\.weight",
    dual=r"transformer_blocks\.(\d+)\.attn2\.",
  ),
}


def infer_config(
  shapes: Mapping[str, Sequence[int]],
  fmt: str,
  *,
  num_heads: int | None = None,
  head_dim: int | None = None,
  hints: Mapping | None = None,
  source: str = "checkpoint",
) -> MMDiTConfig:
  """MMDiTConfig from tensor names and shapes of an 'sd3' (no prefix) or 'diffusers' state.

  Heads: from the qk-norm weight length (head dim) when present; otherwise ``num_heads`` (or
  hidden / ``head_dim``), the hint (diffusers config.json / our metadata), or hidden/64 as the
  reference. A requested value that contradicts the tensors or the metadata is an error. ``hints`` are
  MMDiTConfig fields from metadata; any that the tensors determine must agree (clear error
  otherwise), the rest (num_heads, pos_embed_base_size, pos_embed_scale) are taken as given.
  """
  p = _PROBES[fmt]
  shapes = {k: tuple(int(s) for s in v) for k, v in shapes.items()}
  hints = dict(hints or {})

  def need(role):
    if p[role] not in shapes:
      raise ValueError(f"cannot infer the model configuration of {source}: tensor {p[role]!r} is missing")
    return shapes[p[role]]

  pw = need("patch")
  if len(pw) != 4 or pw[2] != pw[3]:
    raise ValueError(f"{source}: {p['patch']} has shape {list(pw)}, expected [hidden, C, p, p]")
  hidden, in_ch, patch = pw[0], pw[1], pw[2]
  blocks = {int(m.group(1)) for k in shapes if (m := re.match(p["block"], k))}
  if not blocks:
    raise ValueError(f"cannot infer the model configuration of {source}: no joint blocks")
  depth = max(blocks) + 1
  pos = need("pos")
  grid = math.isqrt(pos[1]) if len(pos) == 3 else 0
  if len(pos) != 3 or grid * grid != pos[1]:
    raise ValueError(f"{source}: {p['pos']} has shape {list(pos)}, expected [1, M*M, hidden]")
  final = need("final")[0]
  if final % (patch * patch):
    raise ValueError(f"{source}: {p['final']} has {final} rows, not a multiple of patch^2={patch * patch}")
  fc1 = need("fc1")[0]
  if fc1 % hidden:
    raise ValueError(f"{source}: {p['fc1']} has {fc1} rows, not a multiple of hidden={hidden}")
  qk_lens = {shapes[k][0] for k in shapes if re.fullmatch(p["qk"], k)}
  has_qk = bool(qk_lens)
  if len(qk_lens) > 1:
    raise ValueError(f"{source}: qk-norm weights of different lengths {sorted(qk_lens)}")
  dual = sorted({int(m.group(1)) for k in shapes if (m := re.match(p["dual"], k))})

  if head_dim is not None:
    if head_dim <= 0 or hidden % head_dim:
      raise ValueError(f"head_dim={head_dim} does not divide the hidden size {hidden} of {source}")
    if num_heads is not None and num_heads * head_dim != hidden:
      raise ValueError(f"num_heads={num_heads} and head_dim={head_dim} disagree with hidden {hidden}")
    num_heads = hidden // head_dim
  hint_heads = hints.get("num_heads")
  if num_heads is not None and hint_heads is not None and num_heads != hint_heads:
    raise ValueError(f"num_heads={num_heads} was requested but {source} says {hint_heads}")
  if qk_lens:
    head_dim = qk_lens.pop()
    if hidden % head_dim:
      raise ValueError(f"{source}: qk-norm length {head_dim} does not divide hidden {hidden}")
    heads = hidden // head_dim
    asked = num_heads if num_heads is not None else hint_heads
    if asked is not None and asked != heads:
      raise ValueError(
        f"num_heads={asked} conflicts with the qk-norm weights of {source} (head dim {head_dim}, so {heads} heads)"
      )
  elif num_heads is not None or hint_heads is not None:
    heads = num_heads if num_heads is not None else hint_heads
  elif hidden % 64 == 0:
    heads = hidden // 64  # the reference's rule: head dim 64
  else:
    raise ValueError(
      f"cannot infer the number of heads of {source}: no qk-norm weights and hidden "
      f"size {hidden} is not a multiple of 64; pass --num-heads or --head-dim"
    )

  inferred = dict(
    depth=depth,
    hidden_size=hidden,
    num_heads=heads,
    patch_size=patch,
    in_channels=in_ch,
    out_channels=final // (patch * patch),
    pooled_dim=need("pooled")[1],
    context_dim=need("context")[1],
    pos_embed_max_size=grid,
    qk_norm=has_qk,
    dual_attention_layers=tuple(dual),
    mlp_ratio=fc1 // hidden,
  )
  for k, v in hints.items():
    if k in inferred and k != "num_heads" and _norm(v) != _norm(inferred[k]):
      raise ValueError(f"{source} says {k}={v!r}, but its tensors imply {inferred[k]!r}")
  extra = {k: hints[k] for k in ("pos_embed_base_size", "pos_embed_scale", "sample_size") if hints.get(k) is not None}
  try:
    config = MMDiTConfig(**inferred, **extra)
  except ValueError as e:
    raise ValueError(f"{source}: inconsistent configuration: {e}") from None
  if config.sample_size == config.default_sample_size:  # one spelling of "the default"
    config = dataclasses.replace(config, sample_size=None)
  return config


def _norm(v):
  return tuple(v) if isinstance(v, (list, tuple)) else v


# ---------------------------------------------------------------------------------------------
# diffusers config.json


def diffusers_config(config: MMDiTConfig) -> dict:
  """config.json of SD3Transformer2DModel for ``config`` (plus our private '_sd3_jax' fields,
  which diffusers ignores, so that a round trip restores the whole MMDiTConfig)."""
  if config.mlp_ratio != 4:
    raise ValueError(f"diffusers' SD3Transformer2DModel has MLP ratio 4; this model has {config.mlp_ratio}")
  return {
    "_class_name": "SD3Transformer2DModel",
    "_diffusers_version": "0.31.0",
    # Only the default pipeline resolution and the unused initial table depend on it.
    "sample_size": config.sample_size if config.sample_size is not None else config.default_sample_size,
    "patch_size": config.patch_size,
    "in_channels": config.in_channels,
    "num_layers": config.depth,
    "attention_head_dim": config.head_dim,
    "num_attention_heads": config.num_heads,
    "joint_attention_dim": config.context_dim,
    "caption_projection_dim": config.hidden_size,
    "pooled_projection_dim": config.pooled_dim,
    "out_channels": config.out_channels,
    "pos_embed_max_size": config.pos_embed_max_size,
    "qk_norm": "rms_norm" if config.qk_norm else None,
    "dual_attention_layers": list(config.dual_attention_layers),
    "_sd3_jax": {"pos_embed_base_size": config.pos_embed_base_size, "pos_embed_scale": config.pos_embed_scale},
  }


def hints_from_diffusers_config(cfg: Mapping, source: str) -> dict:
  """MMDiTConfig fields stated by a diffusers config.json (checked against the tensors later)."""
  cls = cfg.get("_class_name")
  if cls not in (None, "SD3Transformer2DModel"):
    raise ValueError(f"{source}: _class_name is {cls!r}, expected 'SD3Transformer2DModel'")
  qk = cfg.get("qk_norm")
  if qk not in (None, "rms_norm"):
    raise ValueError(f"{source}: qk_norm={qk!r} is not supported (only 'rms_norm' or null)")
  hints: dict = {}
  names = dict(
    num_layers="depth",
    num_attention_heads="num_heads",
    patch_size="patch_size",
    in_channels="in_channels",
    out_channels="out_channels",
    joint_attention_dim="context_dim",
    pooled_projection_dim="pooled_dim",
    pos_embed_max_size="pos_embed_max_size",
  )
  for k in (*names, "attention_head_dim", "caption_projection_dim", "sample_size"):
    v = cfg.get(k)
    if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
      raise ValueError(f"{source}: {k} must be a positive integer, got {v!r}")
  dual = cfg.get("dual_attention_layers")
  if dual is not None and (
    not isinstance(dual, (list, tuple))
    or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in dual)
  ):
    raise ValueError(f"{source}: dual_attention_layers must be a list of block indices, got {dual!r}")
  if not isinstance(cfg.get("_sd3_jax") or {}, dict):
    raise ValueError(f"{source}: _sd3_jax must be an object, got {cfg.get('_sd3_jax')!r}")
  for k, ours in names.items():
    if cfg.get(k) is not None:
      hints[ours] = cfg[k]
  if hints.get("out_channels") is None and "in_channels" in hints:
    hints["out_channels"] = hints["in_channels"]
  if cfg.get("num_attention_heads") and cfg.get("attention_head_dim"):
    inner = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    hints["hidden_size"] = inner
    cap = cfg.get("caption_projection_dim")
    if cap is not None and cap != inner:
      raise ValueError(
        f"{source}: caption_projection_dim={cap} differs from num_attention_heads * "
        f"attention_head_dim = {inner}; SD3 needs them equal"
      )
  hints["qk_norm"] = qk == "rms_norm"
  hints["dual_attention_layers"] = tuple(cfg.get("dual_attention_layers") or ())
  if cfg.get("sample_size") is not None:
    hints["sample_size"] = cfg["sample_size"]
  for k, v in (cfg.get("_sd3_jax") or {}).items():
    if k in ("pos_embed_base_size", "pos_embed_scale"):
      hints[k] = v
  return hints
