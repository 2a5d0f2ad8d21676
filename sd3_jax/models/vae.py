"""The SD3 16-channel autoencoder (the paper, section 5.2.1), NHWC, parameter names mirroring diffusers.

``AutoencoderKL(config)`` is diffusers' AutoencoderKL with ``use_quant_conv=False,
use_post_quant_conv=False`` (the LDM encoder/decoder with ch_mult, GroupNorm(eps 1e-6), SiLU and
a mid block with one single-head attention). Images are [B,H,W,3] in [-1, 1]; latents are
[B,H/8,W/8,16] for the SD3 preset.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import linen as nn

from sd3_jax.models import layers as L
from sd3_jax.models.field_checks import check_config

Dtype = Any

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0
_IN, _OUT = "vae_in", "vae_out"


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """Architecture of the autoencoder and its latent normalisation.

  Attributes:
    in_channels / out_channels: image channels (3).
    latent_channels: channels of the latent (16 for SD3); the encoder outputs twice as many.
    block_out_channels: channels per resolution level; len - 1 stride-2 downsamplings.
    layers_per_block: resnets per encoder level (the decoder has one more per level).
    norm_num_groups: GroupNorm groups (eps 1e-6 everywhere).
    scaling_factor / shift_factor: the latent normalisation z = (x - shift) * scale.
  """

  in_channels: int = 3
  out_channels: int = 3
  latent_channels: int = 16
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  norm_num_groups: int = 32
  scaling_factor: float = 1.5305
  shift_factor: float = 0.0609

  def __post_init__(self):
    check_config(
      self,
      positive=(
        "in_channels",
        "out_channels",
        "latent_channels",
        "block_out_channels",
        "layers_per_block",
        "norm_num_groups",
      ),
    )
    object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
    if not self.block_out_channels:
      raise ValueError("block_out_channels must name at least one level")
    if self.layers_per_block < 1:
      raise ValueError(f"layers_per_block must be >= 1, got {self.layers_per_block}")
    bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
    if bad:
      raise ValueError(
        f"block_out_channels {list(self.block_out_channels)}: {bad} not divisible by "
        f"norm_num_groups={self.norm_num_groups}"
      )
    if min(self.in_channels, self.out_channels, self.latent_channels) < 1:
      raise ValueError("in_channels, out_channels and latent_channels must be positive")
    if self.scaling_factor == 0:
      raise ValueError("scaling_factor must be non-zero")

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["block_out_channels"] = list(self.block_out_channels)
    return d

  @classmethod
  def from_dict(cls, d: Mapping) -> "VAEConfig":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
      raise ValueError(f"unknown VAEConfig keys {sorted(unknown)}; known: {sorted(known)}")
    return cls(**d)

  @classmethod
  def from_diffusers_config(cls, d: Mapping) -> "VAEConfig":
    """From a diffusers AutoencoderKL config.json dict (missing keys take diffusers' defaults).

    Raises ValueError for anything this model does not implement: quant convs, other block
    types or activations, no mid-block attention, per-channel latents_mean/std, unknown keys.
    """
    unknown = sorted(k for k in d if not k.startswith("_") and k not in _DIFFUSERS_DEFAULTS)
    if unknown:
      raise ValueError(
        f"diffusers VAE config: unknown keys {unknown}; this AutoencoderKL understands {sorted(_DIFFUSERS_DEFAULTS)}"
      )
    cls_name = d.get("_class_name", "AutoencoderKL")
    if cls_name != "AutoencoderKL":
      raise ValueError(f"diffusers VAE config: _class_name is {cls_name!r}, expected 'AutoencoderKL'")
    c = {**_DIFFUSERS_DEFAULTS, **{k: v for k, v in d.items() if not k.startswith("_")}}
    for k in ("use_quant_conv", "use_post_quant_conv", "mid_block_add_attention", "force_upcast"):
      if not isinstance(c[k], bool):
        raise ValueError(f"diffusers VAE config: {k} must be true or false, got {c[k]!r}")
    for k in ("block_out_channels", "down_block_types", "up_block_types"):
      if isinstance(c[k], (str, bytes)) or not isinstance(c[k], (list, tuple)):
        raise ValueError(f"diffusers VAE config: {k} must be a list, got {c[k]!r}")
    problems = []
    for k in ("use_quant_conv", "use_post_quant_conv"):
      if c[k]:
        problems.append(
          f"{k}=True (the SD3 VAE has no quant/post-quant 1x1 convs; set it to false "
          "only if the checkpoint really has no quant_conv weights)"
        )
    n = len(c["block_out_channels"])
    for k, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
      types = list(c[k])
      if types != [want] * n:
        problems.append(f"{k}={types} (supported: {n} x {want!r}, one per block_out_channels entry)")
    if c["act_fn"] != "silu":
      problems.append(f"act_fn={c['act_fn']!r} (only 'silu')")
    if not c["mid_block_add_attention"]:
      problems.append("mid_block_add_attention=False (the mid block always has one attention)")
    for k in ("latents_mean", "latents_std"):
      if c[k] is not None:
        problems.append(
          f"{k} is set (per-channel latent statistics are not supported; SD3 uses scaling_factor/shift_factor)"
        )
    if problems:
      raise ValueError("unsupported diffusers AutoencoderKL config:\n  " + "\n  ".join(problems))
    # No int()/float() casts: "3" or 3.5 in a config.json is an error (check_config names it).
    return cls(
      in_channels=c["in_channels"],
      out_channels=c["out_channels"],
      latent_channels=c["latent_channels"],
      block_out_channels=tuple(c["block_out_channels"]),
      layers_per_block=c["layers_per_block"],
      norm_num_groups=c["norm_num_groups"],
      scaling_factor=c["scaling_factor"],
      shift_factor=0.0 if c["shift_factor"] is None else c["shift_factor"],
    )  # None: no shift


# diffusers.AutoencoderKL.__init__ defaults (0.42), used for keys a config.json leaves out.
_DIFFUSERS_DEFAULTS = {
  "in_channels": 3,
  "out_channels": 3,
  "down_block_types": ("DownEncoderBlock2D",),
  "up_block_types": ("UpDecoderBlock2D",),
  "block_out_channels": (64,),
  "layers_per_block": 1,
  "act_fn": "silu",
  "latent_channels": 4,
  "norm_num_groups": 32,
  "sample_size": 32,
  "scaling_factor": 0.18215,
  "shift_factor": None,
  "latents_mean": None,
  "latents_std": None,
  "force_upcast": True,
  "use_quant_conv": True,
  "use_post_quant_conv": True,
  "mid_block_add_attention": True,
}

SD3_VAE = VAEConfig()
# Tiny twin for CPU tests: two levels (f=2), 8 groups.
TINY_VAE = VAEConfig(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8)
PRESETS: dict[str, VAEConfig] = {"sd3": SD3_VAE, "tiny": TINY_VAE}


def get_config(name: str) -> VAEConfig:
  if name not in PRESETS:
    raise ValueError(f"unknown VAE {name!r}; choose one of {sorted(PRESETS)}")
  return PRESETS[name]


# --------------------------------------------------------------------------------------------
# Layers


class Conv(nn.Module):
  """k x k convolution, NHWC, kernel [k, k, in, out]; ``padding`` ((top, bottom), (left, right))."""

  features: int
  kernel_size: int = 3
  stride: int = 1
  padding: tuple[tuple[int, int], tuple[int, int]] = ((1, 1), (1, 1))
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC):
    k, cin = self.kernel_size, x_BxHxWxC.shape[-1]
    # torch's default Conv2d init (uniform, bound 1/sqrt(fan_in)).
    init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
    kernel = self.param(
      "kernel",
      nn.with_logical_partitioning(init, (None, None, _IN, _OUT)),
      (k, k, cin, self.features),
      self.param_dtype,
    )
    bias = self.param(
      "bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), (_OUT,)), (self.features,), self.param_dtype
    )
    y = jax.lax.conv_general_dilated(
      x_BxHxWxC.astype(self.dtype),
      kernel.astype(self.dtype),
      (self.stride, self.stride),
      self.padding,
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    return y + bias.astype(self.dtype)


class GroupNorm(nn.Module):
  """GroupNorm over (H, W, channels of a group) with affine scale/bias, all in float32."""

  num_groups: int
  eps: float = 1e-6

  @nn.compact
  def __call__(self, x_BxHxWxC):
    b, h, w, c = x_BxHxWxC.shape
    g = self.num_groups
    if c % g:
      raise ValueError(f"GroupNorm: {c} channels are not divisible by {g} groups")
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), (_OUT,)), (c,), jnp.float32)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), (_OUT,)), (c,), jnp.float32)
    x = x_BxHxWxC.astype(jnp.float32).reshape(b, h, w, g, c // g)  # channel groups are contiguous
    mean = jnp.mean(x, axis=(1, 2, 4), keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=(1, 2, 4), keepdims=True)
    y = ((x - mean) * jax.lax.rsqrt(var + self.eps)).reshape(b, h, w, c)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x_BxHxWxC.dtype)


class ResnetBlock(nn.Module):
  """norm1 -> SiLU -> conv1 -> norm2 -> SiLU -> conv2, plus x (1x1 conv_shortcut when in != out)."""

  features: int
  groups: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = nn.silu(GroupNorm(self.groups, name="norm1")(x))
    h = Conv(self.features, dtype=self.dtype, name="conv1")(h)
    h = nn.silu(GroupNorm(self.groups, name="norm2")(h))
    h = Conv(self.features, dtype=self.dtype, name="conv2")(h)
    if x.shape[-1] != self.features:
      x = Conv(self.features, 1, padding=((0, 0), (0, 0)), dtype=self.dtype, name="conv_shortcut")(x)
    return x + h


class Attention(nn.Module):
  """diffusers' mid-block Attention: GroupNorm, one head over all channels, residual."""

  groups: int
  dtype: Dtype = jnp.float32
  attention_impl: str = "xla"

  @nn.compact
  def __call__(self, x_BxHxWxC):
    b, h, w, c = x_BxHxWxC.shape
    t = GroupNorm(self.groups, name="group_norm")(x_BxHxWxC).reshape(b, h * w, 1, c)  # [B,L,1 head,C]
    dense = functools.partial(L.Dense, c, (_IN, _OUT), dtype=self.dtype)
    q, k, v = dense(name="to_q")(t), dense(name="to_k")(t), dense(name="to_v")(t)
    a = L.dot_product_attention(q, k, v, self.attention_impl)  # softmax(q k^T / sqrt(C))
    out = dense(name="to_out_0")(a.reshape(b, h * w, c))
    return x_BxHxWxC + out.reshape(b, h, w, c).astype(x_BxHxWxC.dtype)


class MidBlock(nn.Module):
  groups: int
  dtype: Dtype = jnp.float32
  attention_impl: str = "xla"

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    x = ResnetBlock(c, self.groups, self.dtype, name="resnets_0")(x)
    x = Attention(self.groups, self.dtype, self.attention_impl, name="attentions_0")(x)
    return ResnetBlock(c, self.groups, self.dtype, name="resnets_1")(x)


class Downsample(nn.Module):
  """Pad right/bottom by one, then 3x3 stride-2 conv with no padding (as diffusers' ``Downsample2D``).

  Not ``padding=1``: that shifts the sampling grid by one pixel (and gives a different output
  size for odd inputs). Output side = floor((n + 1 - 3) / 2) + 1 = floor(n / 2).
  """

  features: int
  dtype: Dtype = jnp.float32

  PADDING = ((0, 1), (0, 1))

  @nn.compact
  def __call__(self, x):
    return Conv(self.features, 3, stride=2, padding=self.PADDING, dtype=self.dtype, name="conv")(x)


class Upsample(nn.Module):
  """Nearest-neighbour x2, then a 3x3 conv."""

  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC):
    x = jnp.repeat(jnp.repeat(x_BxHxWxC, 2, axis=1), 2, axis=2)  # [B, 2H, 2W, C]
    return Conv(self.features, dtype=self.dtype, name="conv")(x)


class DownBlock(nn.Module):
  """``layers_per_block`` resnets, then (all but the last level) the stride-2 downsampler."""

  features: int
  num_layers: int
  groups: int
  add_downsample: bool
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    for j in range(self.num_layers):
      x = ResnetBlock(self.features, self.groups, self.dtype, name=f"resnets_{j}")(x)
    if self.add_downsample:
      x = Downsample(self.features, self.dtype, name="downsamplers_0")(x)
    return x


class UpBlock(nn.Module):
  """``layers_per_block + 1`` resnets, then (all but the last level) the x2 upsampler."""

  features: int
  num_layers: int
  groups: int
  add_upsample: bool
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    for j in range(self.num_layers):
      x = ResnetBlock(self.features, self.groups, self.dtype, name=f"resnets_{j}")(x)
    if self.add_upsample:
      x = Upsample(self.features, self.dtype, name="upsamplers_0")(x)
    return x


class Encoder(nn.Module):
  """images [B,H,W,in] -> moments [B,h,w,2*latent] (mean, logvar), h = ceil(H / 2^(levels-1))."""

  config: VAEConfig
  dtype: Dtype = jnp.float32
  attention_impl: str = "xla"

  @nn.compact
  def __call__(self, x):
    cfg, g = self.config, self.config.norm_num_groups
    chans = cfg.block_out_channels
    x = Conv(chans[0], dtype=self.dtype, name="conv_in")(x.astype(self.dtype))
    for i, c in enumerate(chans):
      x = DownBlock(c, cfg.layers_per_block, g, i < len(chans) - 1, self.dtype, name=f"down_blocks_{i}")(x)
    x = MidBlock(g, self.dtype, self.attention_impl, name="mid_block")(x)
    x = nn.silu(GroupNorm(g, name="conv_norm_out")(x))
    return Conv(2 * cfg.latent_channels, dtype=self.dtype, name="conv_out")(x)


class Decoder(nn.Module):
  """latents [B,h,w,latent] -> images [B,h*f,w*f,out]; up_blocks_0 is the deepest level."""

  config: VAEConfig
  dtype: Dtype = jnp.float32
  attention_impl: str = "xla"

  @nn.compact
  def __call__(self, z):
    cfg, g = self.config, self.config.norm_num_groups
    chans = cfg.block_out_channels[::-1]
    x = Conv(chans[0], dtype=self.dtype, name="conv_in")(z.astype(self.dtype))
    x = MidBlock(g, self.dtype, self.attention_impl, name="mid_block")(x)
    for i, c in enumerate(chans):
      x = UpBlock(c, cfg.layers_per_block + 1, g, i < len(chans) - 1, self.dtype, name=f"up_blocks_{i}")(x)
    x = nn.silu(GroupNorm(g, name="conv_norm_out")(x))
    return Conv(cfg.out_channels, dtype=self.dtype, name="conv_out")(x)


# --------------------------------------------------------------------------------------------
# The model


class AutoencoderKL(nn.Module):
  """The autoencoder. ``dtype`` is the compute dtype (parameters stay float32; GroupNorm and the
  attention softmax run in float32). Every method returns float32. ``attention_impl``: the mid
  block's attention, 'xla' (explicit float32 softmax; its logits are [B, (H/f*W/f)^2], 1 GiB per
  1024^2 image) or 'cudnn' / 'auto' (fused, see layers.dot_product_attention).

  Call a method with ``model.apply({'params': params}, x, method=model.encode)`` (or
  ``method='latents_from_images'`` ...). ``__call__`` reconstructs images (used by init).

  The SD3 latent normalisation lives in ONE place, ``latents_from_images`` / ``images_from_latents``:

    encode:  z = (sample - shift_factor) * scaling_factor     sample = mean + exp(logvar/2) * eps
    decode:  images = decoder(z / scaling_factor + shift_factor)

  with shift 0.0609 and scale 1.5305 for SD3 (``VAEConfig``). ``encode`` / ``decode`` are the raw
  (unnormalised) encoder and decoder, as diffusers' ``encode(x).latent_dist`` and ``decode(z)``.

  Parameter tree (kernels [kh, kw, in, out] / [in, out]; GroupNorm scale, bias):
    encoder/conv_in
    encoder/down_blocks_{i}/resnets_{j}/{norm1, conv1, norm2, conv2, conv_shortcut (in != out)}
    encoder/down_blocks_{i}/downsamplers_0/conv               (all but the last level)
    {encoder,decoder}/mid_block/{resnets_0, attentions_0/{group_norm, to_q, to_k, to_v, to_out_0},
                                 resnets_1}
    encoder/conv_norm_out, encoder/conv_out                     (2 * latent_channels: mean, logvar)
    decoder/conv_in
    decoder/up_blocks_{i}/resnets_{j} (j < layers_per_block + 1), up_blocks_{i}/upsamplers_0/conv
    decoder/conv_norm_out, decoder/conv_out
  up_blocks_0 is the deepest level (channels reversed), as in diffusers; the original LDM file
  numbers it decoder.up.{n-1} (sd3_jax/convert/vae_keys.py maps both).

  Logical axis names: conv and linear kernels (None, None, 'vae_in', 'vae_out') / ('vae_in',
  'vae_out'), biases and norm parameters ('vae_out',). They are not in sharding.LOGICAL_RULES, so
  the (small, frozen) VAE is replicated unless a rule is added there.
  """

  config: VAEConfig
  dtype: Dtype = jnp.float32
  attention_impl: str = "xla"

  def setup(self):
    self.encoder = Encoder(self.config, self.dtype, self.attention_impl)
    self.decoder = Decoder(self.config, self.dtype, self.attention_impl)

  def encode(self, images_BxHxWxC: jax.Array) -> tuple[jax.Array, jax.Array]:
    """images in [-1, 1] -> (mean, logvar) of the diagonal Gaussian, each [B,h,w,latent]; logvar
    clamped to [-30, 20]. No normalisation (that is ``latents_from_images``)."""
    cfg = self.config
    if images_BxHxWxC.ndim != 4 or images_BxHxWxC.shape[-1] != cfg.in_channels:
      raise ValueError(f"images must be NHWC [B,H,W,{cfg.in_channels}] in [-1, 1], got shape {images_BxHxWxC.shape}")
    moments = self.encoder(images_BxHxWxC).astype(jnp.float32)
    mean, logvar = jnp.split(moments, 2, axis=-1)  # channel order: mean first, as diffusers
    return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)

  def decode(self, latents_BxhxwxC: jax.Array) -> jax.Array:
    """Raw (unnormalised) latents -> images (roughly [-1, 1], not clipped)."""
    cfg = self.config
    if latents_BxhxwxC.ndim != 4 or latents_BxhxwxC.shape[-1] != cfg.latent_channels:
      raise ValueError(f"latents must be NHWC [B,h,w,{cfg.latent_channels}], got shape {latents_BxhxwxC.shape}")
    return self.decoder(latents_BxhxwxC).astype(jnp.float32)

  def latents_from_images(self, images_BxHxWxC: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    """Images -> the NORMALISED latents the MM-DiT sees: (sample - shift) * scale.

    sample = mean + exp(logvar / 2) * eps with eps ~ N(0, 1) from ``rng``; the mean when
    ``rng`` is None (deterministic encoding).
    """
    mean, logvar = self.encode(images_BxHxWxC)
    sample = mean
    if rng is not None:
      sample = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, jnp.float32)
    return (sample - self.config.shift_factor) * self.config.scaling_factor

  def images_from_latents(self, z_BxhxwxC: jax.Array) -> jax.Array:
    """NORMALISED latents (the MM-DiT's space) -> images: decode(z / scale + shift)."""
    z = z_BxhxwxC.astype(jnp.float32)
    return self.decode(z / self.config.scaling_factor + self.config.shift_factor)

  def __call__(self, images_BxHxWxC: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    return self.images_from_latents(self.latents_from_images(images_BxHxWxC, rng))


# --------------------------------------------------------------------------------------------
# Helpers


def init_params(model: AutoencoderKL, rng: jax.Array, boxed: bool = False):
  """Initialise parameters (float32). ``boxed`` keeps the nn.Partitioned logical-axis boxes."""
  side = model.config.downsample_factor
  images = jnp.zeros((1, side, side, model.config.in_channels), jnp.float32)
  params = model.init(rng, images)["params"]
  return params if boxed else nn.unbox(params)


def abstract_params(model: AutoencoderKL):
  """Shapes, dtypes and logical axes of the parameters without allocating them."""
  return jax.eval_shape(functools.partial(init_params, model, boxed=True), jax.random.key(0))
