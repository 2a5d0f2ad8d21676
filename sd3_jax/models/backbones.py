"""Every backbone of the paper's architecture study behind one interface: ``build`` the module of a
config's ``backbone``, count its parameters, check a checkpoint's backbone against a run's, and
classify parameters by name (input-like, hidden, output-like) for width-dependent rules.

  'mmdit'     MM-DiT, image and text streams, joint attention     models/mmdit.py
  'mmdit3'    MM-DiT with CLIP, T5 and image streams               models/mmdit.py
  'dit'       one weight set over the text+image sequence          models/dit.py
  'crossdit'  image tokens, cross-attention to the text            models/crossdit.py
  'uvit'      conv stages around DiT blocks at the lowest scale    models/uvit.py

Every module has the same call, ``model.apply({'params': p}, x, t, pooled, context)``, the same
runtime options (dtype, remat, scan_layers, attention_impl, attention_blocks) and works with
``mmdit.init_params`` / ``abstract_params`` / ``stack_block_params`` / ``unstack_block_params``.
"""

from __future__ import annotations

from flax import linen as nn

from sd3_jax.models import crossdit, dit, mmdit, uvit
from sd3_jax.models.mmdit_config import BACKBONES, MMDiTConfig

MODEL_CLASSES = {
  "mmdit": mmdit.MMDiT,
  "mmdit3": mmdit.MMDiT,
  "dit": dit.DiT,
  "crossdit": crossdit.CrossDiT,
  "uvit": uvit.UViT,
}
DESCRIPTIONS = {
  "mmdit": "MM-DiT",
  "mmdit3": "MM-DiT with three weight sets",
  "dit": "DiT",
  "crossdit": "CrossDiT",
  "uvit": "UViT",
}
assert set(MODEL_CLASSES) == set(BACKBONES) == set(DESCRIPTIONS)

init_params = mmdit.init_params
abstract_params = mmdit.abstract_params
stack_block_params = mmdit.stack_block_params
unstack_block_params = mmdit.unstack_block_params


def build(config: MMDiTConfig, **options) -> nn.Module:
  """The module of ``config.backbone`` (options: dtype, remat, scan_layers, attention_impl,
  attention_blocks)."""
  return MODEL_CLASSES[config.backbone](config, **options)


def count_params(config: MMDiTConfig, include_pos_embed: bool = False) -> int:
  """Parameters of any backbone from its abstract tree (the fixed positional table left out)."""
  return mmdit.count_tree(nn.unbox(abstract_params(build(config))), include_pos_embed)


def check_backbone(found: str, expected: str, where: str) -> None:
  """A one-line ValueError when a checkpoint (``where``) holds another backbone than the run's."""
  if found != expected:
    raise ValueError(
      f"{where} holds a {DESCRIPTIONS.get(found, found)} (backbone {found!r}), but this run builds a "
      f"{DESCRIPTIONS.get(expected, expected)} (backbone {expected!r}); set config.model.backbone={found!r} "
      "or use a checkpoint of the same backbone"
    )


# Parameter classes for width-dependent rules (muP: Yang et al. 2021, "Tensor Programs V").
# input: weights whose fan-in is a fixed input width (latent channels, timestep features, pooled
#   and token text widths), and every vector-like parameter (biases, norm scales);
# output: weights whose fan-out is fixed (the velocity's channels);
# hidden: every other weight (fan-in and fan-out grow with the width);
# fixed: the sin-cos positional table (never trained).
INPUT_KERNELS = (
  "x_embedder",
  "t_embedder/mlp_0",
  "y_embedder/mlp_0",
  "context_embedder",
  "clip_embedder",
  "t5_embedder",
  "conv_in",
)
OUTPUT_KERNELS = ("final_layer/linear", "final_layer/conv")
PARAM_CLASSES = ("input", "hidden", "output", "fixed")


def param_class(path: str) -> str:
  """'input', 'hidden', 'output' or 'fixed' for a parameter named by its '/'-joined path in any
  backbone's tree (scanned or not): see INPUT_KERNELS / OUTPUT_KERNELS above."""
  parts = path.split("/")
  if parts[-1] == "pos_embed":
    return "fixed"
  if parts[-1] != "kernel":  # biases, RMSNorm scales
    return "input"
  owner = "/".join(parts[:-1])
  if any(owner == k or owner.startswith(k + "/") for k in INPUT_KERNELS):
    return "input"
  if owner in OUTPUT_KERNELS:
    return "output"
  return "hidden"
