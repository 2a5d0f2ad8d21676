#!/usr/bin/env bash
# Create (if missing) the project's virtual environment in .venv and install sd3_jax into it,
# saying what it does on stderr (the first install takes a minute or more).
# Usage: bash launch/setup_venv.sh [EXTRAS]   e.g. EXTRAS=test or test,tpu
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
say() { echo "setup_venv: $*" >&2; }
if [ ! -x .venv/bin/python ]; then
  say "creating the virtual environment .venv ($(python3 --version 2>&1))"
  python3 -m venv .venv
fi
spec="."
[ -n "$extras" ] && spec=".[${extras}]"
# Re-install only when setup.cfg changed since the last install (keeps repeated runs fast). Any
# install, with or without extras, holds the base requirements.
stamp=".venv/.sd3_jax-installed-${extras:-base}"
fresh=""
for s in "$stamp" $([ -z "$extras" ] && ls .venv/.sd3_jax-installed-* 2>/dev/null); do
  if [ -f "$s" ] && [ ! setup.cfg -nt "$s" ]; then fresh=1; fi
done
if [ -z "$fresh" ]; then
  say "installing sd3_jax${extras:+ with [$extras]} and its dependencies into .venv (pip; a minute or more the first time)"
  t0=$SECONDS
  log=$(mktemp)
  if ! .venv/bin/python -m pip install -q --disable-pip-version-check -e "$spec" >"$log" 2>&1; then
    grep -v "^WARNING: Location" "$log" >&2; rm -f "$log"; exit 1
  fi
  rm -f "$log"
  .venv/bin/python -c "import sd3_jax, jax, flax" >/dev/null
  touch "$stamp"
  say "installed in $((SECONDS - t0)) s"
fi
