"""Our MMDiT against diffusers' SD3Transformer2DModel, weights converted by sd3_jax.convert.

Every weight of the torch model (zero-initialised adaLN and output layers, the positional table
and the qk-norm scales included) is random, so each block, both streams and the final layer
contribute to the output. Both conversion routes are checked: the diffusers directory, and
diffusers -> original single file -> jax.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import SD3Transformer2DModel

from sd3_jax.storage import pretrained
from sd3_jax.convert import convert

BASE = dict(
  sample_size=16,
  patch_size=2,
  in_channels=4,
  out_channels=4,
  num_layers=2,
  attention_head_dim=16,
  num_attention_heads=2,
  joint_attention_dim=24,
  caption_projection_dim=32,
  pooled_projection_dim=16,
  pos_embed_max_size=8,
)
CASES = {
  # name: (diffusers config, latent H, W, batch, flow times)
  "sd3": (BASE, 8, 12, 3, [0.0, 0.37, 1.0]),
  "qk_norm": (
    {**BASE, "attention_head_dim": 8, "num_attention_heads": 4, "qk_norm": "rms_norm"},
    12,
    6,
    2,
    [0.05, 0.9],
  ),
  "dual_attention": (
    {
      **BASE,
      "num_layers": 3,
      "attention_head_dim": 8,
      "num_attention_heads": 4,
      "qk_norm": "rms_norm",
      "dual_attention_layers": (0, 2),
    },
    16,
    10,
    2,
    [0.5, 0.25],
  ),
  "patch1_uncropped": ({**BASE, "patch_size": 1, "pos_embed_max_size": 12, "out_channels": 6}, 12, 12, 1, [0.7]),
  "patch1_cropped": ({**BASE, "patch_size": 1, "pos_embed_max_size": 16, "num_layers": 3}, 10, 14, 2, [0.999, 0.001]),
}


def random_diffusers_model(kwargs, seed=0):
  torch.manual_seed(seed)
  model = SD3Transformer2DModel(**kwargs).eval()
  with torch.no_grad():
    for _, t in list(model.named_parameters()) + list(model.named_buffers()):
      t.normal_(0.0, 0.05)
  return model


def rel_err(a, b):
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_diffusers(case, tmp_path):
  kwargs, hh, ww, b, ts = CASES[case]
  torch_model = random_diffusers_model(kwargs)
  torch_model.save_pretrained(tmp_path / "diffusers")

  cfg = convert(tmp_path / "diffusers", tmp_path / "jax", "jax")
  assert cfg.depth == kwargs["num_layers"] and cfg.num_heads == kwargs["num_attention_heads"]
  assert cfg.qk_norm == (kwargs.get("qk_norm") == "rms_norm")
  assert cfg.dual_attention_layers == tuple(kwargs.get("dual_attention_layers", ()))
  model, params = pretrained.load_pretrained(tmp_path / "jax")

  # The original single-file route gives the very same parameters.
  convert(tmp_path / "diffusers", tmp_path / "sd3.safetensors", "sd3")
  convert(tmp_path / "sd3.safetensors", tmp_path / "jax2", "jax")
  model2, params2 = pretrained.load_pretrained(tmp_path / "jax2")
  assert model2.config == model.config
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

  rng = np.random.default_rng(1)
  c_in = kwargs["in_channels"]
  x_nchw = rng.standard_normal((b, c_in, hh, ww)).astype(np.float32)
  context = rng.standard_normal((b, 7, kwargs["joint_attention_dim"])).astype(np.float32)
  pooled = rng.standard_normal((b, kwargs["pooled_projection_dim"])).astype(np.float32)
  t = np.asarray(ts, np.float32)
  with torch.no_grad():
    want = torch_model(
      hidden_states=torch.from_numpy(x_nchw),
      encoder_hidden_states=torch.from_numpy(context),
      pooled_projections=torch.from_numpy(pooled),
      timestep=torch.from_numpy(1000.0 * t),
    ).sample.numpy()
  assert float(np.std(want)) > 0.01  # not a vacuous comparison

  apply = jax.jit(model.apply)
  for p in (params, params2):
    got = apply(
      {"params": p},
      jnp.asarray(x_nchw.transpose(0, 2, 3, 1)),
      jnp.asarray(t),
      jnp.asarray(pooled),
      jnp.asarray(context),
    )
    got = np.asarray(got).transpose(0, 3, 1, 2)
    assert got.shape == want.shape
    assert rel_err(got, want) < 1e-5, rel_err(got, want)
