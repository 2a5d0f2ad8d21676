"""The MM-DiT's configuration: ``MMDiTConfig``, the presets and the depth family (hidden 64*d,
d heads, head dim 64), and the block structure a config implies. No model code here, so a
config can be read, validated and counted without building a model (``sd3_jax.models.mmdit``
re-exports all of it)."""

from __future__ import annotations

import dataclasses
from typing import Iterator

from sd3_jax.models import mup
from sd3_jax.models.field_checks import check_config


@dataclasses.dataclass(frozen=True)
class MMDiTConfig:
  """Architecture of an MM-DiT; everything a checkpoint needs to be rebuilt.

  Attributes:
    depth: number of joint blocks d. Hidden size defaults to 64*d and heads to d (head dim 64).
    hidden_size / num_heads: override the 64*d / d rule (tiny test models).
    patch_size: latent patch side (2 for all released models).
    in_channels / out_channels: latent channels (16 for SD3).
    pooled_dim: width of the pooled text vector (2048 = CLIP-L 768 | CLIP-G 1280).
    context_dim: width of the text tokens (4096).
    pos_embed_max_size: side M of the positional grid (192 SD3 / SD3.5-large, 384 SD3.5-medium).
    qk_norm: RMSNorm on q and k per head (SD3.5).
    dual_attention_layers: blocks whose image stream adds a second, image-only self-attention
      (MMDiT-X, SD3.5-medium: 0..12).
    mlp_ratio: MLP hidden = mlp_ratio * hidden.
    pos_embed_base_size / pos_embed_scale: how a freshly initialised table places positions
      (sd3.5 ``mmditx.py``): the centre crop of base_size*scale patches spans 0..base_size.
    sample_size: metadata only, not used by the model: the latent side diffusers' config.json
      calls ``sample_size`` (its pipelines derive their default resolution from it). None means
      ``default_sample_size``; a converted checkpoint keeps its source's value.
    parametrization: 'sp' (standard) or 'mup' (models/mup.py: init, per-parameter Adam learning
      rates and attention scale follow muP relative to ``mup_base_width``).
    mup_base_width: the hidden size the hyperparameters were tuned at (muP only).
    mup_base_head_dim: the base model's head dimension (muP's attention scale sqrt(d_base)/d);
      None means mup_base_width / num_heads, a base with as many heads as this model. Set it to
      this model's head dim when widths grow by adding heads of a fixed size (the SD3 family).
  """

  depth: int
  hidden_size: int | None = None
  num_heads: int | None = None
  patch_size: int = 2
  in_channels: int = 16
  out_channels: int = 16
  pooled_dim: int = 2048
  context_dim: int = 4096
  pos_embed_max_size: int = 192
  qk_norm: bool = False
  dual_attention_layers: tuple[int, ...] = ()
  mlp_ratio: int = 4
  pos_embed_base_size: int = 16
  pos_embed_scale: float = 1.0
  sample_size: int | None = None
  parametrization: str = "sp"
  mup_base_width: int | None = None
  mup_base_head_dim: int | None = None

  def __post_init__(self):
    check_config(
      self,
      positive=(
        "depth",
        "hidden_size",
        "num_heads",
        "patch_size",
        "in_channels",
        "out_channels",
        "pooled_dim",
        "context_dim",
        "pos_embed_max_size",
        "mlp_ratio",
        "pos_embed_base_size",
        "sample_size",
        "mup_base_width",
        "mup_base_head_dim",
      ),
      non_negative=("dual_attention_layers",),
      positive_real=("pos_embed_scale",),
    )
    object.__setattr__(self, "dual_attention_layers", tuple(int(i) for i in self.dual_attention_layers))
    if self.hidden_size is None:
      object.__setattr__(self, "hidden_size", 64 * self.depth)
    if self.num_heads is None:
      object.__setattr__(self, "num_heads", self.depth)
    if self.depth < 1:
      raise ValueError(f"depth must be >= 1, got {self.depth}")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
    bad = [i for i in self.dual_attention_layers if not 0 <= i < self.depth]
    if bad:
      raise ValueError(f"dual_attention_layers {bad} outside 0..{self.depth - 1}")
    mup.scaling(self.parametrization, self.hidden_size, self.mup_base_width)  # raises on a bad value
    if self.parametrization == "mup" and self.mup_base_head_dim is None and self.mup_base_width % self.num_heads:
      raise ValueError(
        f"mup_base_width {self.mup_base_width} is not divisible by num_heads {self.num_heads}: set "
        "model.mup_base_head_dim to the base model's head dimension"
      )

  @property
  def mup_scaling(self) -> mup.Scaling:
    """The muP width multiplier and rules of this model (identity under 'sp')."""
    return mup.scaling(self.parametrization, self.hidden_size, self.mup_base_width)

  @property
  def attention_scale(self) -> float | None:
    """The attention logit scale, or None for the usual 1/sqrt(head_dim) (SP, or muP at the base
    head dimension)."""
    if self.parametrization != "mup":
      return None
    base = self.mup_base_head_dim or self.mup_base_width // self.num_heads
    return mup.attention_scale(self.head_dim, base)

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def default_sample_size(self) -> int:
    """diffusers' SD3 value (128 latents = 1024 px) unless the positional grid is smaller."""
    return min(128, self.pos_embed_max_size * self.patch_size)

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["dual_attention_layers"] = list(self.dual_attention_layers)
    return d

  @classmethod
  def from_dict(cls, d: dict) -> "MMDiTConfig":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
      raise ValueError(f"unknown MMDiTConfig keys {sorted(unknown)}; known: {sorted(known)}")
    return cls(**d)


def config_for_depth(depth: int, **overrides) -> MMDiTConfig:
  """The paper's scaling family: hidden 64*d, heads d, head dim 64."""
  return MMDiTConfig(depth=depth, **overrides)


PRESETS: dict[str, MMDiTConfig] = {
  "sd3-medium": MMDiTConfig(depth=24),
  "sd3.5-large": MMDiTConfig(depth=38, qk_norm=True),
  "sd3.5-medium": MMDiTConfig(depth=24, qk_norm=True, dual_attention_layers=tuple(range(13)), pos_embed_max_size=384),
}


def get_config(name: str) -> MMDiTConfig:
  """A named preset ('sd3-medium', 'sd3.5-large', 'sd3.5-medium') or 'd<N>' for the family."""
  if name in PRESETS:
    return PRESETS[name]
  if name.startswith("d") and name[1:].isdigit():
    return config_for_depth(int(name[1:]))
  raise ValueError(f"unknown model {name!r}; choose one of {sorted(PRESETS)} or d<depth> (e.g. d24)")


def config_from_preset(preset: str, **overrides) -> MMDiTConfig:
  """A preset ('sd3-medium', 'd24', ...) with the non-None ``overrides`` on top: the
  experiment config's ``model`` section (``config_from_preset(**config.model)``). Overriding
  ``depth`` alone re-derives the family's width (hidden 64*d, d heads)."""
  base = get_config(preset).to_dict()
  overrides = {k: v for k, v in overrides.items() if v is not None}
  if "depth" in overrides:  # re-derive the family's width unless given explicitly
    base.pop("hidden_size"), base.pop("num_heads")
  return MMDiTConfig.from_dict({**base, **overrides})


def block_segments(config: MMDiTConfig) -> list[tuple[int, int, bool]]:
  """Runs [start, stop) of consecutive blocks 0..d-2 with equal structure, and whether dual.

  The last block (context stream pre-only) is never part of a run.
  """
  segs: list[tuple[int, int, bool]] = []
  for i in range(config.depth - 1):
    dual = i in config.dual_attention_layers
    if segs and segs[-1][2] == dual and segs[-1][1] == i:
      segs[-1] = (segs[-1][0], i + 1, dual)
    else:
      segs.append((i, i + 1, dual))
  return segs


def iter_blocks(config: MMDiTConfig) -> Iterator[tuple[int, bool, bool]]:
  """(index, dual, context_pre_only) for every joint block."""
  for i in range(config.depth):
    yield i, i in config.dual_attention_layers, i == config.depth - 1
