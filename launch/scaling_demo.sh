#!/usr/bin/env bash
# The toy study (configs/scaling/toy_study.py, docs/scaling.md "The toy study"): the paper's claims
# tested on the embedded demo's coloured shapes, in a regime where the sample checker separates
# runs. One part per command, each resumable (every stage skips finished work; rerun the same
# line after a kill), or all parts in order without --part:
#   scaling       depth family d = 1..4 at 400/800/1200 steps: loss against compute (claim 1)
#   formulations  the 7 formulations x 3 seeds at d = 2 (claim 2)
#   backbones     MM-DiT (2 and 3 weight sets), CrossDiT, DiT, UViT at equal compute (claim 3)
#   report        claims 1-5 from every finished part: WORKDIR/report/{study.md,study.json,*.png}
# Each part writes WORKDIR/<part>/<run>/ (training workdirs, RUN/sample_eval.json) and
# WORKDIR/<part>_analysis/. Wall times on an idle 2-core CPU are in docs/scaling.md.
# Usage: bash launch/scaling_demo.sh [WORKDIR] [--part scaling|formulations|backbones|report]
#        (PYTHON=/path/to/python skips the .venv set-up)
set -euo pipefail
cd "$(dirname "$0")/.."
workdir="workdirs/scaling_demo"
part="all"
while [ $# -gt 0 ]; do
  case "$1" in
    --part) part="${2:?--part needs a name: scaling, formulations, backbones or report}"; shift 2 ;;
    --part=*) part="${1#--part=}"; shift ;;
    -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "unknown option $1; usage: bash launch/scaling_demo.sh [WORKDIR] [--part NAME]" >&2; exit 2 ;;
    *) workdir="$1"; shift ;;
  esac
done
case "$part" in
  all|scaling|formulations|backbones|report) ;;
  *) echo "unknown part '$part': give scaling, formulations, backbones or report" >&2; exit 2 ;;
esac
py="${PYTHON:-}"
if [ -z "$py" ]; then
  bash launch/setup_venv.sh
  py=.venv/bin/python
fi
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"

train_and_score() {  # PART [analyze options...]
  local name="$1"; shift
  "$py" -m sd3_jax.scaling toy_data --workdir "$workdir"
  "$py" -m sd3_jax.scaling run "configs/scaling/toy_study.py:$workdir/data,$name" --sweep_dir "$workdir/$name"
  "$py" -m sd3_jax.scaling score "$workdir/$name" --text_encoders "$workdir/text_encoders" \
      --samples_per_prompt 8 --sampling_steps 25 5
  "$py" -m sd3_jax.scaling analyze "$workdir/$name" --out "$workdir/${name}_analysis" "$@"
}

for p in scaling formulations backbones report; do
  if [ "$part" != all ] && [ "$part" != "$p" ]; then continue; fi
  start=$(date +%s)
  case "$p" in
    scaling)
      train_and_score scaling
      "$py" -m sd3_jax.scaling analyze "$workdir/scaling" --out "$workdir/scaling_holdout" --holdout largest ;;
    formulations) train_and_score formulations --loss val/rf_loss ;;
    backbones) train_and_score backbones ;;
    report) "$py" -m sd3_jax.scaling study "$workdir" --out "$workdir/report" ;;
  esac
  echo "part $p done in $(( $(date +%s) - start )) s"
done
