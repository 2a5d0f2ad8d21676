r"""Throughput of the real train step on the devices present, on synthetic data.

  python -m tools.benchmark --config configs/sd3_medium.py [--config.key=value ...] [--steps N] [--json]

Compiles the train step of the config once (its mesh, remat, attention, batch), then runs
``--steps`` steps on one synthetic global batch of the config's shapes (float16, as records
arrive) and prints: step time, images/s, model TFLOP/s per device, MFU against the chip's
datasheet bf16 peak (``sd3_jax.training.metrics.peak_flops_per_device``; none on CPU) and against the
matmul peak measured here (an n x n x n matmul in the compute dtype on one device), and the
peak device memory (the allocator's high-water mark where the backend reports it, else the
compiled program's memory analysis). Model FLOPs are ``sd3_jax.models.flops.train_step_flops``
(matmuls and attention, 3x forward; recomputation not counted), as in docs/performance.md's MFU.
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from sd3_jax.training import metrics as metrics_lib
from sd3_jax import command, sharding
from sd3_jax.training import optimizer, state as state_lib, step as step_lib, train_data
from sd3_jax.models import flops, mmdit

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (after one compile-and-warm-up step).")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of a report.")
_MATMUL = flags.DEFINE_integer(
  "matmul_size", 0, "Side n of the peak-measuring matmul; 0 = 8192 on accelerators, 1024 on CPU."
)
flags.mark_flags_as_required(["config"])


def _time(fn, *args, reps: int) -> float:
  """Seconds per call of an already compiled fn (median of reps calls, each waited for)."""
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def measure_matmul_peak(dtype, n: int, device=None) -> float:
  """FLOP/s of an n x n x n matmul in ``dtype`` on one device (10 chained products per call)."""
  device = device or jax.devices()[0]
  a = jax.device_put(jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype), device)

  @jax.jit
  def chain(x):
    for _ in range(10):
      x = (x @ a) * 0.5
    return x

  jax.block_until_ready(chain(a))
  return 10 * 2.0 * n**3 / _time(chain, a, reps=3)


def _peak_memory(compiled) -> tuple[int | None, str]:
  stats = [d.memory_stats() for d in jax.local_devices()]
  peaks = [s.get("peak_bytes_in_use") for s in stats if s]
  if peaks and all(p is not None for p in peaks):
    return int(max(peaks)), "allocator peak_bytes_in_use (max over local devices)"
  ma = compiled.memory_analysis()
  total = ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes + ma.temp_size_in_bytes
  return int(total), "compiled memory analysis (arguments + outputs - aliased + temporaries)"


def run(config, steps: int, matmul_size: int = 0) -> dict:
  """Compile the config's step, time ``steps`` steps; returns the report as a dict."""
  if steps < 1:
    raise ValueError(f"--steps must be >= 1, got {steps}")
  devices = jax.devices()
  mesh = sharding.mesh_from_settings(config.mesh)
  model, tx, opts = state_lib.make_model(config), optimizer.make_optimizer(config), step_lib.step_options(config)
  _, shardings = state_lib.state_shardings(model, tx, mesh)
  state = state_lib.create_sharded_state(model, tx, mesh, jax.random.key(config.seed), shardings)
  shapes = train_data.batch_shapes(config)
  sharding.batch_size_per_process(config.global_batch_size, mesh)

  def synthetic(key):
    keys = jax.random.split(key, len(shapes))
    return {
      k: jax.random.normal(kk, s, jnp.float32).astype(jnp.float16) for kk, (k, s) in zip(keys, sorted(shapes.items()))
    }

  batch_sh = {k: sharding.batch_sharding(mesh, len(s)) for k, s in shapes.items()}
  batch = jax.jit(synthetic, out_shardings=batch_sh)(jax.random.key(1))
  schedule = optimizer.learning_rate_schedule(config.optimizer, config.total_steps)
  step_fn = step_lib.make_train_step(model, tx, opts, schedule, mesh, shardings, shapes)
  rng = jax.random.key(2)
  t0 = time.perf_counter()
  compiled = step_fn.lower(state, batch, rng).compile()
  compile_s = time.perf_counter() - t0
  state, out = compiled(state, batch, rng)  # warm-up
  jax.block_until_ready(out["loss"])
  t0 = time.perf_counter()
  for _ in range(steps):
    state, out = compiled(state, batch, rng)
  jax.block_until_ready((state, out["loss"]))
  step_time = (time.perf_counter() - t0) / steps

  d = config.data
  model_flops = flops.train_step_flops(
    mmdit.config_from_preset(**config.model), d.latent_size, d.latent_size, d.context_len, config.global_batch_size
  )
  n_dev = len(devices)
  per_device = model_flops / step_time / n_dev
  kind = devices[0].device_kind
  datasheet = metrics_lib.peak_flops_per_device(kind)
  on_cpu = devices[0].platform == "cpu"
  n = matmul_size or (1024 if on_cpu else 8192)
  measured = measure_matmul_peak(jnp.dtype(config.dtype), n, devices[0])
  mem, mem_source = _peak_memory(compiled)
  return {
    "device_kind": kind,
    "platform": devices[0].platform,
    "num_devices": n_dev,
    "mesh": dict(mesh.shape),
    "global_batch_size": config.global_batch_size,
    "latent_size": d.latent_size,
    "dtype": config.dtype,
    "remat": config.remat,
    "attention_impl": model.attention_impl,
    "steps": steps,
    "compile_s": compile_s,
    "step_time_s": step_time,
    "images_per_sec": config.global_batch_size / step_time,
    "model_flops_per_step": model_flops,
    "model_tflops_per_sec_per_device": per_device / 1e12,
    "datasheet_peak_tflops_per_device": None if datasheet is None else datasheet / 1e12,
    "mfu_vs_datasheet": None if datasheet is None else per_device / datasheet,
    "matmul_size": n,
    "measured_matmul_tflops_per_device": measured / 1e12,
    "mfu_vs_measured_matmul": per_device / measured,
    "peak_memory_bytes_per_device": mem,
    "peak_memory_source": mem_source,
    "final_loss": float(out["loss"]),
  }


def _report(r: dict) -> str:
  pct = lambda x: "n/a (no datasheet peak for this device)" if x is None else f"{100 * x:.1f}%"
  return "\n".join(
    [
      f"{r['num_devices']} x {r['device_kind']} ({r['platform']}), mesh {r['mesh']}, global batch "
      f"{r['global_batch_size']} at latent {r['latent_size']}^2, {r['dtype']}, remat {r['remat']}, "
      f"attention {r['attention_impl']}",
      f"  compile             {r['compile_s']:.1f} s",
      f"  step time           {r['step_time_s'] * 1e3:.1f} ms (mean of {r['steps']} steps)",
      f"  images/s            {r['images_per_sec']:.1f}",
      f"  model TFLOP/s/dev   {r['model_tflops_per_sec_per_device']:.3f}",
      f"  MFU vs datasheet    {pct(r['mfu_vs_datasheet'])}",
      f"  MFU vs matmul       {pct(r['mfu_vs_measured_matmul'])} (measured {r['matmul_size']}^3 "
      f"matmul: {r['measured_matmul_tflops_per_device']:.3f} TFLOP/s per device)",
      f"  peak memory/dev     {r['peak_memory_bytes_per_device'] / 2**30:.3f} GiB ({r['peak_memory_source']})",
    ]
  )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  r = run(_CONFIG.value, _STEPS.value, _MATMUL.value)
  print(json.dumps(r) if _JSON.value else _report(r))


if __name__ == "__main__":
  app.run(main, flags_parser=command.parse_absl_flags("python -m tools.benchmark"))
