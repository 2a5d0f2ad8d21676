#!/usr/bin/env bash
# The whole test suite on CPU: creates/updates .venv with the test extra, checks formatting and
# lint (ruff, configured in pyproject.toml), then runs pytest.
# Usage: bash launch/test.sh [PYTEST ARGS...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_venv.sh test
.venv/bin/ruff format --check --quiet . || {
  echo "launch/test.sh: error: files above are not formatted; run .venv/bin/ruff format ." >&2; exit 1; }
.venv/bin/ruff check --quiet .
export JAX_PLATFORMS=cpu
# One worker per core; a file's tests stay in one worker (they share module fixtures and runs).
exec .venv/bin/python -m pytest -n auto --dist loadfile "$@"
