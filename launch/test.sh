#!/usr/bin/env bash
# The whole test suite on CPU: creates/updates .venv with the test extra, then runs pytest.
# Usage: bash launch/test.sh [PYTEST ARGS...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_venv.sh test
export JAX_PLATFORMS=cpu
exec .venv/bin/python -m pytest "$@"
