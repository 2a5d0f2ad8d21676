"""Validation loss the paper's way (section 5.1): the mean rectified-flow loss at fixed t levels
over fixed validation examples with fixed noise, comparable across runs, model sizes, batch
sizes and restarts. With aspect buckets, each bucket is reported and the overall loss is the
example-weighted mean over all of them.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from sd3_jax import flow, sharding
from sd3_jax.data import input_pipeline


def make_validation_fn(model, mesh):
  """Jitted per-level validation loss sums (and example count) of one global batch."""
  rep = sharding.replicated(mesh)

  def fn(params, batch, levels):
    with sharding.logical_axes(mesh):
      velocity = lambda z, t: model.apply({"params": params}, z, t, batch["pooled"], batch["context"])
      return flow.validation_loss_sums(
        velocity, batch["latent"].astype(jnp.float32), batch["noise"], levels, mask=batch["mask"]
      )

  return jax.jit(fn, out_shardings=(rep, rep))


def loss_sums(
  val_fn, params, source, mesh, *, levels, seed: int, batch_size: int, num_examples: int
) -> tuple[np.ndarray, float]:
  """(per-level loss sums, example count) over the first ``num_examples`` of ``source``."""
  it = input_pipeline.make_eval_iterator(
    source,
    global_batch_size=batch_size,
    max_examples=num_examples,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    dtype=None,
  )  # cast on device
  sums, count = np.zeros(len(levels), np.float64), 0.0
  for local in it:
    ids = local.pop("example_id")
    local["mask"] = local["mask"].astype(np.float32)
    local["noise"] = np.asarray(flow.fixed_validation_noise(seed, ids, local["latent"].shape[1:]))
    s, c = val_fn(params, sharding.make_global_batch(local, mesh), levels)
    sums, count = sums + np.asarray(jax.device_get(s), np.float64), count + float(jax.device_get(c))
  return sums, count


def evaluate(
  val_fn, params, sources: Mapping[str, object], mesh, *, num_levels: int, seed: int, batch_size: int, num_examples: int
) -> dict[str, float]:
  """``val/loss`` and ``val/loss_t...`` over every source together; with more than one source
  (aspect buckets, keyed by name) also ``val/<name>/loss`` and its levels per source."""
  levels = flow.val_t_levels(num_levels)
  out, total, count = {}, np.zeros(len(levels), np.float64), 0.0
  for name, source in sources.items():
    s, c = loss_sums(
      val_fn, params, source, mesh, levels=levels, seed=seed, batch_size=batch_size, num_examples=num_examples
    )
    total, count = total + s, count + c
    if len(sources) > 1:
      out.update(flow.summarize_validation(s / max(c, 1.0), levels, prefix=f"val/{name}"))
  out.update(flow.summarize_validation(total / max(count, 1.0), levels))
  return out
