# Sourced by the TPU launchers (launch/tpu_pod.sh, launch/gke_jobset.sh): the libtpu compiler
# flags for throughput (maxtext's set for FSDP training on v4/v5p/v6e), in TPU_XLA_FLAGS.
# Accepted by libtpu 0.0.42 (checked with a compile-only topology); their speed-up is NOT
# measured here (no TPU): compare with LIBTPU_INIT_ARGS= python -m tools.benchmark ... on the pod.
tpu_xla_flags=(
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
TPU_XLA_FLAGS="${tpu_xla_flags[*]}"
