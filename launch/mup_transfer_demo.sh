#!/usr/bin/env bash
# Learning-rate transfer across width under SP and muP (configs/scaling/mup_transfer.py): the
# embedded demo's data (shared with launch/scaling_demo.sh), a d = 2 MM-DiT at widths 32, 64, 128
# and 8 learning rates under each parametrization (48 runs), then the transfer analysis and plot.
# Every stage skips finished work, so a rerun resumes; a run whose loss diverges is recorded
# (RUN/diverged.json) and the sweep goes on.
# Writes WORKDIR/transfer/<run>/ and WORKDIR/transfer_analysis/{scaling.json,transfer_learning_rate.png,...}.
# Usage: bash launch/mup_transfer_demo.sh [WORKDIR]      (PYTHON=/path/to/python skips the .venv set-up)
set -euo pipefail
cd "$(dirname "$0")/.."
workdir="${1:-workdirs/scaling_demo}"
py="${PYTHON:-}"
if [ -z "$py" ]; then
  bash launch/setup_venv.sh
  py=.venv/bin/python
fi
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
"$py" -m sd3_jax.scaling toy_data --workdir "$workdir"
"$py" -m sd3_jax.scaling run "configs/scaling/mup_transfer.py:$workdir/data" --sweep_dir "$workdir/transfer"
"$py" -m sd3_jax.scaling analyze "$workdir/transfer" --out "$workdir/transfer_analysis" --transfer optimizer.learning_rate
echo "wrote $workdir/transfer_analysis: scaling.json (\"transfer\": best learning rate per width) and transfer_learning_rate.png"
