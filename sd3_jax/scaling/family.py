"""The depth family of a scaling study and what each member costs.

The paper's family (Sec. 5.3) is hidden = 64 d with d heads (head dim 64), d = 15..38; a smaller
``width_per_depth`` gives CPU-sized families with the same shape rule (head dim =
width_per_depth). Parameter counts are closed-form (no model is built, nothing is allocated) and
agree with ``mmdit.count_params``; training compute is the exact train-step FLOPs
(``models.flops.train_step_flops``) times steps, with the 6ND approximation beside it.
"""

from __future__ import annotations

import dataclasses

from sd3_jax.models import flops
from sd3_jax.models.flops import TIMESTEP_FREQ_DIM
from sd3_jax.models.mmdit import MMDiTConfig

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


def _dense(n_in: int, n_out: int) -> int:
  return n_in * n_out + n_out  # kernel + bias (every Dense of the model has a bias)


def _attention(h: int, head_dim: int, qk_norm: bool, has_proj: bool) -> int:
  return _dense(h, 3 * h) + (2 * head_dim if qk_norm else 0) + (_dense(h, h) if has_proj else 0)


def _stream(config: MMDiTConfig, pre_only: bool, dual: bool) -> int:
  h, r = config.hidden_size, config.mlp_ratio
  n_mods = 2 if pre_only else (9 if dual else 6)
  n = _dense(h, n_mods * h) + _attention(h, config.head_dim, config.qk_norm, not pre_only)
  if dual:
    n += _attention(h, config.head_dim, config.qk_norm, True)
  if not pre_only:
    n += _dense(h, r * h) + _dense(r * h, h)
  return n


def param_counts(config: MMDiTConfig) -> dict[str, int]:
  """Parameters of an MM-DiT by part, in closed form.

  ``non_embedding``: the joint blocks (the part that grows with d, as Kaplan et al. 2020 count);
  ``embedding``: patch, timestep, pooled-text and context embedders and the final layer;
  ``total``: both, without the fixed positional table (``mmdit.count_params``'s convention);
  ``pos_embed``: the fixed sin-cos table (no gradient), reported apart.
  """
  h, p = config.hidden_size, config.patch_size
  # Block i: the context stream (pre-only in the last block) and the image stream (dual or not).
  blocks = sum(
    _stream(config, pre_only=i == config.depth - 1, dual=False)
    + _stream(config, pre_only=False, dual=i in config.dual_attention_layers)
    for i in range(config.depth)
  )
  embedding = (
    _dense(p * p * config.in_channels, h)  # x_embedder (patch conv)
    + _dense(TIMESTEP_FREQ_DIM, h)
    + _dense(h, h)  # t_embedder
    + _dense(config.pooled_dim, h)
    + _dense(h, h)  # y_embedder
    + _dense(config.context_dim, h)  # context_embedder
    + _dense(h, 2 * h)
    + _dense(h, p * p * config.out_channels)
  )  # final_layer
  return {
    "total": blocks + embedding,
    "non_embedding": blocks,
    "embedding": embedding,
    "pos_embed": config.pos_embed_max_size**2 * h,
  }


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
