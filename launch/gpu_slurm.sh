#!/usr/bin/env bash
# One process per GPU node under SLURM, e.g.
#   srun --nodes=4 --ntasks-per-node=1 --gpus-per-node=8 bash launch/gpu_slurm.sh CONFIG WORKDIR
# jax.distributed reads the SLURM environment (--multihost). Install jax with CUDA support in
# .venv first (pip install -e . "jax[cuda12]==0.10.2"); use --config.attention_impl=cudnn.
# Usage: bash launch/gpu_slurm.sh CONFIG WORKDIR [--config.key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
config="$1"; workdir="$2"; shift 2
exec .venv/bin/python -m sd3_jax.main --config "$config" --workdir "$workdir" --multihost "$@"
