"""The optimizer: AdamW with global-norm clipping, a warm-up + decay learning-rate schedule, weight
decay on matrices only, and the fixed positional table left untouched."""

from __future__ import annotations

import jax
import ml_collections
import optax


def learning_rate_schedule(opt: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warm-up to opt.learning_rate, then 'constant', 'cosine' or 'linear' decay to opt.end_lr_ratio*lr."""
  lr, warmup = opt.learning_rate, int(opt.warmup_steps)
  decay_steps = max(total_steps - warmup, 1)
  end = lr * opt.end_lr_ratio
  if opt.schedule == "constant":
    after = optax.constant_schedule(lr)
  elif opt.schedule == "cosine":
    after = optax.cosine_decay_schedule(lr, decay_steps, alpha=opt.end_lr_ratio)
  elif opt.schedule == "linear":
    after = optax.linear_schedule(lr, end, decay_steps)
  else:
    raise ValueError(f"optimizer.schedule must be 'constant', 'cosine' or 'linear', got {opt.schedule!r}")
  if warmup <= 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def _is_frozen(path) -> bool:
  return any(getattr(k, "key", None) == "pos_embed" for k in path)


def _decays(path, leaf) -> bool:
  """Weight decay on matrices only (not biases, norm scales or the fixed positional table)."""
  return (not _is_frozen(path)) and getattr(path[-1], "key", None) == "kernel"


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """AdamW with global-norm clipping, warm-up schedule, decay mask; pos_embed stays fixed."""
  opt = config.optimizer
  schedule = learning_rate_schedule(opt, config.total_steps)
  adamw = optax.adamw(
    schedule,
    b1=opt.b1,
    b2=opt.b2,
    eps=opt.eps,
    weight_decay=opt.weight_decay,
    mask=lambda p: jax.tree_util.tree_map_with_path(_decays, p),
  )
  # identity() keeps the optimizer-state structure the same with clipping off, so a checkpoint
  # restores whatever grad_clip is.
  clip = optax.clip_by_global_norm(opt.grad_clip) if opt.grad_clip > 0 else optax.identity()
  trainable = optax.chain(clip, adamw)
  labels = lambda p: jax.tree_util.tree_map_with_path(lambda path, _: "frozen" if _is_frozen(path) else "train", p)
  return optax.multi_transform({"train": trainable, "frozen": optax.set_to_zero()}, labels)
