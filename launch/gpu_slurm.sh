#!/usr/bin/env bash
# One process per GPU node under SLURM, e.g.
#   srun --nodes=4 --ntasks-per-node=1 --gpus-per-node=8 bash launch/gpu_slurm.sh CONFIG WORKDIR
# jax.distributed reads the SLURM environment (--multihost). Install jax with CUDA support in
# .venv first (pip install -e . "jax[cuda12]==0.10.2"); attention_impl 'auto' uses cuDNN
# flash attention in bf16.
# The run restarts after anything but done (0), a bad config (2) or divergence (3)
# (launch/restart_policy.sh, docs/multislice.md).
# Usage: bash launch/gpu_slurm.sh CONFIG WORKDIR [--config.key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
config="$1"; workdir="$2"; shift 2
# Compiler flags for throughput (the JAX GPU performance guide's set for FSDP training). Accepted
# by jaxlib 0.10.2's flag parser; their speed-up is NOT measured here (no GPU): compare with
# XLA_FLAGS= python -m tools.benchmark ... on the cluster.
gpu_flags=(
  --xla_gpu_enable_latency_hiding_scheduler=true          # overlap collectives with compute
  --xla_gpu_enable_pipelined_all_gather=true              # prefetch the next layer's FSDP weights
  --xla_gpu_enable_pipelined_reduce_scatter=true          # reduce-scatter gradients while computing
  --xla_gpu_enable_pipelined_all_reduce=true              # same for data-parallel all-reduces
  --xla_gpu_enable_while_loop_double_buffering=true       # double-buffer the scanned layer loop
  --xla_gpu_all_gather_combine_threshold_bytes=134217728  # combine small all-gathers (128 MiB)
  --xla_gpu_reduce_scatter_combine_threshold_bytes=134217728
  --xla_gpu_all_reduce_combine_threshold_bytes=134217728
)
export XLA_FLAGS="${XLA_FLAGS-${gpu_flags[*]}}"
source launch/restart_policy.sh
sd3_run_with_restarts .venv/bin/python -m sd3_jax.main --config "$config" --workdir "$workdir" --multihost "$@"
