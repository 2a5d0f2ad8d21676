"""The depth family of a scaling study and what each member costs.

The paper's family (Sec. 5.3) is hidden = 64 d with d heads (head dim 64), d = 15..38; a smaller
``width_per_depth`` gives CPU-sized families with the same shape rule (head dim =
width_per_depth). The rule holds for every backbone (``model.backbone``; for the UViT, d counts
its transformer blocks and its conv widths follow the hidden size), so a sweep can put the
backbone on an axis. Parameter counts are closed-form (no model is built, nothing is allocated)
and agree with ``backbones.count_params``; training compute is the exact train-step FLOPs
(``models.flops.train_step_flops``) times steps, with the 6ND approximation beside it.
"""

from __future__ import annotations

import dataclasses

from sd3_jax.models import flops
from sd3_jax.models.mmdit import MMDiTConfig
from sd3_jax.models.param_counts import param_counts as model_param_counts

PAPER_WIDTH_PER_DEPTH = 64


def family_config(depth: int, width_per_depth: int = PAPER_WIDTH_PER_DEPTH, **fields) -> MMDiTConfig:
  """Member ``depth`` of the family: hidden = width_per_depth x depth, depth heads; ``fields``
  are the other MMDiTConfig fields (patch size, channels, text widths, qk_norm, ...)."""
  if depth < 1 or width_per_depth < 1:
    raise ValueError(f"depth ({depth}) and width_per_depth ({width_per_depth}) must be >= 1")
  if "hidden_size" in fields or "num_heads" in fields:
    raise ValueError(
      "hidden_size and num_heads follow from the family (width_per_depth x depth, depth heads); do not pass them"
    )
  return MMDiTConfig(depth=depth, hidden_size=width_per_depth * depth, num_heads=depth, **fields)


def param_counts(config: MMDiTConfig) -> dict[str, int]:
  """Parameters of the family member by part, in closed form, for any backbone
  (``models.param_counts``): ``non_embedding`` (the blocks, as Kaplan et al. 2020 count),
  ``embedding`` (embedders and final layer), ``total`` (both, without the fixed positional
  table: ``backbones.count_params``'s convention) and ``pos_embed`` (the fixed table, apart)."""
  return model_param_counts(config)


@dataclasses.dataclass(frozen=True)
class RunCompute:
  """What one training run of a family member costs."""

  flops_per_step: int  # exact train-step model FLOPs (3 x forward x batch)
  steps: int
  images: int  # images seen = steps x global batch
  tokens: int  # joint-sequence positions seen = images x (image tokens + text tokens)
  flops: int  # flops_per_step x steps
  flops_6nd: int  # 6 x parameters (total) x tokens

  @property
  def approx_ratio(self) -> float:
    """6ND / exact: how far the rule of thumb is off for this architecture and shape."""
    return self.flops_6nd / self.flops if self.flops else float("nan")


def run_compute(config: MMDiTConfig, *, latent_size: int, context_len: int, batch_size: int, steps: int) -> RunCompute:
  """Training compute of ``steps`` steps at global batch ``batch_size`` on square latents."""
  if steps < 0 or batch_size < 1:
    raise ValueError(f"steps ({steps}) must be >= 0 and batch_size ({batch_size}) >= 1")
  per_step = flops.train_step_flops(config, latent_size, latent_size, context_len, batch_size)
  images = steps * batch_size
  tokens = images * ((latent_size // config.patch_size) ** 2 + context_len)
  return RunCompute(
    flops_per_step=per_step,
    steps=steps,
    images=images,
    tokens=tokens,
    flops=per_step * steps,
    flops_6nd=flops.approx_train_flops(param_counts(config)["total"], tokens),
  )


def steps_for_budget(budget: float, flops_per_step: int) -> int:
  """Steps whose compute is closest to ``budget`` FLOPs (an isoFLOP sweep), at least 1."""
  if not budget > 0:
    raise ValueError(f"a compute budget must be positive, got {budget}")
  return max(1, int(round(budget / flops_per_step)))
