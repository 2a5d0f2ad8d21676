#!/usr/bin/env bash
# Run on EVERY host of a TPU pod slice (e.g. through
#   gcloud compute tpus tpu-vm ssh NAME --worker=all --command "cd sd3_jax && bash launch/tpu_pod.sh ...").
# jax.distributed discovers the slice by itself (--multihost). Check the fit first with
#   python -m tools.aot_compile --config CONFIG --topology v5p:8x8x8
# Usage: bash launch/tpu_pod.sh CONFIG WORKDIR [--config.key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
config="$1"; workdir="$2"; shift 2
[ -x .venv/bin/python ] || { python3 -m venv .venv; .venv/bin/python -m pip install -q -e ".[tpu]"; }
# Compiler flags for throughput (maxtext's set for FSDP training on v4/v5p/v6e). Accepted by
# libtpu 0.0.42 (checked with a compile-only topology); their speed-up is NOT measured here
# (no TPU): compare with LIBTPU_INIT_ARGS= python -m tools.benchmark ... on the pod.
tpu_flags=(
  --xla_tpu_enable_latency_hiding_scheduler=true          # schedule collectives to overlap compute
  --xla_tpu_enable_async_collective_fusion=true           # run fused collectives asynchronously
  --xla_tpu_enable_async_collective_fusion_fuse_all_gather=true  # ... including FSDP all-gathers
  --xla_tpu_enable_async_collective_fusion_multiple_steps=true   # overlap across several ops
  --xla_tpu_overlap_compute_collective_tc=true            # compute and collectives on the core at once
  --xla_enable_async_all_gather=true                      # prefetch the next layer's FSDP weights
  --xla_enable_async_collective_permute=true              # same for collective-permutes
  --xla_tpu_enable_data_parallel_all_reduce_opt=true      # overlap data-parallel gradient reduction
  --xla_tpu_data_parallel_opt_different_sized_ops=true    # ... also for differently sized tensors
)
export LIBTPU_INIT_ARGS="${LIBTPU_INIT_ARGS-${tpu_flags[*]}}"
exec .venv/bin/python -m sd3_jax.main --config "$config" --workdir "$workdir" --multihost "$@"
