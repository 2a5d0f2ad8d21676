"""Our VAE against diffusers' AutoencoderKL (SD3 style: no quant convs, shift/scale), weights
converted by tools/convert_weights/vae_keys.py; the conversion tables; the asymmetric padding.

Every torch weight (GroupNorm affine parameters and biases included) is random, so each layer
contributes to the outputs.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from diffusers.models.downsampling import Downsample2D
from flax import linen as nn
from flax import traverse_util
from safetensors.numpy import save_file

from sd3_jax.models import vae as V
from sd3_jax.convert import vae_keys as K

CASES = {
  # name: (VAEConfig, image H, W, batch)
  # 16 latent channels, 2 resnets per level, non-square even image.
  "sd3_like": (V.VAEConfig(block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=8), 16, 12, 2),
  # 4 latent channels, a channel change inside the decoder's last level, ODD image sides
  # (only the asymmetric downsample padding gives torch's 3x3 latent shape), clamped logvar.
  "odd_clamped": (
    V.VAEConfig(latent_channels=4, block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=16),
    15,
    13,
    1,
  ),
}


def torch_vae(config: V.VAEConfig, seed=0, clamp_logvar=False):
  kwargs = {k: v for k, v in K.diffusers_vae_config(config).items() if not k.startswith("_")}
  torch.manual_seed(seed)
  model = TorchAutoencoderKL(**kwargs).eval()
  with torch.no_grad():
    for _, t in model.named_parameters():
      t.normal_(0.0, 0.1)
    if clamp_logvar:  # push half the logvar channels above 20 and half below -30
      lat = config.latent_channels
      model.encoder.conv_out.bias[lat:] = torch.tensor([60.0, -60.0] * (lat // 2))
  return model


def nhwc(x):
  return jnp.asarray(np.asarray(x).transpose(0, 2, 3, 1))


def nchw(x):
  return np.asarray(x).transpose(0, 3, 1, 2)


def rel_err(a, b):
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_diffusers(case):
  config, hh, ww, b = CASES[case]
  tm = torch_vae(config, clamp_logvar=case == "odd_clamped")
  got_cfg, params = K.diffusers_state_dict_to_vae_params(tm.state_dict(), K.diffusers_vae_config(config))
  assert got_cfg == config
  model = V.AutoencoderKL(config)
  images = np.random.RandomState(1).uniform(-1, 1, (b, config.in_channels, hh, ww)).astype(np.float32)

  with torch.no_grad():
    dist = tm.encode(torch.from_numpy(images)).latent_dist
    t_mean, t_logvar = dist.mean.numpy(), dist.logvar.numpy()
    t_z = (t_mean - 0.0609) * 1.5305  # the SD3 pipeline's normalisation
    t_rec = tm.decode(torch.from_numpy(t_z) / 1.5305 + 0.0609).sample.numpy()
    raw = np.random.RandomState(2).randn(*t_mean.shape).astype(np.float32)
    t_dec = tm.decode(torch.from_numpy(raw)).sample.numpy()

  # Everything our side computes, in one jitted function (one compile).
  key = jax.random.key(3)

  @jax.jit
  def ours(params, x, raw):
    apply = lambda method, *a: model.apply({"params": params}, *a, method=method)
    mean, logvar = apply("encode", x)
    z = apply("latents_from_images", x)
    return dict(
      mean=mean,
      logvar=logvar,
      dec=apply("decode", raw),
      z=z,
      rec=apply("images_from_latents", z),
      call=model.apply({"params": params}, x),
      sampled=apply("latents_from_images", x, key),
    )

  out = {k: np.asarray(v) for k, v in ours(params, nhwc(images), nhwc(raw)).items()}
  assert nchw(out["mean"]).shape == t_mean.shape
  assert rel_err(nchw(out["mean"]), t_mean) < 1e-5
  assert rel_err(nchw(out["logvar"]), t_logvar) < 1e-5
  if case == "odd_clamped":
    assert t_mean.shape[2:] == (3, 3)  # 15x13 -> 7x6 -> 3x3; symmetric padding: 8x7 -> 4x4
    assert np.all(nchw(out["logvar"])[:, 0] == 20.0) and np.all(nchw(out["logvar"])[:, 1] == -30.0)
  assert rel_err(nchw(out["dec"]), t_dec) < 1e-5
  assert rel_err(nchw(out["z"]), t_z) < 1e-5
  assert rel_err(nchw(out["rec"]), t_rec) < 1e-5
  assert rel_err(nchw(out["call"]), t_rec) < 1e-5

  # Sampling: mean + exp(logvar / 2) * eps with eps from the explicit key, then normalised.
  eps = np.asarray(jax.random.normal(key, out["mean"].shape, jnp.float32))
  want = (out["mean"] + np.exp(0.5 * out["logvar"]) * eps - 0.0609) * 1.5305
  np.testing.assert_allclose(out["sampled"], want, rtol=1e-5, atol=1e-5)
  assert not np.allclose(out["sampled"], out["z"])


def test_odd_sizes_shapes():
  """15x13 with three levels: torch's pad-(0,1,0,1) downsample gives 7x6 then 3x3."""
  config = CASES["odd_clamped"][0]
  shapes = jax.eval_shape(
    lambda p, x: V.AutoencoderKL(config).apply({"params": p}, x, method="encode"),
    nn.unbox(V.abstract_params(V.AutoencoderKL(config))),
    jnp.zeros((1, 15, 13, 3)),
  )
  assert shapes[0].shape == (1, 3, 3, 4)


def test_downsample_padding_is_asymmetric():
  """Our Downsample equals diffusers' Downsample2D(padding=0); a symmetric padding-1 conv with
  the same weights does not (other values on even sides, other shapes on odd sides)."""
  torch.manual_seed(0)
  tdown = Downsample2D(8, use_conv=True, padding=0, name="op").eval()
  w, bias = tdown.conv.weight.detach().numpy(), tdown.conv.bias.detach().numpy()
  params = {"conv": {"kernel": jnp.asarray(w.transpose(2, 3, 1, 0)), "bias": jnp.asarray(bias)}}
  ours = V.Downsample(8)
  symmetric = V.Conv(8, 3, stride=2, padding=((1, 1), (1, 1)))
  for hh, ww in ((8, 10), (7, 9)):
    x = np.random.RandomState(hh).randn(2, 8, hh, ww).astype(np.float32)
    with torch.no_grad():
      want = tdown(torch.from_numpy(x)).numpy()
    got = nchw(ours.apply({"params": params}, nhwc(x)))
    assert got.shape == want.shape and rel_err(got, want) < 1e-6
    sym = nchw(symmetric.apply({"params": params["conv"]}, nhwc(x)))
    assert sym.shape != want.shape or rel_err(sym, want) > 0.1


def test_conversion_round_trips_bit_exact():
  config = V.VAEConfig(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32)
  sd = {k: v.numpy() for k, v in torch_vae(config, seed=4).state_dict().items()}
  # Without config.json the config comes from the shapes (groups 32, SD3 scale/shift).
  cfg, params = K.diffusers_state_dict_to_vae_params(sd, None)
  assert cfg == config
  back = K.vae_params_to_diffusers_state_dict(params, cfg)
  assert sorted(back) == sorted(sd)
  for k in sd:
    assert back[k].dtype == sd[k].dtype and np.array_equal(back[k], sd[k]), k

  # Original LDM layout: diffusers' own LDM -> diffusers converter is the oracle of our table.
  orig = K.vae_params_to_original_state_dict(params, cfg)
  assert all(k.startswith("first_stage_model.") for k in orig)
  assert orig["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
  via_diffusers = convert_ldm_vae_checkpoint(orig, K.diffusers_vae_config(cfg))
  assert sorted(via_diffusers) == sorted(sd)
  for k in sd:
    assert np.array_equal(np.asarray(via_diffusers[k]), sd[k]), k
  # A whole single file (other components ignored) and bare LDM keys read back bit-exactly.
  single = {**orig, "model.diffusion_model.x_embedder.proj.weight": np.zeros((2, 2), np.float32)}
  bare = {k[len("first_stage_model.") :]: v for k, v in orig.items()}
  for state_dict in (single, bare):
    cfg2, params2 = K.diffusers_state_dict_to_vae_params(state_dict, None)
    assert cfg2 == cfg
    flat, flat2 = (traverse_util.flatten_dict(p, sep="/") for p in (params, params2))
    assert sorted(flat) == sorted(flat2) and all(np.array_equal(flat[k], flat2[k]) for k in flat)
  # torch tensors (bfloat16 too) are accepted as values; dtype= casts.
  tsd = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in sd.items()}
  _, p_bf16 = K.diffusers_state_dict_to_vae_params(tsd, None, dtype=np.float32)
  ref = torch.from_numpy(sd["decoder.conv_out.weight"]).to(torch.bfloat16).float().numpy()
  assert np.array_equal(p_bf16["decoder"]["conv_out"]["kernel"], ref.transpose(2, 3, 1, 0))


def test_diffusers_from_pretrained_loads_export(tmp_path):
  config = CASES["sd3_like"][0]
  model = V.AutoencoderKL(config)
  _, params = K.diffusers_state_dict_to_vae_params(
    torch_vae(config, seed=5).state_dict(), K.diffusers_vae_config(config)
  )
  rs = np.random.RandomState(6)
  params = jax.tree.map(lambda p: (p + 0.01 * rs.randn(*p.shape)).astype(np.float32), params)
  (tmp_path / "config.json").write_text(json.dumps(K.diffusers_vae_config(config)))
  sd = K.vae_params_to_diffusers_state_dict(params, config)
  save_file(sd, str(tmp_path / "diffusion_pytorch_model.safetensors"))
  tm = TorchAutoencoderKL.from_pretrained(tmp_path).eval()
  assert tm.quant_conv is None and tm.post_quant_conv is None
  assert tm.config.scaling_factor == 1.5305 and tm.config.shift_factor == 0.0609
  loaded = tm.state_dict()
  assert sorted(loaded) == sorted(sd)
  assert all(np.array_equal(loaded[k].numpy(), sd[k]) for k in sd)
  assert V.VAEConfig.from_diffusers_config(dict(tm.config)) == config
  z = np.random.RandomState(7).randn(1, 16, 3, 5).astype(np.float32)
  with torch.no_grad():
    want = tm.decode(torch.from_numpy(z)).sample.numpy()
  decode = jax.jit(lambda p, z: model.apply({"params": p}, z, method="decode"))
  assert rel_err(nchw(decode(params, nhwc(z))), want) < 1e-5


def test_sd3_table_matches_diffusers_shapes():
  """The full-size SD3 VAE: our parameter shapes == the table == diffusers' (meta device)."""
  entries = K.entries(V.SD3_VAE)
  abstract = nn.unbox(V.abstract_params(V.AutoencoderKL(V.SD3_VAE)))
  ours = {k: v.shape for k, v in traverse_util.flatten_dict(abstract, sep="/").items()}
  assert ours == {e.ours: e.ours_shape for e in entries}
  kwargs = {k: v for k, v in K.diffusers_vae_config(V.SD3_VAE).items() if not k.startswith("_")}
  with torch.device("meta"):
    tm = TorchAutoencoderKL(**kwargs)
  torch_shapes = {k: tuple(v.shape) for k, v in tm.state_dict().items()}
  assert torch_shapes == {e.diffusers: e.diffusers_shape for e in entries}
  # Every parameter carries logical axis names.
  boxed = traverse_util.flatten_dict(V.abstract_params(V.AutoencoderKL(V.TINY_VAE)), sep="/")
  assert all(isinstance(v, nn.Partitioned) for v in boxed.values())
  assert boxed["encoder/conv_in/kernel"].names == (None, None, "vae_in", "vae_out")


def test_bfloat16_compute_is_close():
  config = V.TINY_VAE
  _, params = K.diffusers_state_dict_to_vae_params(torch_vae(config).state_dict(), K.diffusers_vae_config(config))
  x = jnp.asarray(np.random.RandomState(0).uniform(-1, 1, (1, 8, 8, 3)).astype(np.float32))
  run = lambda dtype: jax.jit(V.AutoencoderKL(config, dtype=dtype).apply)({"params": params}, x)
  f32, bf16 = run(jnp.float32), run(jnp.bfloat16)
  assert bf16.dtype == jnp.float32 and jax.tree.leaves(params)[0].dtype == jnp.float32
  assert rel_err(np.asarray(bf16), np.asarray(f32)) < 3e-2


def test_config_round_trips_and_errors():
  c = CASES["odd_clamped"][0]
  assert V.VAEConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
  assert V.VAEConfig.from_diffusers_config(K.diffusers_vae_config(c)) == c
  with pytest.raises(ValueError, match="unknown VAEConfig keys.*'z_channels'"):
    V.VAEConfig.from_dict({**c.to_dict(), "z_channels": 16})
  with pytest.raises(ValueError, match="not divisible by norm_num_groups"):
    V.VAEConfig(block_out_channels=(24, 48), norm_num_groups=32)
  good = K.diffusers_vae_config(c)
  for bad, match in (
    ({"use_quant_conv": True}, "use_quant_conv=True"),
    ({"use_post_quant_conv": True}, "use_post_quant_conv=True"),
    ({"act_fn": "gelu"}, "act_fn='gelu'"),
    ({"down_block_types": ["DownBlock2D"] * 3}, "down_block_types"),
    ({"mid_block_add_attention": False}, "mid_block_add_attention"),
    ({"latents_mean": [0.0] * 4}, "latents_mean"),
    ({"conv_kernel": 5}, "unknown keys \\['conv_kernel'\\]"),
    ({"_class_name": "AutoencoderTiny"}, "AutoencoderTiny"),
  ):
    with pytest.raises(ValueError, match=match):
      V.VAEConfig.from_diffusers_config({**good, **bad})
  # Missing keys take diffusers' defaults, and use_quant_conv defaults to True there.
  with pytest.raises(ValueError, match="use_quant_conv=True"):
    V.VAEConfig.from_diffusers_config({"latent_channels": 16})


def test_conversion_errors():
  config = V.VAEConfig(block_out_channels=(32,), layers_per_block=1, norm_num_groups=32)
  sd = {k: v.numpy() for k, v in torch_vae(config).state_dict().items()}
  cj = K.diffusers_vae_config(config)
  K.diffusers_state_dict_to_vae_params(sd, cj)  # the untouched dict converts
  missing = {k: v for k, v in sd.items() if k != "decoder.mid_block.attentions.0.to_k.bias"}
  with pytest.raises(ValueError, match=r"missing \(1\): decoder.mid_block.attentions.0.to_k.bias"):
    K.diffusers_state_dict_to_vae_params(missing, cj)
  with pytest.raises(ValueError, match=r"unexpected \(1\): encoder.extra.weight"):
    K.diffusers_state_dict_to_vae_params({**sd, "encoder.extra.weight": np.zeros(1)}, cj)
  wrong = {**sd, "encoder.conv_out.weight": np.zeros((8, 32, 3, 3), np.float32)}
  with pytest.raises(ValueError, match=r"encoder.conv_out.weight: found \[8, 32, 3, 3\], expected \[32, 32, 3, 3\]"):
    K.diffusers_state_dict_to_vae_params(wrong, cj)
  with pytest.raises(ValueError, match="quant_conv"):
    K.diffusers_state_dict_to_vae_params({**sd, "quant_conv.weight": np.zeros((32, 32, 1, 1))}, None)
  with pytest.raises(ValueError, match="not a VAE state dict"):
    K.diffusers_state_dict_to_vae_params({"transformer_blocks.0.x": np.zeros(1)}, None)
  # A 4-group model: the weights cannot tell, so inference refuses without config.json.
  sd16 = {
    k: v.numpy()
    for k, v in torch_vae(V.VAEConfig(block_out_channels=(16,), layers_per_block=1, norm_num_groups=4))
    .state_dict()
    .items()
  }
  with pytest.raises(ValueError, match="cannot infer norm_num_groups"):
    K.diffusers_state_dict_to_vae_params(sd16, None)
  # Writing checks the parameter tree against the config.
  _, params = K.diffusers_state_dict_to_vae_params(sd, cj)
  with pytest.raises(ValueError, match="VAE parameter tree does not match"):
    K.vae_params_to_diffusers_state_dict(params, V.VAEConfig(block_out_channels=(32,), layers_per_block=2))
  model = V.AutoencoderKL(config)
  with pytest.raises(ValueError, match=r"images must be NHWC \[B,H,W,3\]"):
    model.apply({"params": params}, jnp.zeros((1, 3, 8, 8)), method="encode")
  with pytest.raises(ValueError, match=r"latents must be NHWC \[B,h,w,16\]"):
    model.apply({"params": params}, jnp.zeros((1, 4, 4, 4)), method="decode")
