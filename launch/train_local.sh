#!/usr/bin/env bash
# Train the tiny CPU config end to end on this machine: creates .venv if missing, installs
# sd3_jax, trains configs/tiny.py on synthetic latents with checkpoints and metrics.
# Usage: bash launch/train_local.sh [WORKDIR] [--config.key=value ...]   (WORKDIR: workdirs/tiny)
set -euo pipefail
cd "$(dirname "$0")/.."
workdir="workdirs/tiny"
if [ $# -gt 0 ] && [[ "$1" != -* ]]; then  # flags alone keep the default WORKDIR
  workdir="$1"
  shift
fi
bash launch/setup_venv.sh
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
exec .venv/bin/python -m sd3_jax.main --config configs/tiny.py --workdir "$workdir" "$@"
