"""muP on every backbone (models/backbones.py): the initialisation of every parameter scales with
width as its class (``backbones.param_class``) prescribes, muP at the base width is SP bit for
bit, and one muP Adam step moves every parameter by the learning rate its class gets.

The classes drive the learning rates; the initialisers are declared in the models. Measuring
both against the one table per backbone is what keeps them from disagreeing (a new input layer
missing from ``param_class`` fails the init check: its muP init stays flat, its class says
hidden).
"""

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sd3_jax import config as config_lib
from sd3_jax.models import backbones, mmdit, mup
from sd3_jax.training import optimizer, state as state_lib

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.py")
FAST = {"xla_backend_optimization_level": 0}  # compiling dominates; unoptimised CPU code halves it
BASE, WIDE = 32, 128  # m = 4; two heads, so the head dimension (and the attention scale) grows too


def _config(backbone: str, width: int, parametrization: str):
  overrides = {
    "model.depth": 1,
    "model.num_heads": 2,
    "model.qk_norm": True,  # the attention-scale test expresses muP's scale through q's gain
    "model.hidden_size": width,
    "model.parametrization": parametrization,
    "model.mup_base_width": BASE,
    "optimizer.weight_decay": 0.0,
    "optimizer.warmup_steps": 0,
    "optimizer.schedule": "constant",
  }
  return config_lib.load_config_file(TINY, backbone, overrides)


def _init(config):
  model = state_lib.make_model(config, platform="cpu")
  return model, jax.jit(lambda k: mmdit.init_params(model, k), compiler_options=FAST)(jax.random.key(0))


def _named(tree) -> dict:
  return {"/".join(mup.path_names(p)): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _random(params, inputs_of):
  """Random values for every parameter (adaLN-Zero would make the blocks identities and leave
  most gradients zero) and random inputs for ``inputs_of``'s model."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(treedef, [0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
  x, t, pooled, context = mmdit.dummy_inputs(inputs_of.config, batch=2, latent_size=4, context_len=5)
  draw = lambda i, a: jax.random.normal(jax.random.key(i), a.shape)  # noqa: E731
  return params, (draw(2, x), jnp.full(t.shape, 0.5), draw(3, pooled), draw(4, context))


def _rms(x) -> float:
  return float(np.sqrt(np.mean(np.square(np.asarray(x, np.float64)))))


@pytest.fixture(scope="module", params=backbones.BACKBONES)
def inits(request):
  """{(parametrization, width): (config, model, params)} of one backbone: SP at the base width,
  muP at the base width and at 4x it."""
  keys = (("sp", BASE), ("mup", BASE), ("mup", WIDE))
  return {(p, w): (config, *_init(config)) for p, w in keys for config in [_config(request.param, w, p)]}


def test_init_scales_with_width_as_each_parameter_class_prescribes(inits):
  """Every non-zero parameter's RMS goes as m^-a from the base width to 4x it, a from its class
  (input 0, hidden 1/2, fixed 0; output kernels are zero-initialised); and at the base width muP
  is SP, bit for bit."""
  small, wide = _named(inits["mup", BASE][2]), _named(inits["mup", WIDE][2])
  counts = {r: 0 for r in mup.ROLES}
  for name, a in small.items():
    role = backbones.param_class(name)
    counts[role] += 1
    if _rms(a) == 0:
      continue
    exponent = math.log(_rms(wide[name]) / _rms(a), WIDE / BASE)
    assert exponent == pytest.approx(-mup.INIT_EXPONENT[role], abs=0.05), (name, role, exponent)
  assert counts["input"] and counts["hidden"] and counts["output"] and counts["fixed"] == 1, counts
  sp = inits["sp", BASE][2]
  assert jax.tree.all(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), sp, inits["mup", BASE][2]))
  assert inits["mup", BASE][1].config.attention_scale is None
  assert inits["mup", WIDE][1].config.attention_scale == pytest.approx(math.sqrt(16) / 64)


def test_a_mup_adam_step_moves_each_parameter_by_its_class_learning_rate(inits):
  """One optimizer step of the trainer's muP AdamW on random parameters (so every gradient is
  non-zero) of the 4x model: Adam's first step is lr x g/(|g| + eps), so each parameter's largest
  |update| is lr x its class's factor (1 input, 1/m hidden and output); the positional table stays put."""
  config, model, params = inits["mup", WIDE]
  params, (x, t, pooled, context) = _random(params, model)
  tx = optimizer.make_optimizer(config)

  @functools.partial(jax.jit, compiler_options=FAST)
  def step(params):
    grads = jax.grad(lambda p: jnp.mean(jnp.square(model.apply({"params": p}, x, t, pooled, context) - x)))(params)
    updates, _ = tx.update(grads, tx.init(params), params)
    return updates

  lr, m = config.optimizer.learning_rate, WIDE / BASE
  checked = set()
  for name, u in _named(step(params)).items():
    role = backbones.param_class(name)
    moved = float(np.max(np.abs(np.asarray(u)))) / lr
    if moved == 0 and role != "fixed":  # no gradient at all (the last text block's q only feeds dropped rows)
      continue
    want = 0.0 if role == "fixed" else m ** -mup.LR_EXPONENT[role]
    assert moved == pytest.approx(want, rel=0.02, abs=1e-6), (name, role, moved)
    checked.add(role)
  assert checked == set(mup.ROLES)


def test_the_attention_scale_reaches_every_attention(inits):
  """muP's logit scale sqrt(d_base)/d in every attention of the backbone (joint, self, cross):
  the 4x muP model equals the SP one whose q gains (qk-norm) carry sqrt(d_base/d), and differs
  from the SP one without them."""
  config, model, params = inits["mup", WIDE]
  sp = state_lib.make_model(_config(config.model.backbone, WIDE, "sp"), platform="cpu")
  params, inputs = _random(params, model)
  ratio = math.sqrt(16 / 64)
  scaled = jax.tree_util.tree_map_with_path(lambda p, x: x * ratio if "ln_q" in mup.path_names(p) else x, params)
  assert sum("ln_q" in name for name in _named(params)) >= 1
  apply = lambda m, p: jax.jit(m.apply, compiler_options=FAST)({"params": p}, *inputs)  # noqa: E731
  out_mu, out_sp_scaled, out_sp = apply(model, params), apply(sp, scaled), apply(sp, params)
  np.testing.assert_allclose(out_mu, out_sp_scaled, rtol=1e-4, atol=1e-5)
  assert float(jnp.max(jnp.abs(out_mu - out_sp))) > 1e-3
