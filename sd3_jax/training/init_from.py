"""Fine-tuning: a new training run starts from one of our converted MM-DiT checkpoints
(``sd3_jax.storage.pretrained`` format, e.g. SD3-medium or SD3.5 converted from diffusers with
``sd3-convert --to jax``) instead of a random initialisation; the trainer's
``config.init_from``.

The parameters, including the fixed positional table, are the checkpoint's; the EMA starts
equal to them and the optimizer state starts fresh. ``check`` runs before anything compiles:
every parameter the run's model expects must be in the checkpoint with its shape (a mismatch
names the leaves and both shapes), and the training resolution must fit the checkpoint's
positional grid.
"""

from __future__ import annotations

from typing import Any, Sequence

from sd3_jax.storage import pretrained
from sd3_jax.storage import trees
from sd3_jax.models import backbones
from sd3_jax.models.mmdit import MMDiTConfig


def check(path: str, model_config: MMDiTConfig, latent_hw: Sequence[int]) -> MMDiTConfig:
  """Checks the checkpoint at ``path`` against the run's model and latent size; returns the
  checkpoint's config."""
  ckpt = pretrained.read_config(path)
  backbones.check_backbone(ckpt.backbone, model_config.backbone, f"config.init_from={path}")
  patch = model_config.patch_size
  grid = max(latent_hw) // patch
  if grid > ckpt.pos_embed_max_size:
    raise ValueError(
      f"config.init_from={path}: its positional table covers a {ckpt.pos_embed_max_size}x"
      f"{ckpt.pos_embed_max_size} patch grid (latents up to {ckpt.pos_embed_max_size * patch}x"
      f"{ckpt.pos_embed_max_size * patch}), but the run trains on {latent_hw[0]}x{latent_hw[1]} "
      f"latents ({grid}x{grid} patches). Train at a resolution within the grid, or start from a "
      "checkpoint with a larger grid (SD3.5-medium has 384)"
    )
  stored = {k: v[0] for k, v in pretrained.stored_params(path).items()}
  try:
    trees.check_shapes(stored, pretrained.expected_shapes(model_config), f"config.init_from={path}")
  except ValueError as e:
    differ = [
      f"{f}={getattr(ckpt, f)!r}"
      for f in (
        "depth",
        "hidden_size",
        "num_heads",
        "patch_size",
        "in_channels",
        "out_channels",
        "pooled_dim",
        "context_dim",
        "pos_embed_max_size",
        "qk_norm",
        "dual_attention_layers",
        "mlp_ratio",
      )
      if getattr(ckpt, f) != getattr(model_config, f)
    ]
    hint = (
      f" The checkpoint's model has {', '.join(differ)}: set config.model to match (e.g. --config.model.{differ[0]})"
      if differ
      else ""
    )
    raise ValueError(f"{e}.{hint}") from None
  if ckpt.attention_scale != model_config.attention_scale:  # same shapes, another function
    raise ValueError(
      f"config.init_from={path}: the checkpoint's model computes attention with scale "
      f"{ckpt.attention_scale or 'the usual 1/sqrt(head_dim)'} (parametrization {ckpt.parametrization!r}), this run's "
      f"with {model_config.attention_scale or 'the usual 1/sqrt(head_dim)'}: set config.model.parametrization, "
      "mup_base_width and mup_base_head_dim to the checkpoint's"
    )
  return ckpt


def load(path: str, *, scan_layers: bool, shardings: Any) -> dict:
  """The checkpoint's parameters (float32) in the run's layout (scanned or not), placed
  straight into ``shardings`` (the train state's parameter shardings)."""
  _, params = pretrained.load_pretrained(path, scan_layers=scan_layers, shardings=shardings)
  return params
