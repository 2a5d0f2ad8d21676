"""Rectified-flow training of the MM-DiT: TrainState, sharded init, the jitted train step, the loop.

Only this module and main.py read the experiment config. The flow (config -> mesh + rules ->
eval_shape(init) -> shardings -> restore-or-init inside jit -> grain iterator -> global batch ->
train_step -> metrics / async checkpoints / validation loss) is described in the README.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import linen as nn
from etils import epath
from flax import struct

from sd3_jax import checkpoint as ckpt_lib
from sd3_jax import buckets, config_checks, divergence, flow, generation, init_from
from sd3_jax import input_pipeline, prefetch
from sd3_jax import metrics as metrics_lib
from sd3_jax import preemption, sharding, startup_checks, text_conditioning, validation
from sd3_jax.evaluation import run as eval_run

# The data side of the trainer, part of its namespace (train.make_source, train.batch_shapes, ...).
from sd3_jax.train_data import batch_shapes, check_config_and_data, latent_sizes, make_source  # noqa: F401
from sd3_jax.models import attention, flops, mmdit

log = logging.getLogger(__name__)


class TrainingDivergedError(RuntimeError):
  """The loss or gradient became NaN/Inf; the last good checkpoint is left in place."""


@struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any


# --------------------------------------------------------------------------------------------
# Model, optimizer, state


def make_model(config: ml_collections.ConfigDict, platform: str | None = None) -> mmdit.MMDiT:
  """The MM-DiT of ``config`` with attention_impl resolved for ``platform`` (default: that of
  jax.devices(); tools.aot_compile passes 'tpu' for compile-only topologies)."""
  impl = attention.resolve_impl(config.attention_impl, platform or jax.devices()[0].platform, config.dtype)
  return mmdit.MMDiT(
    mmdit.config_from_preset(**config.model),
    dtype=jnp.dtype(config.dtype),
    remat=config.remat,
    scan_layers=config.scan_layers,
    attention_impl=impl,
    attention_blocks=attention.SplashBlocks(config.attention_block_q, config.attention_block_kv),
  )


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


def init_state(model: mmdit.MMDiT, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
  params = mmdit.init_params(model, rng)
  return TrainState(
    step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), ema_params=jax.tree.map(jnp.copy, params)
  )


def state_shardings(model, tx, mesh, rules=sharding.LOGICAL_RULES):
  """(abstract state with shardings, sharding pytree) without allocating anything.

  Parameters, EMA and Adam moments get the parameters' logical axes; the rest is replicated.
  """
  boxed_params = mmdit.abstract_params(model)
  param_specs = sharding.logical_specs(boxed_params)
  abstract = jax.eval_shape(functools.partial(init_state, model, tx), jax.random.key(0))
  shapes = nn.unbox(boxed_params)
  specs = TrainState(
    step=jax.sharding.PartitionSpec(),
    params=param_specs,
    opt_state=sharding.specs_like_params(abstract.opt_state, param_specs, shapes),
    ema_params=param_specs,
  )
  shardings = sharding.logical_to_mesh_shardings(specs, mesh, rules)
  sharding.check_divisible(abstract.params, shardings.params, "parameter")
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  return abstract, shardings


def create_sharded_state(model, tx, mesh, rng, shardings) -> TrainState:
  """Initialise straight into the target shardings (never materialised whole on one device)."""
  with sharding.logical_axes(mesh):
    return jax.jit(lambda k: init_state(model, tx, k), out_shardings=shardings)(rng)


# --------------------------------------------------------------------------------------------
# The train step


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


# --------------------------------------------------------------------------------------------
# The loop


def _check_finite(step: int, values: dict, checkpointer, explain=None) -> None:
  """Raises TrainingDivergedError on NaN/Inf; ``explain()`` -> (inputs_bad, sentence) re-reads the
  recent batches (divergence.explain) only then, to say whether the inputs or the training diverged."""
  bad = {k: v for k, v in values.items() if not np.isfinite(v)}
  if bad:
    last = checkpointer.latest_step()
    where = f"the last good checkpoint (step {last}) is kept" if last is not None else "no checkpoint was written"
    try:
      inputs_bad, cause = explain() if explain is not None else (False, "")
    except Exception as e:  # the divergence is the error to report
      inputs_bad, cause = False, f"the inputs could not be re-read ({type(e).__name__}: {e})"
    advice = (
      "Remove or rebuild those records, then resume from the checkpoint."
      if inputs_bad
      else "Lower optimizer.learning_rate, raise optimizer.warmup_steps, enable qk-norm or use "
      "float32 compute, then resume from the checkpoint."
    )
    raise TrainingDivergedError(
      f"non-finite training values at step {step}: {bad}; {cause + '; ' if cause else ''}stopping ({where}). {advice}"
    )


def _sample_conditioner(s: ml_collections.ConfigDict):
  """The fixed prompts' encodings, computed once: the text encoders (a T5-XXL among them) are
  loaded, used and dropped here, not held for the whole run."""
  encoders = text_conditioning.load_conditioner(
    s.text_encoders, t5_length=s.t5_length, clip_length=s.clip_length, project_clip_l=s.project_clip_l
  )
  return generation.encode_once(encoders, list(s.prompts), with_empty=s.cfg_scale != 1.0)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Train (resuming from workdir/checkpoints if present); returns the last logged metrics.

  Config values that cannot run are refused first (config_checks). Raises preemption.Preempted
  after saving the current step when told to stop (SIGTERM), and TrainingDivergedError on
  NaN/Inf; in-flight checkpoint saves are waited for in every case. On any error the async
  checkpointer and the input pipeline's workers are shut down before it propagates, so a clean
  error is not followed by a second traceback from their threads at interpreter exit."""
  config_checks.check_runnable(config.to_dict())
  startup_checks.check_storage(
    workdir=workdir,
    record_paths=(
      {"data.path": config.data.path, "data.val_path": config.data.val_path} if config.data.source == "records" else {}
    ),
  )
  closers: list = []
  try:
    return _train_and_evaluate(config, workdir, closers)
  except BaseException:
    for close in reversed(closers):
      try:
        close()
      except Exception as e:  # the first error is the one to report
        log.warning("while shutting down after an error: %s: %s", type(e).__name__, e)
    raise


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, closers: list) -> dict[str, Any]:
  workdir = epath.Path(workdir)  # a local path or a URL such as gs://bucket/run
  workdir.mkdir(parents=True, exist_ok=True)
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  model = make_model(config)
  tx = make_optimizer(config)
  opts = step_options(config)
  primary = jax.process_index() == 0
  if primary:
    log.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), mesh.size, jax.process_count())
  shapes = latent_sizes(config)  # one per aspect bucket; each compiles its own step once
  names = [buckets.bucket_name(hw) for hw in shapes]
  train_sources = {hw: make_source(config, "train", hw) for hw in shapes}
  val_sources = {hw: make_source(config, "val", hw) for hw in shapes} if config.val.every > 0 else None
  check_config_and_data(config, mesh, {"train": train_sources, "val": val_sources})

  abstract, shardings = state_shardings(model, tx, mesh)
  checkpointer = ckpt_lib.Checkpointer(
    str(workdir / "checkpoints"), max_to_keep=config.keep_checkpoints, async_save=config.async_checkpointing
  )
  closers.append(checkpointer.close)
  # Batches stay in the records' dtype (float16) on the host; the step casts them on device.
  iterators = [
    input_pipeline.make_train_iterator(
      train_sources[hw],
      global_batch_size=config.global_batch_size,
      seed=config.seed + i,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      shuffle=config.data.shuffle,
      dtype=None,
      worker_count=input_pipeline.resolve_worker_count(config.data.worker_count),
    )
    for i, hw in enumerate(shapes)
  ]
  closers.extend(it.close for it in iterators)
  # Buckets: every global batch from one bucket, drawn in proportion to size from (seed, step).
  train_iter = (
    buckets.BucketedIterator(iterators, [len(train_sources[hw]) for hw in shapes], config.seed)
    if config.data.buckets
    else iterators[0]
  )

  def explain(done: int):
    """On NaN/Inf only: re-read the recent batches and say whether the inputs diverged (one
    bucket; with several, the diagnosis is left out)."""
    if config.data.buckets:
      return None
    return lambda: divergence.explain(
      train_sources[shapes[0]],
      range(max(start_step, done - config.log_every), done),
      global_batch_size=config.global_batch_size,
      seed=config.seed,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      shuffle=config.data.shuffle,
    )

  latest = checkpointer.latest_step()
  if latest is not None:
    state, _ = checkpointer.restore(latest, abstract_state=abstract, data_iterator=train_iter)
    log.info("resumed from step %d", latest)
  else:
    state = create_sharded_state(model, tx, mesh, jax.random.key(config.seed), shardings)
    if config.init_from:  # fine-tuning: the checkpoint's weights, EMA equal to them, fresh optimizer
      params = init_from.load(config.init_from, scan_layers=model.scan_layers, shardings=shardings.params)
      state = state.replace(params=params, ema_params=jax.tree.map(jnp.copy, params))
      log.info("initialised the parameters from %s", config.init_from)
  start_step = int(jax.device_get(state.step))

  d = config.data
  schedule = learning_rate_schedule(config.optimizer, config.total_steps)
  step_fn = make_train_step(model, tx, opts, schedule, mesh, shardings, batch_shapes(config))
  # Made once where the step wants it (replicated; a jit, so it is a global array on every
  # host): a single-device key would be copied to every device at every step.
  step_rng = jax.jit(lambda: jax.random.key(config.seed + 1), out_shardings=sharding.replicated(mesh))()

  mcfg = mmdit.config_from_preset(**config.model)
  bucket_flops = [
    flops.train_step_flops(mcfg, h, w, d.context_len, config.global_batch_size) for h, w in shapes
  ]  # MFU counts the FLOPs of the buckets that actually ran
  if primary and len(shapes) > 1:
    log.info(
      "aspect buckets (latent hxw: records, model FLOPs per step): %s",
      ", ".join(f"{n}: {len(train_sources[hw])}, {f:.4g}" for n, hw, f in zip(names, shapes, bucket_flops)),
    )
  peak = metrics_lib.peak_flops_per_device(jax.devices()[0].device_kind, override=config.peak_flops_per_device or None)
  timer = metrics_lib.StepTimer(
    flops_per_step=bucket_flops[0],
    images_per_step=config.global_batch_size,
    num_devices=jax.device_count(),
    peak_flops_per_device=peak,
  )
  # A resumed run drops what a killed run logged after its checkpoint (it is logged again).
  writer = metrics_lib.MetricWriter(workdir, is_primary=primary, resume_step=start_step)
  val_fn = validation.make_validation_fn(model, mesh) if val_sources is not None else None

  s, e = config.sample, config.eval
  if e.every > 0:  # the evaluator encodes its own prompts too: keep the text encoders
    conditioner = text_conditioning.load_conditioner(
      s.text_encoders, t5_length=s.t5_length, clip_length=s.clip_length, project_clip_l=s.project_clip_l
    )
  elif s.every > 0:
    conditioner = _sample_conditioner(s)
  if s.every > 0 or e.every > 0:
    decoder = None if s.pixel_space else generation.load_decoder(s.vae)
  evaluator = eval_run.PeriodicEvaluator.from_settings(e.to_dict(), mesh) if e.every > 0 else None

  to_device = functools.partial(sharding.make_global_batch, mesh=mesh)
  if config.data.buckets:  # items are (bucket, host batch)
    to_device = lambda item, f=to_device: (item[0], f(item[1]))  # noqa: E731
  batches = (
    prefetch.Prefetcher(train_iter, to_device, config.data.prefetch)
    if config.data.prefetch
    else map(to_device, train_iter)
  )
  data_position = batches if config.data.prefetch else train_iter  # what checkpoints save
  if config.data.prefetch:
    closers.append(batches.close)

  def save(done: int, out: dict) -> None:
    # The state about to be saved comes from this step's update: check its parameters too,
    # not only the loss computed before the update.
    _check_finite(
      done, {k: float(jax.device_get(out[k])) for k in ("loss", "grad_norm", "param_norm")}, checkpointer, explain(done)
    )
    checkpointer.save(done, state, data_iterator=data_position, config=config.to_dict(), force=True)

  watcher = preemption.PreemptionWatcher(checkpointer.reached_preemption)
  acc, window_flops, bucket_steps, compiled = None, 0.0, [0] * len(shapes), set()
  last: dict[str, Any] = {}
  try:
    for step in range(start_step, config.total_steps):
      done = step + 1
      is_last = done == config.total_steps
      is_log = done % config.log_every == 0 or is_last
      b = buckets.bucket_of_step(train_iter.sizes, config.seed, step) if config.data.buckets else 0
      steady = not (
        b not in compiled
        or is_log
        or done % config.checkpoint_every == 0
        or (val_fn is not None and done % config.val.every == 0)
        or (s.every > 0 and done % s.every == 0)
        or (e.every > 0 and done % e.every == 0)
      )
      compiles = b not in compiled and step != start_step  # a new bucket shape: not timed
      if compiles:
        jax.block_until_ready(state.step)
      with (
        timer.paused(steps=1) if compiles else contextlib.nullcontext(),
        jax.transfer_guard(config.transfer_guard if steady else "allow"),
      ):
        item = next(batches)  # already on the devices
        batch = item[1] if config.data.buckets else item
        state, out = step_fn(state, batch, step_rng)
        acc = out["metrics"] if acc is None else acc.merge(out["metrics"])
        stop = watcher.should_stop(done)
        if compiles:
          jax.block_until_ready(out["loss"])
      window_flops += 0.0 if compiles else bucket_flops[b]
      compiled.add(b)
      bucket_steps[b] += 1
      if step == start_step:  # start the clock after the compiling step
        jax.block_until_ready(out["loss"])
        timer.tick(done)
        window_flops = 0.0
      if is_log:
        values = acc.compute()  # waits for the step
        values.update({k: v for k, v in timer.tick(done, flops=window_flops).items() if v is not None})
        if len(shapes) > 1:
          values.update({f"bucket_steps/{n}": c for n, c in zip(names, bucket_steps)})
        window_flops, bucket_steps = 0.0, [0] * len(shapes)
        values["param_norm"] = float(jax.device_get(out["param_norm"]))
        _check_finite(done, {k: values[k] for k in ("loss", "grad_norm", "param_norm")}, checkpointer, explain(done))
        writer.write_scalars(done, values)
        if primary:
          print(metrics_lib.format_progress(done, config.total_steps, values), flush=True)
        last = dict(values, step=done)
        acc = None
      if stop:  # preempted: save this step now, wait until it is committed, and stop
        if checkpointer.latest_step() != done:
          save(done, out)
        checkpointer.wait_until_finished()
        writer.flush()
        raise preemption.Preempted(done)
      with timer.paused():
        if val_fn is not None and (done % config.val.every == 0 or is_last):
          params = state.ema_params if config.val.use_ema else state.params
          val = validation.evaluate(
            val_fn,
            params,
            {n: val_sources[hw] for n, hw in zip(names, shapes)},
            mesh,
            num_levels=config.val.levels,
            seed=config.val.seed,
            batch_size=config.val.batch_size,
            num_examples=config.val.num_examples,
          )
          writer.write_scalars(done, val)
          last.update(val)
        if s.every > 0 and (done % s.every == 0 or is_last):
          generation.write_sample_grid(
            model,
            state.ema_params,
            conditioner,
            list(s.prompts),
            str(workdir / "samples" / f"step_{done:08d}.png"),
            latent_shape=(*shapes[0], d.latent_channels),
            decoder=decoder,
            num_per_prompt=s.num_per_prompt,
            num_steps=s.num_steps,
            cfg_scale=s.cfg_scale,
            shift=s.shift,
            seed=s.seed,
            mesh=mesh,
          )
        if evaluator is not None and (done % e.every == 0 or is_last):
          values = evaluator(
            model, state.ema_params, conditioner, decoder=decoder, latent_shape=(*shapes[0], d.latent_channels)
          )
          writer.write_scalars(done, values)
          last.update(values)
        if done % config.checkpoint_every == 0 or is_last:
          save(done, out)
  finally:  # also on errors (NaN stop, preemption, bugs): never leave a save half written
    watcher.close()
    if config.data.prefetch:
      batches.close()
    checkpointer.wait_until_finished()
    checkpointer.close()
    writer.close()
  return last
