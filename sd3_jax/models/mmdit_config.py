"""The configuration of the MM-DiT and of the other backbones of the paper's study (DiT, CrossDiT,
UViT, MM-DiT with three weight sets): ``MMDiTConfig``, the presets, the depth family (hidden
64*d, d heads, head dim 64), the block structure a config implies and the checks of a model's
inputs. No model code here, so a config can be read, validated and counted without building a
model (``sd3_jax.models.mmdit`` re-exports all of it; ``sd3_jax.models.backbones`` builds any)."""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

from sd3_jax.models import mup
from sd3_jax.models.field_checks import check_config

# The backbones of the paper's architecture study (section 5.2.3); docs/backbones.md.
BACKBONES = ("mmdit", "mmdit3", "dit", "crossdit", "uvit")


@dataclasses.dataclass(frozen=True)
class MMDiTConfig:
  """Architecture of an MM-DiT (or of another backbone); everything a checkpoint needs to be rebuilt.

  Attributes:
    backbone: 'mmdit' (image and text streams, joint attention), 'mmdit3' (image, CLIP and T5
      streams), 'dit' (one weight set over the text+image sequence), 'crossdit' (image tokens
      with cross-attention to the text) or 'uvit' (convolutional stages around DiT blocks);
      docs/backbones.md.
    depth: number of transformer blocks d. Hidden size defaults to 64*d and heads to d (head dim 64).
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
    clip_tokens: 'mmdit3' only: context rows [0, clip_tokens) are the CLIP tokens, the rest T5
      (flow.TextLayout).
    uvit_res_blocks: 'uvit' only: residual conv blocks per stage on the way down (one more on
      the way up). A UViT has log2(patch_size) conv stages (``uvit_widths``).
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
  backbone: str = "mmdit"
  clip_tokens: int = 77
  uvit_res_blocks: int = 2
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
        "clip_tokens",
        "mup_base_width",
        "mup_base_head_dim",
      ),
      non_negative=("dual_attention_layers", "uvit_res_blocks"),
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
    if self.backbone not in BACKBONES:
      raise ValueError(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
    if self.dual_attention_layers and self.backbone not in ("mmdit", "mmdit3"):
      raise ValueError(
        f"dual_attention_layers (MMDiT-X) exist for the MM-DiT backbones only, not {self.backbone!r}; leave them empty"
      )
    if self.backbone == "uvit":
      stages = self.patch_size.bit_length() - 1
      if self.patch_size != 2**stages or stages < 1:
        raise ValueError(
          f"a UViT has one 2x conv stage per factor 2 of patch_size, so patch_size must be a power of 2 "
          f">= 2, got {self.patch_size}"
        )
      if self.hidden_size % (2 ** (stages + 1)):
        raise ValueError(
          f"UViT conv widths are hidden_size/4, /8, ... ({stages} stages): hidden_size {self.hidden_size} "
          f"must be divisible by {2 ** (stages + 1)}"
        )
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
  def text_streams(self) -> tuple[str, ...]:
    """The MM-DiT backbones' text streams (the names of their blocks' text sub-blocks)."""
    return {"mmdit": ("context_block",), "mmdit3": ("clip_block", "t5_block")}.get(self.backbone, ())

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


def scan_segments(config: MMDiTConfig) -> tuple[str, list[tuple[int, int]]]:
  """(prefix, runs) of any backbone: its transformer blocks are ``{prefix}{i}`` in the unscanned
  layout, and each run [start, stop) of identical blocks is stacked under
  ``scan_blocks_{start}_{stop}`` in the scanned layout. A last block that differs from the
  others (the MM-DiTs' pre-only text streams; the DiT's and UViT's, whose text outputs are
  dropped) stays unscanned."""
  if config.backbone in ("mmdit", "mmdit3"):
    return "joint_blocks_", [(start, stop) for start, stop, _ in block_segments(config)]
  if config.backbone == "crossdit":  # no text stream: every block is the same
    return "blocks_", [(0, config.depth)]
  return "blocks_", [(0, config.depth - 1)] if config.depth > 1 else []


def uvit_widths(config: MMDiTConfig) -> tuple[int, ...]:
  """Channels of a UViT's conv stages, highest resolution first: log2(patch_size) stages, the one
  beside the transformer at hidden/4 (its feature map holds as many numbers as the token grid),
  halving at each stage further up, as U-Nets do."""
  stages = config.patch_size.bit_length() - 1
  return tuple(config.hidden_size // 2 ** (stages + 1 - s) for s in range(stages))


def check_inputs(
  config: MMDiTConfig, x: Sequence[int], t: Sequence[int], pooled: Sequence[int], context: Sequence[int]
) -> None:
  """The shapes of a backbone's inputs (x NHWC latents, t [B], pooled [B, P], context [B, L, D]);
  a ValueError names the first that does not fit."""
  cfg = config
  if len(x) != 4 or x[-1] != cfg.in_channels:
    raise ValueError(f"x must be NHWC latents [B,H,W,{cfg.in_channels}], got shape {tuple(x)}")
  b, hh, ww, _ = x
  p = cfg.patch_size
  if hh % p or ww % p:
    raise ValueError(f"latent height and width must be divisible by the patch size {p}, got {hh}x{ww}")
  if tuple(t) != (b,):
    raise ValueError(f"t must have shape [B]=({b},) of flow times in [0, 1], got {tuple(t)}")
  if tuple(pooled) != (b, cfg.pooled_dim):
    raise ValueError(f"pooled must have shape [B, {cfg.pooled_dim}] = ({b}, {cfg.pooled_dim}), got {tuple(pooled)}")
  if len(context) != 3 or context[0] != b or context[-1] != cfg.context_dim:
    raise ValueError(f"context must have shape [B, L, {cfg.context_dim}] with B={b}, got {tuple(context)}")
  if cfg.backbone == "mmdit3" and context[1] <= cfg.clip_tokens:
    raise ValueError(
      f"backbone 'mmdit3' reads context rows [0, {cfg.clip_tokens}) as CLIP tokens and the rest as T5 tokens, "
      f"but the context has {context[1]} rows; give CLIP and T5 tokens (or set model.clip_tokens to the layout's)"
    )
