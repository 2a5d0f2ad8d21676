"""The pure train step: noise and timesteps for the global batch, the formulation's loss,
gradient accumulation over microbatches, the AdamW update and the EMA; and its jitted form with
explicit shardings and the state donated."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import linen as nn

from sd3_jax import flow, sharding
from sd3_jax.models import mmdit
from sd3_jax.training import metrics as metrics_lib
from sd3_jax.training.state import TrainState


@dataclasses.dataclass(frozen=True)
class StepOptions:
  """Everything the pure train step needs from the config, as plain values."""

  formulation: flow.formulations.Formulation = flow.get_formulation(flow.DEFAULT)
  text_dropout: float = 0.464
  text_layout: flow.conditioning.TextLayout = flow.conditioning.TextLayout()
  grad_accum_steps: int = 1
  ema_decay: float = 0.99
  ema_every: int = 100


def step_options(config: ml_collections.ConfigDict) -> StepOptions:
  f = config.flow
  return StepOptions(
    formulation=flow.get_formulation(f.formulation, shift=f.shift),
    text_dropout=f.text_dropout,
    text_layout=flow.conditioning.TextLayout(
      clip_l_dim=config.text.clip_l_dim, clip_g_dim=config.text.clip_g_dim, clip_tokens=config.text.clip_tokens
    ),
    grad_accum_steps=config.grad_accum_steps,
    ema_decay=config.ema.decay,
    ema_every=config.ema.every,
  )


def sample_noise(batch: dict, rng: jax.Array, opts: StepOptions) -> dict:
  """Draw t (the formulation's density), the noise and the text-encoder dropout for the whole
  global batch at once, so that gradient accumulation changes nothing but the order of float
  additions."""
  x0 = batch["latent"]
  k_t, k_eps, k_drop = jax.random.split(rng, 3)
  t = opts.formulation.sample_t(k_t, (x0.shape[0],))
  eps = jax.random.normal(k_eps, x0.shape, jnp.float32)
  context, pooled = batch["context"], batch["pooled"]
  if opts.text_dropout > 0:
    context, pooled = flow.conditioning.drop_text_conditioning(
      k_drop, context, pooled, opts.text_dropout, opts.text_layout
    )
  return dict(x0=x0.astype(jnp.float32), eps=eps, t=t, context=context, pooled=pooled)


def formulation_loss(params, model: mmdit.MMDiT, formulation: flow.formulations.Formulation, ex: dict):
  """The formulation's loss: the sum over examples of its per-example loss, and those losses.
  The network sees the formulation's input and time input; for rectified flow this is
  ||v(z_t, t) - (eps - x0)||^2 (mean over elements), the loss before formulations existed."""
  f, t = formulation, ex["t"]
  z_t = f.noised(ex["x0"], ex["eps"], t)
  out = model.apply({"params": params}, f.model_input(z_t, t), f.time_input(t), ex["pooled"], ex["context"])
  per_example = f.loss(out, ex["x0"], ex["eps"], t)
  return jnp.sum(per_example), per_example


def train_step(
  state: TrainState,
  batch: dict,
  rng: jax.Array,
  *,
  model: mmdit.MMDiT,
  tx: optax.GradientTransformation,
  opts: StepOptions,
  schedule: optax.Schedule,
):
  """One optimizer update over the global batch (split into grad_accum_steps microbatches)."""
  ex = sample_noise(batch, jax.random.fold_in(rng, state.step), opts)
  n_examples = ex["x0"].shape[0]
  grad_fn = jax.value_and_grad(formulation_loss, has_aux=True)
  n = opts.grad_accum_steps
  if n == 1:
    (loss_sum, per_example), grads = grad_fn(state.params, model, opts.formulation, ex)
  else:
    # Microbatch i = rows i, i+n, i+2n, ...: every device's batch shard holds its share of
    # every microbatch, so splitting moves no data between devices.
    micro = jax.tree.map(
      lambda x: nn.with_logical_constraint(
        x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1), (None, "act_batch") + (None,) * (x.ndim - 1)
      ),
      ex,
    )

    def body(acc, mb):
      (l, pe), g = grad_fn(state.params, model, opts.formulation, mb)
      return jax.tree.map(jnp.add, acc, g), (l, pe)

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    grads, (sums, per_example) = jax.lax.scan(body, zeros, micro)
    loss_sum, per_example = jnp.sum(sums), per_example.swapaxes(0, 1).reshape(-1)
  grads = jax.tree.map(lambda g: g / n_examples, grads)
  loss = loss_sum / n_examples
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  step = state.step + 1
  # Only the steps that update the EMA read and rewrite it (lax.cond, not a blend every step).
  ema = jax.lax.cond(
    (step % opts.ema_every) == 0,
    lambda e, p: jax.tree.map(lambda a, b: opts.ema_decay * a + (1.0 - opts.ema_decay) * b, e, p),
    lambda e, p: e,
    state.ema_params,
    params,
  )
  new_state = state.replace(step=step, params=params, opt_state=opt_state, ema_params=ema)
  out = dict(
    loss=loss,
    grad_norm=grad_norm,
    param_norm=optax.tree.norm(params),
    metrics=metrics_lib.TrainMetrics.single_from_model_output(
      per_example_loss=per_example, t=ex["t"], grad_norm=grad_norm, learning_rate=schedule(state.step)
    ),
  )
  return new_state, out


def make_train_step(model, tx, opts: StepOptions, schedule, mesh, shardings, batch_shapes: dict):
  """The jitted step with explicit in/out shardings and the state donated.

  ``schedule`` is the learning-rate schedule (for the logged learning rate); batch_shapes maps
  'latent'/'context'/'pooled' to global shapes (only their ranks matter for the shardings).
  """
  batch_sh = {k: sharding.batch_sharding(mesh, len(s)) for k, s in batch_shapes.items()}
  rep = sharding.replicated(mesh)

  def fn(state, batch, rng):
    with sharding.logical_axes(mesh):
      return train_step(state, batch, rng, model=model, tx=tx, opts=opts, schedule=schedule)

  out_sh = rep  # scalars and small metric accumulators, replicated
  return jax.jit(fn, in_shardings=(shardings, batch_sh, rep), out_shardings=(shardings, out_sh), donate_argnums=(0,))
