#!/usr/bin/env bash
# Run on EVERY host of a TPU pod slice (e.g. through
#   gcloud compute tpus tpu-vm ssh NAME --worker=all --command "cd sd3_jax && bash launch/tpu_pod.sh ...").
# jax.distributed discovers the slice by itself (--multihost). Check the fit first with
#   python -m tools.aot_compile --config CONFIG --topology v5p:8x8x8
# Several slices on GKE: launch/gke_jobset.sh. The run restarts after anything but done (0), a
# bad config (2) or divergence (3): launch/restart_policy.sh, docs/multislice.md.
# Usage: bash launch/tpu_pod.sh CONFIG WORKDIR [--config.key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
config="$1"; workdir="$2"; shift 2
[ -x .venv/bin/python ] || { python3 -m venv .venv; .venv/bin/python -m pip install -q -e ".[tpu]"; }
source launch/tpu_flags.sh
source launch/restart_policy.sh
export LIBTPU_INIT_ARGS="${LIBTPU_INIT_ARGS-$TPU_XLA_FLAGS}"
sd3_run_with_restarts .venv/bin/python -m sd3_jax.main --config "$config" --workdir "$workdir" --multihost "$@"
