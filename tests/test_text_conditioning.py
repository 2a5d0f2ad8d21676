"""SD3 text conditioning: tokenization rules, SD3TextConditioner against diffusers'
StableDiffusion3Pipeline.encode_prompt, the projected CLIP-L pooled vector, short CLIP lengths.
Tiny tokenizers and encoders from text_encoder_helpers.py."""

import os

import numpy as np
import pytest
import torch

from sd3_jax import text_conditioning as tc
from sd3_jax.flow import conditioning
from sd3_jax.convert import convert

from text_encoder_helpers import (
  T5_HF,
  PROMPTS,
  rel_err,
  write_clip_tokenizer,
  write_t5_tokenizer,
  CLIP_L_HF,
  CLIP_G_HF,
  torch_clip,
  torch_t5,
)

# ---------------------------------------------------------------------------------------------
# Tokenization and conditioning


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
  d = tmp_path_factory.mktemp("tok")
  write_clip_tokenizer(d / "tokenizer", "<|endoftext|>")  # as the released tokenizer/
  write_clip_tokenizer(d / "tokenizer_2", "!")  # as the released tokenizer_2/
  write_t5_tokenizer(d / "tokenizer_3")
  return d, [tc.load_tokenizer(d / n) for n in tc.TOKENIZER_DIRS]


def test_tokenization_rules(tokenizers):
  _, (tok_l, tok_g, tok_t5) = tokenizers
  assert tok_l.bos_token_id == 518 and tok_l.eos_token_id == 519 and tok_t5.eos_token_id == 1
  l = tc.tokenize_clip(tok_l, ["a cat", ""])
  assert l.shape == (2, 77) and l.dtype == np.int32
  # "a cat" -> a</w> (320 = 256 + 'a') cat</w> (513): BOS, tokens, EOS, then EOS padding.
  assert l[0, :4].tolist() == [518, 320, 513, 519] and (l[0, 4:] == 519).all()
  assert l[1, :2].tolist() == [518, 519] and (l[1, 2:] == 519).all()
  g = tc.tokenize_clip(tok_g, ["a cat", ""], pad_id=0)
  assert g[0, :4].tolist() == [518, 320, 513, 519] and (g[0, 4:] == 0).all() and (g[1, 2:] == 0).all()
  long = tc.tokenize_clip(tok_l, [" ".join(["the dog"] * 60)])  # truncated: BOS + 75 + EOS
  assert long[0, 0] == 518 and long[0, 76] == 519 and (long[0, 1:76] != 519).all()
  t = tc.tokenize_t5(tok_t5, ["a cat", "", "the dog sat on a mat"], length=6)
  assert t.tolist() == [[4, 5, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0], [7, 6, 8, 9, 4, 1]]
  with pytest.raises(TypeError, match="list of strings"):
    tc.tokenize_clip(tok_l, "a cat")


@pytest.fixture(scope="module")
def pipeline_dir(tokenizers, tmp_path_factory):
  """A diffusers-layout directory: CLIP-L as our checkpoint, CLIP-G and T5 as transformers."""
  d = tmp_path_factory.mktemp("pipe")
  tok_dir, _ = tokenizers
  for n in tc.TOKENIZER_DIRS:
    os.symlink(tok_dir / n, d / n)
  torch_l = torch_clip(CLIP_L_HF, seed=10, identity_projection=True)
  torch_g = torch_clip(CLIP_G_HF, seed=11)
  torch_t5_ = torch_t5(T5_HF, seed=12)
  torch_l.save_pretrained(d / "clip_l_hf")
  convert(d / "clip_l_hf", d / "text_encoder", "jax")
  torch_g.save_pretrained(d / "text_encoder_2")
  torch_t5_.save_pretrained(d / "text_encoder_3")
  return d, (torch_l, torch_g, torch_t5_)


def test_project_clip_l_is_diffusers_pooled_vector(tokenizers, pipeline_dir, tmp_path):
  """diffusers' encode_prompt pools CLIP-L's *projected* output, the reference its un-projected
  one: equal only for an identity text_projection (released SD3). With a random projection,
  project_clip_l=True reproduces diffusers and the default does not."""
  from diffusers import StableDiffusion3Pipeline

  d, (_, torch_g, torch_t5_) = pipeline_dir
  _, (tok_l, tok_g, tok_t5) = tokenizers
  torch_l = torch_clip(CLIP_L_HF, seed=13)  # random projection
  for n in os.listdir(d):
    if n != "text_encoder" and not n.startswith("clip_l"):
      os.symlink(d / n, tmp_path / n)
  torch_l.save_pretrained(tmp_path / "text_encoder")
  pipe = StableDiffusion3Pipeline(
    transformer=None,
    scheduler=None,
    vae=None,
    text_encoder=torch_l,
    tokenizer=tok_l,
    text_encoder_2=torch_g,
    tokenizer_2=tok_g,
    text_encoder_3=torch_t5_,
    tokenizer_3=tok_t5,
  )
  with torch.no_grad():
    _, _, ref_pool, _ = pipe.encode_prompt(
      PROMPTS, None, None, device=torch.device("cpu"), do_classifier_free_guidance=False, max_sequence_length=20
    )
  _, projected = tc.load_conditioner(str(tmp_path), t5_length=20, project_clip_l=True).encode(PROMPTS)
  _, reference = tc.load_conditioner(str(tmp_path), t5_length=20).encode(PROMPTS)
  assert rel_err(projected, ref_pool) < 1e-5
  assert rel_err(reference[:, :32], ref_pool[:, :32]) > 1e-2  # CLIP-L's part differs
  np.testing.assert_allclose(reference[:, 32:], projected[:, 32:], rtol=1e-6)  # CLIP-G's does not


def test_conditioner_matches_diffusers(tokenizers, pipeline_dir):
  from diffusers import StableDiffusion3Pipeline

  d, (torch_l, torch_g, torch_t5_) = pipeline_dir
  _, (tok_l, tok_g, tok_t5) = tokenizers
  cond = tc.SD3TextConditioner.from_pretrained(d, t5_length=20)
  assert cond.context_dim == 96 and cond.layout == conditioning.TextLayout(32, 48, 77)
  context, pooled = cond.encode(PROMPTS)
  assert context.shape == (3, 77 + 20, 96) and pooled.shape == (3, 80)
  pipe = StableDiffusion3Pipeline(
    transformer=None,
    scheduler=None,
    vae=None,
    text_encoder=torch_l,
    tokenizer=tok_l,
    text_encoder_2=torch_g,
    tokenizer_2=tok_g,
    text_encoder_3=torch_t5_,
    tokenizer_3=tok_t5,
  )
  with torch.no_grad():
    ref_ctx, neg_ctx, ref_pool, neg_pool = pipe.encode_prompt(
      PROMPTS, None, None, device=torch.device("cpu"), do_classifier_free_guidance=True, max_sequence_length=20
    )
  assert rel_err(context, ref_ctx) < 1e-5 and rel_err(pooled, ref_pool) < 1e-5
  empty_ctx, empty_pool = cond.encode_empty()  # the CFG negative: the encoded ""
  assert empty_ctx.shape == (1, 97, 96)
  assert rel_err(empty_ctx, neg_ctx[:1]) < 1e-5 and rel_err(empty_pool, neg_pool[:1]) < 1e-5
  np.testing.assert_allclose(empty_ctx[0], context[2], rtol=1e-5, atol=1e-6)
  # Layout: CLIP-L | CLIP-G | zeros on the first 77 tokens, T5 after them.
  ids = cond.tokenize(PROMPTS)
  with torch.no_grad():
    l_hidden = torch_l(torch.tensor(ids["clip_l"]).long(), output_hidden_states=True).hidden_states[-2]
    t5_out = torch_t5_(torch.tensor(ids["t5"]).long()).last_hidden_state
  assert rel_err(context[:, :77, :32], l_hidden) < 1e-5 and rel_err(context[:, 77:], t5_out) < 1e-5
  assert not np.asarray(context[:, :77, 80:]).any()
  # Without T5: its tokens are zeros (as the reference); the CLIP part is unchanged.
  no_t5 = tc.SD3TextConditioner.from_pretrained(d, use_t5=False, t5_length=20, context_dim=96)
  ctx0, pool0 = no_t5.encode(PROMPTS)
  assert ctx0.shape == context.shape and not np.asarray(ctx0[:, 77:]).any()
  np.testing.assert_array_equal(np.asarray(ctx0[:, :77]), np.asarray(context[:, :77]))
  np.testing.assert_array_equal(np.asarray(pool0), np.asarray(pooled))
  with pytest.raises(ValueError, match="context_dim 64 != T5 d_model 96"):
    tc.SD3TextConditioner(cond.clip_l, cond.clip_g, cond.t5, context_dim=64)


def test_conditioner_short_clip_length(pipeline_dir):
  """clip_length < 77 (the embedded demo's 12): CLIP attention is causal and pooling reads the
  first EOS, so for prompts that fit, the CLIP part equals the first tokens of the 77-token one."""
  d, _ = pipeline_dir
  full = tc.SD3TextConditioner.from_pretrained(d, t5_length=20)
  short = tc.SD3TextConditioner.from_pretrained(d, t5_length=20, clip_length=12)
  assert short.layout == conditioning.TextLayout(32, 48, 12)
  prompts = PROMPTS[:1] + PROMPTS[2:]  # the second prompt needs more than 12 tokens
  ctx_s, pool_s = short.encode(prompts)
  ctx_f, pool_f = full.encode(prompts)
  assert ctx_s.shape == (2, 12 + 20, 96)
  np.testing.assert_allclose(ctx_s[:, :12], ctx_f[:, :12], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(pool_s, pool_f, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ctx_s[:, 12:], ctx_f[:, 77:], rtol=1e-5, atol=1e-6)  # T5 unchanged
  assert short.tokenize([PROMPTS[1]])["clip_l"][0, -1] == 519  # truncated, still ends with EOS
  with pytest.raises(ValueError, match="fewer than clip_length 100"):
    tc.SD3TextConditioner(full.clip_l, full.clip_g, full.t5, clip_length=100)


def test_transformers_without_torch_is_quiet_and_our_format_needs_no_converter(tmp_path):
  """The base install has no PyTorch: transformers' "PyTorch was not found" advice means nothing
  to our users (tokenizers and configs only), so importing it through us prints nothing. And one
  direction: a conditioner from our own checkpoints is read by storage alone (only transformers
  directories go through sd3_jax.convert)."""
  import subprocess
  import sys

  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("TRANSFORMERS_NO_ADVISORY_WARNINGS", None)
  hide = "import sys; sys.modules['torch'] = None\n"
  plain = subprocess.run([sys.executable, "-c", hide + "import transformers"], capture_output=True, text=True, env=env)
  assert "PyTorch was not found" in plain.stderr  # what the check guards against, on this stack
  enc = str(tmp_path / "enc")
  code = (
    hide
    + f"""
from sd3_jax.demo import encoders
encoders.make_text_encoders({enc!r}, ["a red circle", "a blue square"], clip_l_dim=16, clip_g_dim=16, t5_dim=32)
for m in [m for m in sys.modules if m.startswith("sd3_jax.convert")]:
  del sys.modules[m]
from sd3_jax import text_conditioning as tc
tc.load_conditioner({enc!r}, clip_length=8, t5_length=8)
print(sorted(m for m in sys.modules if m.startswith("sd3_jax.convert")))
"""
  )
  ours = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
  assert ours.returncode == 0, ours.stderr[-3000:]
  assert "PyTorch" not in ours.stderr, ours.stderr
  assert ours.stdout.strip().splitlines()[-1] == "[]", ours.stdout
