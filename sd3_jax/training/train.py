"""The training loop: ``train_and_evaluate(config, workdir)``.

Only the training room reads the experiment config. The flow: config -> mesh + rules ->
eval_shape(init) -> shardings -> restore-or-init inside jit -> grain iterator -> global batch ->
train step -> metrics / async checkpoints / validation loss / samples (docs/training.md). The
parts live beside this file: ``state`` (model and sharded state), ``optimizer``, ``step`` (the
jitted update), ``train_data`` (sources and batch shapes), ``validation``, ``writers``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from sd3_jax import sharding, text_conditioning
from sd3_jax.data import buckets, input_pipeline
from sd3_jax.evaluation import scoring
from sd3_jax.inference import generation
from sd3_jax.models import backbones, flops, mmdit
from sd3_jax.storage import checkpoint as ckpt_lib
from sd3_jax.training import branch, config_checks, divergence, goodput, init_from, optimizer, preemption, prefetch
from sd3_jax.training import metrics as metrics_lib
from sd3_jax.training import startup_checks, state as state_lib, step as step_lib, train_data, validation
from sd3_jax.training import writers

log = logging.getLogger(__name__)


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
    raise divergence.TrainingDivergedError(
      f"non-finite training values at step {step}: {bad}; {cause + '; ' if cause else ''}stopping ({where}). {advice}"
    )


def _sample_conditioner(s: ml_collections.ConfigDict):
  """The fixed prompts' encodings, computed once: the text encoders (a T5-XXL among them) are
  loaded, used and dropped here, not held for the whole run."""
  encoders = text_conditioning.load_conditioner(
    s.text_encoders, t5_length=s.t5_length, clip_length=s.clip_length, project_clip_l=s.project_clip_l
  )
  return generation.encode_once(encoders, list(s.prompts), with_empty=s.cfg_scale != 1.0)


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, *, started_at: float | None = None
) -> dict[str, Any]:
  """Train (resuming from workdir/checkpoints if present); returns the last logged metrics.

  Config values that cannot run are refused first (config_checks). Raises preemption.Preempted
  after saving the current step when told to stop (SIGTERM), and TrainingDivergedError on
  NaN/Inf; in-flight checkpoint saves are waited for in every case. On any error the async
  checkpointer and the input pipeline's workers are shut down before it propagates, so a clean
  error is not followed by a second traceback from their threads at interpreter exit.

  Wall time goes by category to WORKDIR/goodput (training.goodput; ``started_at``: when the
  process started, default now), summarised in metrics.jsonl and at exit."""
  config_checks.check_runnable(config.to_dict())
  startup_checks.check_storage(
    workdir=workdir,
    record_paths=(
      {"data.path": config.data.path, "data.val_path": config.data.val_path} if config.data.source == "records" else {}
    ),
  )
  closers: list = []
  try:
    return _train_and_evaluate(config, workdir, closers, started_at)
  except BaseException:
    for close in reversed(closers):
      try:
        close()
      except Exception as e:  # the first error is the one to report
        log.warning("while shutting down after an error: %s: %s", type(e).__name__, e)
    raise


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, closers: list, started_at=None):
  workdir = epath.Path(workdir)  # a local path or a URL such as gs://bucket/run
  workdir.mkdir(parents=True, exist_ok=True)
  recorder = goodput.GoodputRecorder(str(workdir), enabled=jax.process_index() == 0, start_time=started_at)
  closers.append(lambda: recorder.record(end=recorder.end or "error"))
  mesh = sharding.mesh_from_settings(config.mesh)
  model = state_lib.make_model(config)
  tx = optimizer.make_optimizer(config)
  opts = step_lib.step_options(config)
  primary = jax.process_index() == 0
  if primary:
    log.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), mesh.size, jax.process_count())
  shapes = train_data.latent_sizes(config)  # one per aspect bucket; each compiles its own step once
  names = [buckets.bucket_name(hw) for hw in shapes]
  train_sources = {hw: train_data.make_source(config, "train", hw) for hw in shapes}
  val_sources = {hw: train_data.make_source(config, "val", hw) for hw in shapes} if config.val.every > 0 else None
  train_data.check_config_and_data(config, mesh, {"train": train_sources, "val": val_sources})

  abstract, shardings = state_lib.state_shardings(model, tx, mesh)
  keep_steps = {int(k) for k in config.keep_checkpoint_steps}  # a stable run's branch points
  checkpointer = ckpt_lib.Checkpointer(
    str(workdir / "checkpoints"),
    max_to_keep=config.keep_checkpoints,
    async_save=config.async_checkpointing,
    compress=config.checkpoint_compression,
    keep_steps=sorted(keep_steps),
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
  if latest is not None:  # a clear error for a workdir trained with another backbone, before any restore
    try:
      saved_model = (checkpointer.saved_config(latest) or {}).get("model") or {}
    except Exception:  # an unreadable config: restore_newest_intact names the damage
      saved_model = {}
    where = f"the checkpoint of step {latest} in {workdir / 'checkpoints'}"
    backbones.check_backbone(saved_model.get("backbone") or "mmdit", model.config.backbone, where)
  with recorder.phase("restore"):  # the newest intact step; damaged ones are moved aside
    restored = checkpointer.restore_newest_intact(abstract_state=abstract, data_iterator=train_iter)
  if restored is not None:
    state, _, latest = restored
    recorder.resumed(latest)
    log.info("resumed from step %d", latest)
    if primary:
      print(f"resuming from step {latest} ({workdir / 'checkpoints' / str(latest)})", flush=True)
  elif config.branch_from:  # a cooldown branch: another run's state, this run's schedule
    state = branch.start(config, abstract, train_iter)
  else:
    state = state_lib.create_sharded_state(model, tx, mesh, jax.random.key(config.seed), shardings)
    if config.init_from:  # fine-tuning: the checkpoint's weights, EMA equal to them, fresh optimizer
      params = init_from.load(config.init_from, scan_layers=model.scan_layers, shardings=shardings.params)
      state = state.replace(params=params, ema_params=jax.tree.map(jnp.copy, params))
      log.info("initialised the parameters from %s", config.init_from)
  start_step = int(jax.device_get(state.step))

  d = config.data
  schedule = optimizer.learning_rate_schedule(config.optimizer, config.total_steps)
  step_fn = step_lib.make_train_step(model, tx, opts, schedule, mesh, shardings, train_data.batch_shapes(config))
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
  writer = writers.MetricWriter(workdir, is_primary=primary, resume_step=start_step)
  val_fn = validation.make_validation_fn(model, mesh, opts.formulation) if val_sources is not None else None

  s, e = config.sample, config.eval
  if e.every > 0:  # the evaluator encodes its own prompts too: keep the text encoders
    conditioner = text_conditioning.load_conditioner(
      s.text_encoders, t5_length=s.t5_length, clip_length=s.clip_length, project_clip_l=s.project_clip_l
    )
  elif s.every > 0:
    conditioner = _sample_conditioner(s)
  if s.every > 0 or e.every > 0:
    decoder = None if s.pixel_space else generation.load_decoder(s.vae)
  evaluator = scoring.PeriodicEvaluator.from_settings(e.to_dict(), mesh) if e.every > 0 else None

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
        or done in keep_steps
        or (val_fn is not None and done % config.val.every == 0)
        or (s.every > 0 and done % s.every == 0)
        or (e.every > 0 and done % e.every == 0)
      )
      compiles = b not in compiled and step != start_step  # a new bucket shape: not timed
      if compiles:
        jax.block_until_ready(state.step)
        recorder.steps_done(step)
      if b not in compiled:
        recorder.switch("compile")
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
      if compiles or step == start_step:
        recorder.steps_done(done)  # the compiling step: compile time, not step time
        recorder.switch("step")
      if is_log:
        values = acc.compute()  # waits for the step
        recorder.steps_done(done)
        values.update(goodput.metrics(recorder.summary()))
        values.update({k: v for k, v in timer.tick(done, flops=window_flops).items() if v is not None})
        if len(shapes) > 1:
          values.update({f"bucket_steps/{n}": c for n, c in zip(names, bucket_steps)})
        window_flops, bucket_steps = 0.0, [0] * len(shapes)
        values["param_norm"] = float(jax.device_get(out["param_norm"]))
        _check_finite(done, {k: values[k] for k in ("loss", "grad_norm", "param_norm")}, checkpointer, explain(done))
        writer.write_scalars(done, values)
        recorder.record()
        if primary:
          print(metrics_lib.format_progress(done, config.total_steps, values), flush=True)
        last = dict(values, step=done)
        acc = None
      if stop:  # preempted: save this step now, wait until it is committed, and stop
        jax.block_until_ready(out["loss"])
        recorder.steps_done(done)
        with recorder.phase("checkpoint"):
          if checkpointer.latest_step() != done:
            save(done, out)
          checkpointer.wait_until_finished()
        recorder.record(end=f"{'stopped by Ctrl-C' if watcher.interrupted else 'preempted'} at step {done}")
        writer.flush()
        raise watcher.stopped(done)  # Preempted (SIGTERM) or Interrupted (Ctrl-C)
      evaluates = (
        (val_fn is not None and (done % config.val.every == 0 or is_last))
        or (s.every > 0 and (done % s.every == 0 or is_last))
        or (evaluator is not None and (done % e.every == 0 or is_last))
      )
      saves = done % config.checkpoint_every == 0 or is_last or done in keep_steps
      if evaluates or saves:  # close the step window first: evaluation and saving are not steps
        jax.block_until_ready(out["loss"])
        recorder.steps_done(done)
      with timer.paused(), recorder.phase("evaluation"):
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
            formulation=opts.formulation,
          )
          writer.write_scalars(done, val)
          if primary:
            print(metrics_lib.format_progress(done, config.total_steps, val), flush=True)
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
            formulation=opts.formulation,
          )
        if evaluator is not None and (done % e.every == 0 or is_last):
          values = evaluator(
            model,
            state.ema_params,
            conditioner,
            decoder=decoder,
            latent_shape=(*shapes[0], d.latent_channels),
            formulation=opts.formulation,
          )
          writer.write_scalars(done, values)
          last.update(values)
        if saves:
          with recorder.phase("checkpoint"):
            save(done, out)
    if watcher.interrupted:  # Ctrl-C after the last step's check: complete and saved, stop as asked
      with recorder.phase("checkpoint"):
        checkpointer.wait_until_finished()
      recorder.record(end=f"stopped by Ctrl-C at step {checkpointer.latest_step()}")
      raise watcher.stopped(checkpointer.latest_step())
  finally:  # also on errors (NaN stop, preemption, bugs): never leave a save half written
    if config.data.prefetch:
      batches.close()
    with recorder.phase("checkpoint"):
      checkpointer.wait_until_finished()
    watcher.close()  # after the wait: a Ctrl-C during it is the watcher's (a second one aborts)
    checkpointer.close()
    writer.close()
  summary = recorder.summary()
  recorder.record(end="done")
  if primary and summary:
    print(goodput.format_summary(summary), flush=True)
  return last
