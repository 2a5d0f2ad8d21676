#!/usr/bin/env bash
# Create (if missing) the project's virtual environment in .venv and install sd3_jax into it.
# Usage: bash launch/setup_venv.sh [EXTRAS]   e.g. EXTRAS=test or test,tpu
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
spec="."
[ -n "$extras" ] && spec=".[${extras}]"
# Re-install only when setup.cfg changed since the last install (keeps repeated runs fast).
stamp=".venv/.sd3_jax-installed-${extras:-base}"
if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ]; then
  log=$(mktemp)
  if ! .venv/bin/python -m pip install -q --disable-pip-version-check -e "$spec" >"$log" 2>&1; then
    grep -v "^WARNING: Location" "$log" >&2; rm -f "$log"; exit 1
  fi
  rm -f "$log"
  .venv/bin/python -c "import sd3_jax, jax, flax" >/dev/null
  touch "$stamp"
fi
