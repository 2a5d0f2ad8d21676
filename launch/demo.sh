#!/usr/bin/env bash
# The embedded demo, end to end on this machine (about 11 minutes on 2 CPU cores): creates .venv
# if missing, generates a coloured-shapes text-to-image dataset with small random text encoders,
# trains a pixel-space MM-DiT with the real trainer, samples held-out prompts and scores them.
# Writes WORKDIR/summary.json, loss.png, samples_heldout.png, metrics.jsonl, checkpoints/.
# Usage: bash launch/demo.sh [WORKDIR] [sd3-demo flags, e.g. --steps 2000]   (WORKDIR: workdirs/demo)
#        (PYTHON=/path/to/python skips the .venv set-up)
# Ctrl-C saves the training's current step and exits 130; rerunning the same command goes on.
set -euo pipefail
cd "$(dirname "$0")/.."
workdir="workdirs/demo"
if [ $# -gt 0 ] && [[ "$1" != -* ]]; then  # flags alone keep the default WORKDIR
  workdir="$1"
  shift
fi
py="${PYTHON:-}"
if [ -z "$py" ]; then
  bash launch/setup_venv.sh
  py=.venv/bin/python
fi
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
exec "$py" -m sd3_jax.demo --workdir "$workdir" "$@"
