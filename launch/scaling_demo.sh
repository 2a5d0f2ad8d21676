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
# --jobs N trains N runs side by side, each single-threaded (sd3-scaling run --worker I/N; logs in
# WORKDIR/<part>.worker<I>.log): small models use more of the cores that way (docs/scaling.md).
# Usage: bash launch/scaling_demo.sh [WORKDIR] [--part scaling|formulations|backbones|report] [--jobs N]
#        (PYTHON=/path/to/python skips the .venv set-up)
set -euo pipefail
cd "$(dirname "$0")/.."
workdir="workdirs/scaling_demo"
part="all"
jobs=1
while [ $# -gt 0 ]; do
  case "$1" in
    --part) part="${2:?--part needs a name: scaling, formulations, backbones or report}"; shift 2 ;;
    --part=*) part="${1#--part=}"; shift ;;
    --jobs) jobs="${2:?--jobs needs a number}"; shift 2 ;;
    --jobs=*) jobs="${1#--jobs=}"; shift ;;
    -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "unknown option $1; usage: bash launch/scaling_demo.sh [WORKDIR] [--part NAME]" >&2; exit 2 ;;
    *) workdir="$1"; shift ;;
  esac
done
case "$part" in
  all|scaling|formulations|backbones|report) ;;
  *) echo "unknown part '$part': give scaling, formulations, backbones or report" >&2; exit 2 ;;
esac
case "$jobs" in
  ''|*[!0-9]*|0) echo "--jobs '$jobs': give a positive whole number" >&2; exit 2 ;;
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
  local sweep="configs/scaling/toy_study.py:$workdir/data,$name"
  if [ "$jobs" -eq 1 ]; then
    "$py" -m sd3_jax.scaling run "$sweep" --sweep_dir "$workdir/$name"
  else
    local pids=() failed=0
    trap 'kill "${pids[@]}" 2>/dev/null' INT TERM
    for ((i = 0; i < jobs; i++)); do
      XLA_FLAGS="${XLA_FLAGS:-} --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \
        "$py" -m sd3_jax.scaling run "$sweep" --sweep_dir "$workdir/$name" --worker "$i/$jobs" \
        > "$workdir/$name.worker$i.log" 2>&1 &
      pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
    trap - INT TERM
    if [ "$failed" -ne 0 ]; then
      echo "a worker failed: see $workdir/$name.worker*.log; rerun the same command to go on" >&2
      exit 1
    fi
  fi
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
