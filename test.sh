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
# Four workers on any machine: most tests are real-time call timelines that wait far more
# than they compute (the whole suite used ~2 CPU-minutes in 9 wall-minutes on one worker).
# PYTEST_WORKERS=0 runs it in one process.
exec .venv/bin/python -m pytest -n "${PYTEST_WORKERS:-4}" --dist worksteal "$@"
