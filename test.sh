#!/usr/bin/env bash
# Sets up ./.venv (with test tools, espeak-ng and sox) and runs lint and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh --test
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"
