"""Validation loss the paper's way (section 5.1): the loss at fixed t levels over fixed examples
with fixed noise, comparable across runs, model sizes, batch sizes and restarts; for every
formulation its own loss (val/loss) and the rf yardstick (val/rf_loss) that all formulations
share (``flow.levels``). With aspect buckets, each bucket is reported and the overall loss is the
example-weighted mean over all of them.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from sd3_jax import flow, sharding
from sd3_jax.data import input_pipeline


def make_validation_fn(model, mesh, formulation=None):
  """Jitted per-level sums of the own and yardstick losses (and the example count) of one global
  batch at the levels ``own_t`` (the formulation's times of the levels, ``flow.levels.level_times``)."""
  f = formulation or flow.get_formulation(flow.DEFAULT)
  rep = sharding.replicated(mesh)

  def fn(params, batch, own_t):
    with sharding.logical_axes(mesh):
      predict = lambda x, t: model.apply({"params": params}, x, t, batch["pooled"], batch["context"])
      return flow.levels.loss_sums(
        predict, f, batch["latent"].astype(jnp.float32), batch["noise"], own_t, mask=batch["mask"]
      )

  return jax.jit(fn, out_shardings=(rep, rep, rep))


def loss_sums(
  val_fn, params, source, mesh, *, own_t, seed: int, batch_size: int, num_examples: int
) -> tuple[np.ndarray, np.ndarray, float]:
  """(own loss sums, yardstick sums, example count) over the first ``num_examples`` of ``source``."""
  it = input_pipeline.make_eval_iterator(
    source,
    global_batch_size=batch_size,
    max_examples=num_examples,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    dtype=None,
  )  # cast on device
  own, rf, count = np.zeros(len(own_t), np.float64), np.zeros(len(own_t), np.float64), 0.0
  for local in it:
    ids = local.pop("example_id")
    local["mask"] = local["mask"].astype(np.float32)
    local["noise"] = np.asarray(flow.levels.fixed_validation_noise(seed, ids, local["latent"].shape[1:]))
    o, r, c = jax.device_get(val_fn(params, sharding.make_global_batch(local, mesh), own_t))
    own, rf, count = own + np.asarray(o, np.float64), rf + np.asarray(r, np.float64), count + float(c)
  return own, rf, count


def evaluate(
  val_fn,
  params,
  sources: Mapping[str, object],
  mesh,
  *,
  num_levels: int,
  seed: int,
  batch_size: int,
  num_examples: int,
  formulation=None,
) -> dict[str, float]:
  """``val/loss``, ``val/rf_loss`` and their levels over every source together; with more than
  one source (aspect buckets, keyed by name) also ``val/<name>/...`` per source. Levels the
  formulation does not cover (``flow.levels``) are not evaluated."""
  f = formulation or flow.get_formulation(flow.DEFAULT)
  grid = np.asarray(flow.levels.val_t_levels(num_levels))
  own_t, covered = flow.levels.level_times(f, grid)
  levels, own_t = grid[covered], jnp.asarray(own_t[covered])
  out = {}
  total_own, total_rf, count = np.zeros(len(levels)), np.zeros(len(levels)), 0.0
  for name, source in sources.items():
    o, r, c = loss_sums(
      val_fn, params, source, mesh, own_t=own_t, seed=seed, batch_size=batch_size, num_examples=num_examples
    )
    total_own, total_rf, count = total_own + o, total_rf + r, count + c
    if len(sources) > 1:
      out.update(flow.levels.summarize_validation(o / max(c, 1.0), levels, prefix=f"val/{name}"))
      out.update(flow.levels.summarize_yardstick(r / max(c, 1.0), levels, grid, prefix=f"val/{name}"))
  out.update(flow.levels.summarize_validation(total_own / max(count, 1.0), levels))
  out.update(flow.levels.summarize_yardstick(total_rf / max(count, 1.0), levels, grid))
  return out
