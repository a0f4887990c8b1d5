#!/usr/bin/env bash
# Sets up ./.venv (with test tools, espeak-ng and sox), then ruff, mypy on the service and
# emulators, and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh --test
.venv/bin/ruff check .
.venv/bin/mypy *.py emulators
exec .venv/bin/python -m pytest "$@"
