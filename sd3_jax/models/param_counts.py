"""Parameter counts of every backbone in closed form (no model is built, nothing is allocated); they
agree with the modules' trees (``backbones.count_params``, tests/test_backbones.py).

``param_counts(config)`` -> {'total', 'non_embedding', 'embedding', 'pos_embed'}:
  non_embedding  the blocks that grow with depth (transformer blocks; UViT: also its conv
                 stages), as Kaplan et al. 2020 count
  embedding      patch / timestep / pooled-text / text-token embedders and the final layer
                 (UViT: conv_in, the embedders and the final conv layer)
  total          both, without the fixed positional table
  pos_embed      the fixed sin-cos table (no gradient), reported apart

With h hidden, r mlp ratio, Dh head dim, every Dense with a bias (n_in*n_out + n_out):
  stream (MM-DiT stream, DiT block)   18h^2 + 15h at r=4 (adaLN 6h^2, qkv 3h^2, proj h^2, MLP 8h^2)
                                      + 2 Dh with qk-norm
  pre-only text stream                adaLN 2h^2 + qkv 3h^2 (+ 5h biases, + 2 Dh)
  MMDiT-X dual layer                  + 3h^2 adaLN + qkv 3h^2 + proj h^2 (+ biases, 2 Dh)
  CrossDiT block                      a stream + q h^2 + kv 2h^2 + proj h^2 (+ 4h biases, + 2 Dh)
  UViT res block (Cin -> C)           adaLN 3hC + 9 Cin C + 9 C^2 (+ Cin C skip when Cin != C)
"""

from __future__ import annotations

from sd3_jax.models.mmdit_config import MMDiTConfig, uvit_widths

TIMESTEP_FREQ_DIM = 256  # width of the sinusoidal timestep features (layers.timestep_embedding)


def _dense(n_in: int, n_out: int) -> int:
  return n_in * n_out + n_out  # kernel + bias (every Dense of the models has a bias)


def _conv(k: int, n_in: int, n_out: int) -> int:
  return k * k * n_in * n_out + n_out


def _attention(h: int, head_dim: int, qk_norm: bool, has_proj: bool) -> int:
  return _dense(h, 3 * h) + (2 * head_dim if qk_norm else 0) + (_dense(h, h) if has_proj else 0)


def stream(config: MMDiTConfig, pre_only: bool = False, dual: bool = False) -> int:
  """One MM-DiT stream (the DiT block is a full one)."""
  h, r = config.hidden_size, config.mlp_ratio
  n_mods = 2 if pre_only else (9 if dual else 6)
  n = _dense(h, n_mods * h) + _attention(h, config.head_dim, config.qk_norm, not pre_only)
  if dual:
    n += _attention(h, config.head_dim, config.qk_norm, True)
  if not pre_only:
    n += _dense(h, r * h) + _dense(r * h, h)
  return n


def _res_block(h: int, n_in: int, n_out: int) -> int:
  return (
    _dense(h, 3 * n_out)
    + _conv(3, n_in, n_out)
    + _conv(3, n_out, n_out)
    + (_dense(n_in, n_out) if n_in != n_out else 0)
  )


def _uvit_conv_stages(config: MMDiTConfig) -> int:
  h, widths, n_res = config.hidden_size, uvit_widths(config), config.uvit_res_blocks
  total = 0
  for s, c in enumerate(widths):
    wider = widths[s + 1] if s + 1 < len(widths) else h
    total += n_res * _res_block(h, c, c) + _dense(4 * c, wider)  # down blocks, 2x2 patch conv down
    total += _dense(wider, 4 * c) + (n_res + 1) * _res_block(h, 2 * c, c)  # transposed conv up, up blocks
  return total


def param_counts(config: MMDiTConfig) -> dict[str, int]:
  """Parameters of the backbone of ``config`` by part, in closed form (see the module docstring)."""
  h, p, d, bb = config.hidden_size, config.patch_size, config.depth, config.backbone
  cond = _dense(TIMESTEP_FREQ_DIM, h) + _dense(h, h) + _dense(config.pooled_dim, h) + _dense(h, h)  # t, y embedders
  text = _dense(config.context_dim, h) * (2 if bb == "mmdit3" else 1)
  patch_and_final = _dense(p * p * config.in_channels, h) + _dense(h, 2 * h) + _dense(h, p * p * config.out_channels)
  if bb in ("mmdit", "mmdit3"):
    n_text = len(config.text_streams)
    blocks = sum(
      n_text * stream(config, pre_only=i == d - 1) + stream(config, dual=i in config.dual_attention_layers)
      for i in range(d)
    )
    embedding = patch_and_final + cond + text
  elif bb == "dit":
    blocks, embedding = d * stream(config), patch_and_final + cond + text
  elif bb == "crossdit":
    cross = _dense(h, h) + _dense(h, 2 * h) + _dense(h, h) + (2 * config.head_dim if config.qk_norm else 0)
    blocks, embedding = d * (stream(config) + cross), patch_and_final + cond + text
  else:  # uvit
    c0 = uvit_widths(config)[0]
    blocks = d * stream(config) + _uvit_conv_stages(config)
    embedding = _conv(3, config.in_channels, c0) + cond + text + _dense(h, 2 * c0) + _conv(3, c0, config.out_channels)
  return {
    "total": blocks + embedding,
    "non_embedding": blocks,
    "embedding": embedding,
    "pos_embed": config.pos_embed_max_size**2 * h,
  }
