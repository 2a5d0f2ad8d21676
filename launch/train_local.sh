#!/usr/bin/env bash
# Train the tiny CPU config end to end on this machine: creates .venv if missing, installs
# sd3_jax, trains configs/tiny.py on synthetic latents with checkpoints and metrics.
# Usage: bash launch/train_local.sh [WORKDIR] [--config.key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
workdir="${1:-workdirs/tiny}"
shift || true
bash launch/setup_venv.sh
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
exec .venv/bin/python -m sd3_jax.main --config configs/tiny.py --workdir "$workdir" "$@"
