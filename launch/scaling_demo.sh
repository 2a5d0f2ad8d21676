#!/usr/bin/env bash
# The toy scaling study end to end on this machine (configs/scaling/toy.py): the embedded demo's
# coloured-shapes data and random text encoders, a depth family d = 1..4 at width 16 d trained 400,
# 800 and 1200 steps, plus the timestep-sampler comparison at the same lengths (21 runs, each a
# training workdir). The lengths are cooldown branches of one warmup-stable-decay run per model
# (the 400- and 800-step runs train only their cooldowns from the 1200-step run's checkpoints:
# 40% fewer steps). Then held-out sample accuracy of every run, fits and plots. Every stage skips
# finished work, so a rerun resumes. About 50 minutes on an idle 2-core CPU (docs/mup_wsd.md).
# Writes WORKDIR/sweep/<run>/, WORKDIR/analysis{_all,}/{runs.csv,scaling.json,*.png}.
# Usage: bash launch/scaling_demo.sh [WORKDIR]      (PYTHON=/path/to/python skips the .venv set-up)
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
"$py" -m sd3_jax.scaling run "configs/scaling/toy.py:$workdir/data" --sweep_dir "$workdir/sweep"
"$py" -m sd3_jax.scaling score "$workdir/sweep" --text_encoders "$workdir/text_encoders" \
    --samples_per_prompt 4 --sampling_steps 20
# The fits use the depth family's runs (the default sampler); the sampler comparison's other runs
# appear in the comparison table and the loss-vs-accuracy correlation.
"$py" -m sd3_jax.scaling analyze "$workdir/sweep" --out "$workdir/analysis_all" --where 'flow.formulation=rf/lognorm(0.00,1.00)'
"$py" -m sd3_jax.scaling analyze "$workdir/sweep" --out "$workdir/analysis" --holdout largest \
    --where 'flow.formulation=rf/lognorm(0.00,1.00)'
echo "wrote $workdir/analysis_all (all runs) and $workdir/analysis (d = 4 held out): runs.csv, scaling.json, plots"
