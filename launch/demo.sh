#!/usr/bin/env bash
# The embedded demo, end to end on this machine (about 11 minutes on 2 CPU cores): creates .venv
# if missing, generates a coloured-shapes text-to-image dataset with small random text encoders,
# trains a pixel-space MM-DiT with the real trainer, samples held-out prompts and scores them.
# Writes WORKDIR/summary.json, loss.png, samples_heldout.png, metrics.jsonl, checkpoints/.
# Usage: bash launch/demo.sh [WORKDIR] [sd3_jax.demo flags, e.g. --steps 2000]
set -euo pipefail
cd "$(dirname "$0")/.."
workdir="${1:-workdirs/demo}"
shift || true
bash launch/setup_venv.sh
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
exec .venv/bin/python -m sd3_jax.demo --workdir "$workdir" "$@"
