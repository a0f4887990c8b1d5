#!/usr/bin/env bash
# Sets up ./.venv (with test tools, espeak-ng and sox), then ruff, mypy (strict, on every
# package and top-level module: the list is in pyproject.toml), vulture (dead code) and the
# whole test suite.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh --test
.venv/bin/ruff check .
.venv/bin/mypy
.venv/bin/vulture
exec .venv/bin/python -m pytest "$@"
