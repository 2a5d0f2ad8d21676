r"""Do small toy-study models use the CPU better one at a time or side by side?

Trains the toy study's model at one depth (the demo's pixel-space MM-DiT, hidden 32 d, batch 64,
``configs/scaling/toy_study.py``) for ``--steps`` steps in two ways and reports the achieved
throughput (median GFLOP/s of each run's logged rows, from the exact FLOPs, compilation and
checkpointing excluded), summed over the runs that train at once:

  one     one run with XLA's default threads (every core), as ``sd3-scaling run`` trains a sweep;
  side    ``--jobs`` runs at once, each single-threaded, as ``launch/scaling_demo.sh --jobs N``.

  python -m tools.bench_parallel_runs --data WORKDIR/data --depth 2 --jobs 2 --out /tmp/bench

WORKDIR/data is ``sd3-scaling toy_data``'s. Prints one JSON line per way and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from sd3_jax import command
from sd3_jax.scaling import analysis

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SINGLE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def train_command(data: str, depth: int, steps: int, workdir: str, seed: int) -> list[str]:
  overrides = {
    "data.path": os.path.join(data, "train"),
    "data.val_path": os.path.join(data, "val"),
    "global_batch_size": 64,
    "model.depth": depth,
    "model.hidden_size": 32 * depth,
    "model.num_heads": depth,
    "total_steps": steps,
    "log_every": 25,
    "val.every": 10 * steps,  # no validation inside the timed steps
    "checkpoint_every": steps,
    "keep_checkpoints": 1,
    "seed": seed,
  }
  return [
    sys.executable,
    "-m",
    "sd3_jax.main",
    "--config",
    os.path.join(REPO, "sd3_jax", "demo", "config.py"),
    "--workdir",
    workdir,
    *[f"--config.{k}={v}" for k, v in overrides.items()],
  ]


def median_gflops(workdir: str) -> float:
  rows = [json.loads(line) for line in open(os.path.join(workdir, analysis.METRICS)) if line.strip()]
  gflops = analysis.throughput(rows)["gflops_per_sec"]
  if gflops is None:
    raise RuntimeError(f"{workdir} logged no throughput: train more steps (--steps)")
  return gflops


def trial(args, name: str, jobs: int, flags: str) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip())
  dirs = [os.path.join(args.out, f"{name}{i}") for i in range(jobs)]
  start = time.time()
  procs = []
  for i, d in enumerate(dirs):
    log = open(os.path.join(args.out, f"{name}{i}.log"), "w")
    procs.append(
      subprocess.Popen(
        train_command(args.data, args.depth, args.steps, d, i), env=env, stdout=log, stderr=log, cwd=REPO
      )
    )
  for p in procs:
    if p.wait() != 0:
      raise RuntimeError(f"a {name} run failed: see {args.out}/{name}*.log")
  per_run = [median_gflops(d) for d in dirs]
  return {
    "way": name,
    "runs_at_once": jobs,
    "threads": "all" if not flags else 1,
    "gflops_per_sec_each": [round(v, 1) for v in per_run],
    "gflops_per_sec_total": round(sum(per_run), 1),
    "wall_s": round(time.time() - start, 1),
  }


def main(argv=None) -> None:
  p = command.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--data", required=True, help="sd3-scaling toy_data's WORKDIR/data")
  p.add_argument("--depth", type=int, default=2)
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--jobs", type=int, default=2, help="runs side by side in the second way")
  p.add_argument("--out", required=True, help="scratch directory for the runs (must not exist)")
  args = p.parse_args(argv)
  os.makedirs(args.out)
  one = trial(args, "one", 1, "")
  print(json.dumps(one), flush=True)
  side = trial(args, "side", args.jobs, SINGLE_THREAD)
  print(json.dumps(side), flush=True)
  print(
    json.dumps(
      {"depth": args.depth, "side_over_one": round(side["gflops_per_sec_total"] / one["gflops_per_sec_total"], 2)}
    )
  )


if __name__ == "__main__":
  main()
