"""The pure train step: noise and timesteps for the global batch, the rectified-flow loss,
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

  sampler: str = "logit_normal"
  logit_mean: float = 0.0
  logit_std: float = 1.0
  mode_scale: float = 1.29
  shift: float = 1.0
  text_dropout: float = 0.464
  text_layout: flow.TextLayout = flow.TextLayout()
  grad_accum_steps: int = 1
  ema_decay: float = 0.99
  ema_every: int = 100


def step_options(config: ml_collections.ConfigDict) -> StepOptions:
  f = config.flow
  return StepOptions(
    sampler=f.sampler,
    logit_mean=f.logit_mean,
    logit_std=f.logit_std,
    mode_scale=f.mode_scale,
    shift=f.shift,
    text_dropout=f.text_dropout,
    text_layout=flow.TextLayout(
      clip_l_dim=config.text.clip_l_dim, clip_g_dim=config.text.clip_g_dim, clip_tokens=config.text.clip_tokens
    ),
    grad_accum_steps=config.grad_accum_steps,
    ema_decay=config.ema.decay,
    ema_every=config.ema.every,
  )


def sample_noise(batch: dict, rng: jax.Array, opts: StepOptions) -> dict:
  """Draw t, the noise and the text-encoder dropout for the whole global batch at once, so that
  gradient accumulation changes nothing but the order of float additions."""
  x0 = batch["latent"]
  k_t, k_eps, k_drop = jax.random.split(rng, 3)
  t = flow.sample_t(
    k_t, (x0.shape[0],), opts.sampler, m=opts.logit_mean, s=opts.logit_std, mode_scale=opts.mode_scale, shift=opts.shift
  )
  eps = jax.random.normal(k_eps, x0.shape, jnp.float32)
  context, pooled = batch["context"], batch["pooled"]
  if opts.text_dropout > 0:
    context, pooled = flow.drop_text_conditioning(k_drop, context, pooled, opts.text_dropout, opts.text_layout)
  return dict(x0=x0.astype(jnp.float32), eps=eps, t=t, context=context, pooled=pooled)


def rf_loss(params, model: mmdit.MMDiT, ex: dict):
  """Rectified-flow loss: sum over examples of ||v(z_t, t) - (eps - x0)||^2 (mean over pixels)."""
  z_t = flow.noised(ex["x0"], ex["eps"], ex["t"])
  v = model.apply({"params": params}, z_t, ex["t"], ex["pooled"], ex["context"])
  per_example = flow.per_example_loss(v, ex["x0"], ex["eps"])
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
  grad_fn = jax.value_and_grad(rf_loss, has_aux=True)
  n = opts.grad_accum_steps
  if n == 1:
    (loss_sum, per_example), grads = grad_fn(state.params, model, ex)
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
      (l, pe), g = grad_fn(state.params, model, mb)
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
