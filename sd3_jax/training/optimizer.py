"""The optimizer: AdamW with global-norm clipping, a warm-up + decay learning-rate schedule
(constant, cosine, linear or warmup-stable-decay), weight decay on matrices only, the fixed
positional table left untouched, and under muP each parameter's Adam step scaled by its role
(sd3_jax/models/mup.py; docs/mup_wsd.md)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax

from sd3_jax.models import backbones, mmdit, mup

# Cooldown shapes of the WSD schedule: x in [0, 1] (the fraction of the cooldown done) -> how
# far the learning rate has gone from the peak to the end value.
DECAY_SHAPES = {"1-sqrt": jnp.sqrt, "linear": lambda x: x, "cosine": lambda x: 0.5 * (1.0 - jnp.cos(jnp.pi * x))}
SCHEDULES = ("constant", "cosine", "linear", "wsd")


def decay_window(total_steps: int, decay_fraction: float) -> tuple[int, int]:
  """(s0, n) of a WSD schedule: the cooldown is the last n = round(decay_fraction x total_steps)
  steps (Python's round: halves to even), s0 = total_steps - n."""
  if not 0.0 <= decay_fraction <= 1.0:
    raise ValueError(f"optimizer.decay_fraction must be in [0, 1], got {decay_fraction}")
  n = int(round(decay_fraction * total_steps))
  return total_steps - n, n


def wsd_schedule(
  peak: float, total_steps: int, warmup_steps: int, decay_fraction: float, decay_shape: str, end_lr_ratio: float
) -> optax.Schedule:
  """Warmup-stable-decay (Hägele et al. 2024): lr = peak step/W for step < W (the warm-up), peak
  until s0, then for s0 <= step: lr = end + (peak - end)(1 - g((step - s0)/n)) with end =
  end_lr_ratio x peak and g(x) = sqrt(x) ('1-sqrt'), x ('linear') or (1 - cos(pi x))/2 ('cosine');
  (s0, n) = decay_window(total_steps, decay_fraction). Before s0 the schedule does not depend on
  total_steps, which is what lets a shorter run branch off a longer one (scaling/branches.py)."""
  if decay_shape not in DECAY_SHAPES:
    raise ValueError(f"optimizer.decay_shape must be one of {sorted(DECAY_SHAPES)}, got {decay_shape!r}")
  s0, n = decay_window(total_steps, decay_fraction)
  if warmup_steps > s0:
    raise ValueError(
      f"optimizer.warmup_steps ({warmup_steps}) runs into the WSD cooldown, which starts at step {s0} (the last "
      f"{n} of {total_steps} steps): lower warmup_steps or optimizer.decay_fraction"
    )
  end, g = peak * end_lr_ratio, DECAY_SHAPES[decay_shape]

  def schedule(count):
    step = jnp.asarray(count, jnp.float32)
    warm = peak * step / warmup_steps if warmup_steps else jnp.float32(peak)
    cool = end + (peak - end) * (1.0 - g(jnp.clip((step - s0) / max(n, 1), 0.0, 1.0)))
    return jnp.where(step < warmup_steps, warm, jnp.where(step < s0, jnp.float32(peak), cool))

  return schedule


def learning_rate_schedule(opt: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warm-up to opt.learning_rate, then 'constant', 'cosine' or 'linear' decay to
  opt.end_lr_ratio*lr, or 'wsd' (``wsd_schedule``)."""
  lr, warmup = opt.learning_rate, int(opt.warmup_steps)
  if opt.schedule == "wsd":
    return wsd_schedule(lr, total_steps, warmup, opt.decay_fraction, opt.decay_shape, opt.end_lr_ratio)
  decay_steps = max(total_steps - warmup, 1)
  end = lr * opt.end_lr_ratio
  if opt.schedule == "constant":
    after = optax.constant_schedule(lr)
  elif opt.schedule == "cosine":
    after = optax.cosine_decay_schedule(lr, decay_steps, alpha=opt.end_lr_ratio)
  elif opt.schedule == "linear":
    after = optax.linear_schedule(lr, end, decay_steps)
  else:
    raise ValueError(f"optimizer.schedule must be one of {SCHEDULES}, got {opt.schedule!r}")
  if warmup <= 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def _is_frozen(path) -> bool:
  return any(getattr(k, "key", None) == "pos_embed" for k in path)


def _decays(path, leaf) -> bool:
  """Weight decay on matrices only (not biases, norm scales or the fixed positional table)."""
  return (not _is_frozen(path)) and getattr(path[-1], "key", None) == "kernel"


def scale_by_mup(scaling: mup.Scaling, classify: mup.Classify) -> optax.GradientTransformation:
  """Multiplies every parameter's update by its muP learning-rate factor (models/mup.py: 1/m for
  hidden and output weights). Placed before the weight decay, so that decay x lr is the same at
  every width, as in mup's MuAdamW."""

  def init(params):
    mup.roles(params, classify)  # every parameter has a class
    return optax.EmptyState()

  def update(updates, state, params=None):
    def scale(path, u):
      factor = scaling.lr_factor(classify("/".join(mup.path_names(path))))
      return u if factor == 1.0 else u * factor

    return jax.tree_util.tree_map_with_path(scale, updates), state

  return optax.GradientTransformation(init, update)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """AdamW with global-norm clipping, warm-up schedule, decay mask; pos_embed stays fixed. Under
  muP (config.model.parametrization) each parameter's Adam step is scaled by its role; SP keeps
  optax.adamw itself (and its optimizer-state layout, so older checkpoints restore)."""
  opt = config.optimizer
  schedule = learning_rate_schedule(opt, config.total_steps)
  mask = lambda p: jax.tree_util.tree_map_with_path(_decays, p)
  mcfg = mmdit.config_from_preset(**config.model)
  if mcfg.parametrization == "sp":
    adamw = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay, mask=mask)
  else:  # optax.adamw's own chain with the muP factors between Adam and the weight decay
    adamw = optax.chain(
      optax.scale_by_adam(b1=opt.b1, b2=opt.b2, eps=opt.eps),
      scale_by_mup(mcfg.mup_scaling, backbones.param_class),
      optax.add_decayed_weights(opt.weight_decay, mask),
      optax.scale_by_learning_rate(schedule),
    )
  # identity() keeps the optimizer-state structure the same with clipping off, so a checkpoint
  # restores whatever grad_clip is.
  clip = optax.clip_by_global_norm(opt.grad_clip) if opt.grad_clip > 0 else optax.identity()
  trainable = optax.chain(clip, adamw)
  labels = lambda p: jax.tree_util.tree_map_with_path(lambda path, _: "frozen" if _is_frozen(path) else "train", p)
  return optax.multi_transform({"train": trainable, "frozen": optax.set_to_zero()}, labels)
