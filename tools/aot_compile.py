r"""Will this config fit that TPU topology? Compile the real train step ahead of time, on CPU.

  python -m tools.aot_compile --config configs/sd3_8b.py --topology v5p:8x8x8 [--json]
  python -m tools.aot_compile --config configs/sd3_medium.py --topology v6e:16x16 --find_max_batch
  python -m tools.aot_compile --config configs/sd3_medium.py --config.model.backbone=crossdit  # any backbone

Uses libtpu's compile-only topologies (pip install 'jax[tpu]==0.10.2', the `tpu` extra; no TPU
needed). Prints per-chip memory (arguments, temporaries, peak), the chip's HBM, whether it fits,
and the compiled FLOPs. "peak" is arguments + outputs - donated (aliased) + temporaries, the
conservative total; when the TPU compiler itself refuses the program (RESOURCE_EXHAUSTED) the
figure comes from its message and `fits` is false. ``--json`` prints one JSON object with at least `peak_bytes_per_device`,
`hbm_bytes_per_device` and `fits`. ``--find_max_batch`` also searches the largest global batch
(a multiple of the batch shards) whose step fits, and reports it per chip (4-6 compiles).
Any topology name libtpu accepts works: v4:2x2x1, v5e:16x16, v5p:4x4x4, v5p:8x8x8, v6e:16x16, ...

Several slices: ``--num_slices 2`` compiles for two such slices joined by DCN, with the mesh
built as the trainer builds it (config.mesh.dcn_*: data parallelism across slices by default).
``--json`` then reports, per chip per step, `ici_bytes_per_step` (collective buffers inside a
slice) and `dcn_bytes_per_step` (what crosses slices), read from the compiled program
(``tools.hlo_collectives``).

Recomputation: `hlo_matmul_flops_per_device` counts the compiled program's matmuls with every
scanned layer counted once per layer (``tools.hlo_flops``); `recompute_ratio` is that times
the chips over the model FLOPs of the same matmuls (1.0 = no recomputation; attention inside a
Pallas kernel is left out of both sides). ``--remat_policies=none,save_attn,full`` compiles
each policy and reports each; ``--pick_remat`` compiles every policy (or those listed) and picks
the one with the least recomputation that fits (ties: least memory).
With aspect buckets (config.data.buckets) every bucket's step is compiled; the figures shown
are the largest bucket's, `fits` holds only if all fit, and `buckets` (--json) has each one.
"""

from __future__ import annotations

import json
import os
import re
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Compile-only use needs no exclusive hold of a TPU: let several checks (and a running one)
# load libtpu at once instead of failing on its process lockfile.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from sd3_jax.models import flops, mmdit  # noqa: E402
from sd3_jax.models import remat as remat_lib  # noqa: E402
from sd3_jax import command, sharding  # noqa: E402
from sd3_jax.training import optimizer, state as state_lib, step as step_lib, train_data  # noqa: E402
from tools import hlo_collectives, hlo_flops  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", "v5p:8x8x8", "TPU topology name, e.g. v5p:8x8x8 or v6e:16x16.")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "Number of slices (multi-slice).")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of a table.")
_FIND_MAX = flags.DEFINE_bool("find_max_batch", False, "Search the largest global batch that fits.")
_POLICIES = flags.DEFINE_list(
  "remat_policies", [], f"Compile each of these remat policies ({', '.join(remat_lib.POLICIES)}) and report each."
)
_PICK = flags.DEFINE_bool(
  "pick_remat", False, "Pick the policy with the least recomputation that fits (among --remat_policies, default all)."
)
_HLO_OUT = flags.DEFINE_string(
  "hlo_out", "", "Also write the compiled program's HLO text here ('{bucket}' in the name: one file per bucket)."
)
flags.mark_flags_as_required(["config"])

GiB = 1024**3
# HBM per chip (bytes) by jax device_kind prefix.
HBM_BYTES = {
  "TPU v4": 32 * GiB,
  "TPU v5 lite": 16 * GiB,  # v5e
  "TPU v5e": 16 * GiB,
  "TPU v5p": 95 * GiB,
  "TPU v5": 95 * GiB,  # v5p reports "TPU v5"
  "TPU v6 lite": 32 * GiB,  # v6e (Trillium)
  "TPU v6e": 32 * GiB,
}


def hbm_bytes(device_kind: str) -> int | None:
  for prefix in sorted(HBM_BYTES, key=len, reverse=True):
    if device_kind.startswith(prefix):
      return HBM_BYTES[prefix]
  return None


def topology_devices(name: str, num_slices: int = 1):
  from jax.experimental import topologies

  try:
    topo = topologies.get_topology_desc(
      topology_name=name, platform="tpu", **({"num_slices": num_slices} if num_slices > 1 else {})
    )
  except Exception as e:  # libtpu missing or unknown name
    raise SystemExit(
      f"cannot build TPU topology {name!r}: {e}\n(install the tpu extra: "
      "pip install -e '.[tpu]'; names look like v5p:8x8x8, v6e:16x16)"
    ) from e
  return topo.devices


def compile_step(config, devices, latent_hw=None):
  """Lower and compile the real train step for ``devices`` (for the aspect bucket of latent size
  ``latent_hw``; default the first) -> (compiled, mesh, abstract args)."""
  mesh = sharding.mesh_from_settings(config.mesh, devices=devices)
  model = state_lib.make_model(config, platform=devices[0].platform)
  tx, opts = optimizer.make_optimizer(config), step_lib.step_options(config)
  abstract_state, shardings = state_lib.state_shardings(model, tx, mesh)
  shapes = train_data.batch_shapes(config, latent_hw)
  # Batches arrive in the records' stored dtype (float16) and are cast inside the step.
  batch = {
    k: jax.ShapeDtypeStruct(s, jnp.float16, sharding=sharding.batch_sharding(mesh, len(s))) for k, s in shapes.items()
  }
  rng = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=sharding.replicated(mesh))
  schedule = optimizer.learning_rate_schedule(config.optimizer, config.total_steps)
  step = step_lib.make_train_step(model, tx, opts, schedule, mesh, shardings, shapes)
  args = (abstract_state, batch, rng)
  try:
    return step.lower(*args).compile(), mesh, args
  except jax.errors.JaxRuntimeError as e:
    e.mesh, e.abstract_args = mesh, args
    raise


_UNITS = {"K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def _parse_oom(message: str) -> int | None:
  """Bytes the TPU compiler said it needed, from its RESOURCE_EXHAUSTED message."""
  for pattern in (r"required for HLO temporaries \(([\d.]+)([KMGT])\)", r"Used ([\d.]+)([KMGT]) of"):
    m = re.search(pattern, message)
    if m:
      return int(float(m.group(1)) * _UNITS[m.group(2)])
  return None


def _bytes_per_device(abstract_tree) -> int:
  """Per-device bytes of a tree of ShapeDtypeStructs with shardings (largest shard)."""
  total = 0
  for leaf in jax.tree.leaves(abstract_tree):
    shard = leaf.sharding.shard_shape(leaf.shape)
    itemsize = 8 if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key) else jnp.dtype(leaf.dtype).itemsize
    total += int(np.prod(shard)) * itemsize
  return total


def analyse(config, devices) -> dict:
  """Every aspect bucket of the config compiled (config.data.buckets; one bucket without). One
  bucket: its figures. Several: the figures of the bucket with the largest peak (or one that
  does not fit), ``fits`` only when all fit, and each bucket's own under ``buckets``."""
  sizes = train_data.latent_sizes(config)
  results = {f"{h}x{w}": analyse_bucket(config, devices, (h, w)) for h, w in sizes}
  if len(results) == 1:
    return next(iter(results.values()))
  worst = max(results.values(), key=lambda r: (r["fits"] is False, r["peak_bytes_per_device"] or 0))
  fits = [r["fits"] for r in results.values()]
  return dict(
    worst,
    fits=False if False in fits else (None if None in fits else True),
    buckets={k: dict(r, latent_hw=list(hw)) for (k, r), hw in zip(results.items(), sizes)},
  )


def analyse_bucket(config, devices, latent_hw) -> dict:
  d = config.data
  kind = devices[0].device_kind
  hbm = hbm_bytes(kind)
  mcfg = mmdit.config_from_preset(**config.model)
  h, w = latent_hw
  model_flops = flops.train_step_flops(mcfg, h, w, d.context_len, config.global_batch_size)
  impl = state_lib.make_model(config, platform=devices[0].platform).attention_impl
  # Attention inside a kernel is invisible in the HLO: compare like with like.
  attn = 3 * config.global_batch_size * flops.mmdit_forward_flops_breakdown(mcfg, h, w, d.context_len)["attention"]
  attn += 3 * config.global_batch_size * _attn2_core_flops(mcfg, h, w)
  visible = model_flops - (attn if impl.startswith("splash") or impl == "cudnn" else 0)
  r = {
    "topology": _TOPOLOGY.value,
    "num_slices": sharding.num_slices(devices),
    "device_kind": kind,
    "num_devices": len(devices),
    "global_batch_size": config.global_batch_size,
    "batch_per_device": config.global_batch_size / len(devices),
    "hbm_bytes_per_device": hbm,
    "remat": config.remat,
    "attention_impl": impl,
    "model_flops_per_step": model_flops,
  }
  try:
    compiled, mesh, abstract_args = compile_step(config, devices, latent_hw)
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    # The TPU compiler refuses programs that cannot fit; what it needed is in its message.
    mesh, abstract_args = e.mesh, e.abstract_args  # attached by compile_step
    args = _bytes_per_device(abstract_args)
    temps = _parse_oom(str(e))
    r.update(
      {
        "mesh": dict(mesh.shape),
        "argument_bytes_per_device": args,
        "output_bytes_per_device": None,
        "alias_bytes_per_device": None,
        "temp_bytes_per_device": temps,
        "peak_bytes_per_device": None if temps is None else args + temps,
        "fits": False,
        "compiled_flops_per_device": None,
        "ici_bytes_per_step": None,
        "dcn_bytes_per_step": None,
        "compile_error": str(e).splitlines()[0][:500],
      }
    )
    return r
  ma = compiled.memory_analysis()
  ca = compiled.cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  # Conservative per-chip total (as maxtext reports it): live arguments and outputs (donated
  # buffers counted once) plus temporaries. XLA's own peak_memory_in_bytes is kept alongside.
  peak = int(ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes + ma.temp_size_in_bytes)
  r.update(
    {
      "xla_peak_bytes_per_device": int(ma.peak_memory_in_bytes),
      "mesh": dict(mesh.shape),
      "argument_bytes_per_device": int(ma.argument_size_in_bytes),
      "output_bytes_per_device": int(ma.output_size_in_bytes),
      "alias_bytes_per_device": int(ma.alias_size_in_bytes),
      "temp_bytes_per_device": int(ma.temp_size_in_bytes),
      "peak_bytes_per_device": peak,
      "fits": None if hbm is None else peak <= hbm,
      "compiled_flops_per_device": float(ca.get("flops", float("nan"))) if ca else None,
    }
  )
  text = compiled.as_text()
  if _HLO_OUT.value:
    with open(_HLO_OUT.value.replace("{bucket}", f"{h}x{w}"), "w") as f:
      f.write(text)
  counted = hlo_flops.matmul_flops(text)
  moved = hlo_collectives.collective_bytes(text, [getattr(d, "slice_index", 0) for d in mesh.devices.flat])
  r.update(
    {
      "hlo_matmul_flops_per_device": counted["flops"],
      "kernel_calls_per_step": counted["custom_calls"],
      "recompute_ratio": counted["flops"] * len(devices) / visible,
      "unknown_trip_counts": counted["unknown_trip_counts"],
      # Per chip per step: collective buffers inside a slice, and what crosses slices.
      "ici_bytes_per_step": moved["ici_bytes"],
      "dcn_bytes_per_step": moved["dcn_bytes"],
      "dcn_transfers_per_step": moved["dcn_transfers"],
    }
  )
  return r


def _attn2_core_flops(mcfg, h: int, w: int) -> int:
  """Forward FLOPs per example of the MMDiT-X image-only attention core (QK^T and AV)."""
  n = (h // mcfg.patch_size) * (w // mcfg.patch_size)
  return 4 * n * n * mcfg.hidden_size * len(mcfg.dual_attention_layers)


def compare_policies(config, devices, names) -> list[dict]:
  """analyse() for each remat policy in ``names`` (one compile each)."""
  rows = []
  for name in names:
    c = config.copy_and_resolve_references()
    with c.unlocked():
      c.remat = name
    r = analyse(c, devices)
    peak = r["peak_bytes_per_device"]
    ratio = r.get("recompute_ratio")
    print(
      f"  remat {name:22s} peak {'?' if peak is None else f'{peak / GiB:.2f}'} GiB, "
      f"recompute {'?' if ratio is None else f'{ratio:.3f}'}x, "
      f"{'fits' if r['fits'] else 'does not fit'}",
      file=sys.stderr,
      flush=True,
    )
    rows.append(r)
  return rows


def pick_remat(rows: list[dict]) -> str | None:
  """The fitting policy with the least recomputation (then the least memory); None if none fits."""
  fitting = [r for r in rows if r["fits"] and r.get("recompute_ratio") is not None]
  if not fitting:
    return None
  return min(fitting, key=lambda r: (round(r["recompute_ratio"], 3), r["peak_bytes_per_device"]))["remat"]


def find_max_batch(config, devices, first: dict, max_compiles: int = 7) -> dict:
  """Largest global batch that fits, in few compiles (each takes minutes on a CPU for d>=24).

  Per-chip memory of a rematerialised step is close to affine in the batch, so guesses
  alternate between a secant through the bracket (or the last two compiles) and
  doubling/bisection, until a fitting and a non-fitting batch are within 5% of each other.
  Returns {'fits_at', 'does_not_fit_at'} as global batches (multiples of the batch shards
  and grad_accum_steps); None where not found within max_compiles.
  """
  mesh = sharding.mesh_from_settings(config.mesh, devices=devices)
  unit = mesh.shape["data"] * mesh.shape["fsdp"] * config.grad_accum_steps
  hbm = first["hbm_bytes_per_device"]
  if hbm is None:
    raise SystemExit(f"unknown HBM size for {first['device_kind']}; cannot search the batch")

  def run(batch: int) -> dict:
    c = config.copy_and_resolve_references()
    with c.unlocked():
      c.global_batch_size = batch
    r = analyse(c, devices)
    peak = r["peak_bytes_per_device"]
    peak_s = "?" if peak is None else f"{peak / GiB:.2f}"
    print(
      f"  batch {batch:>7d} ({batch / len(devices):.2f}/chip): peak {peak_s} GiB -> "
      f"{'fits' if r['fits'] else 'does not fit'}",
      file=sys.stderr,
      flush=True,
    )
    return r

  round_down = lambda b: max(unit, int(b) // unit * unit)
  points = {config.global_batch_size: first}
  lo = config.global_batch_size if first["fits"] else None  # largest batch seen to fit
  hi = None if first["fits"] else config.global_batch_size  # smallest batch seen not to fit
  for i in range(max_compiles):
    if lo is not None and hi is not None and hi <= round_down(lo * 1.05) + unit:
      break  # bracketed within 5%
    guess = None
    near = sorted(
      ((b, r["peak_bytes_per_device"]) for b, r in points.items() if r["peak_bytes_per_device"] and b in (lo, hi))
    )
    if len(near) < 2:  # extrapolate from the two largest batches compiled so far
      near = sorted((b, r["peak_bytes_per_device"]) for b, r in points.items() if r["peak_bytes_per_device"])[-2:]
    if i % 2 == 0 and len(near) == 2 and near[1][1] > near[0][1]:
      (b0, p0), (b1, p1) = near  # secant through the bracket (or the last two points)
      guess = round_down(b0 + (hbm - p0) * (b1 - b0) / (p1 - p0))
    if guess is None or not (lo or 0) < guess < (hi or float("inf")) or guess in points:
      guess = round_down(lo * 2) if hi is None else round_down(((lo or 0) + hi) / 2)  # double / bisect
      if guess in points or guess <= (lo or 0):
        break
    r = run(guess)
    points[guess] = r
    if r["fits"]:
      lo = max(lo or 0, guess)
    else:
      hi = guess if hi is None else min(hi, guess)
  return {"fits_at": lo, "does_not_fit_at": hi}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  devices = topology_devices(_TOPOLOGY.value, _NUM_SLICES.value)
  names = _POLICIES.value or (list(remat_lib.POLICIES) if _PICK.value else [])
  unknown = [n for n in names if n not in remat_lib.POLICIES]
  if unknown:
    raise app.UsageError(f"unknown remat policies {unknown}; known: {list(remat_lib.POLICIES)}")
  if names:
    rows = compare_policies(_CONFIG.value, devices, names)
    out = {"policies": rows}
    if _PICK.value:
      out["picked_remat"] = pick_remat(rows)
    if _JSON.value:
      print(json.dumps(out))
      return
    print(f"topology {_TOPOLOGY.value}, global batch {_CONFIG.value.global_batch_size}")
    print(f"  {'remat':22s} {'peak GiB/chip':>14s} {'recompute':>10s} fits")
    for r in rows:
      peak = r["peak_bytes_per_device"]
      ratio = r.get("recompute_ratio")
      print(
        f"  {r['remat']:22s} {'?' if peak is None else f'{peak / GiB:14.2f}'} "
        f"{'?' if ratio is None else f'{ratio:9.3f}x'} {r['fits']}"
      )
    if _PICK.value:
      print(f"picked remat: {out['picked_remat']}")
    return
  r = analyse(_CONFIG.value, devices)
  if _FIND_MAX.value:
    found = find_max_batch(_CONFIG.value, devices, r)
    best, over = found["fits_at"], found["does_not_fit_at"]
    r["max_global_batch_that_fits"] = best
    r["max_batch_per_device_that_fits"] = None if best is None else best / len(devices)
    r["smallest_global_batch_seen_not_to_fit"] = over
  if _JSON.value:
    print(json.dumps(r))
    return
  g = lambda k: f"{r[k] / GiB:8.2f} GiB" if r[k] is not None else "   unknown"
  slices = f"{r['num_slices']} x " if r["num_slices"] > 1 else ""
  print(
    f"topology {slices}{r['topology']} ({r['num_devices']} x {r['device_kind']}), mesh {r['mesh']}, "
    f"global batch {r['global_batch_size']} ({r['batch_per_device']:.2f}/chip)"
  )
  for label, key in [
    ("arguments", "argument_bytes_per_device"),
    ("outputs", "output_bytes_per_device"),
    ("aliased", "alias_bytes_per_device"),
    ("temporaries", "temp_bytes_per_device"),
    ("peak", "peak_bytes_per_device"),
    ("HBM", "hbm_bytes_per_device"),
  ]:
    if key not in r:
      continue
    print(f"  {label:12s} {g(key)} per chip")
  print(f"  fits         {r['fits']}")
  if r.get("compile_error"):
    print(f"  the TPU compiler refused it: {r['compile_error']}")
  else:
    print(
      f"  compiled FLOPs per chip per step {r['compiled_flops_per_device']:.4g} (XLA counts a "
      f"scanned loop body once); model FLOPs per step {r['model_flops_per_step']:.4g}"
    )
    print(
      f"  matmul FLOPs per chip, loops unrolled {r['hlo_matmul_flops_per_device']:.4g}: "
      f"recompute ratio {r['recompute_ratio']:.3f} (remat {r['remat']}, attention "
      f"{r['attention_impl']})"
    )
    print(
      f"  collectives per chip per step: {r['ici_bytes_per_step'] / 2**20:.2f} MiB within a slice (ICI), "
      f"{r['dcn_bytes_per_step'] / 2**20:.2f} MiB across slices (DCN)"
    )
  for name, b in r.get("buckets", {}).items():
    peak = "unknown" if b["peak_bytes_per_device"] is None else f"{b['peak_bytes_per_device'] / GiB:.2f} GiB"
    print(
      f"  bucket {name:9s} peak {peak} per chip, fits {b['fits']}, model FLOPs per step {b['model_flops_per_step']:.4g}"
    )
  if _FIND_MAX.value:
    over = r["smallest_global_batch_seen_not_to_fit"]
    print(
      f"  largest global batch that fits: {r['max_global_batch_that_fits']} "
      f"({r['max_batch_per_device_that_fits']}/chip)"
      + (f"; {over} ({over / r['num_devices']:.2f}/chip) does not" if over else "")
    )


if __name__ == "__main__":
  app.run(main, flags_parser=command.parse_absl_flags("python -m tools.aot_compile"))
