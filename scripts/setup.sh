#!/usr/bin/env bash
# Creates ./.venv and installs the pinned dependencies. Idempotent and fast on re-runs: pip
# runs again only when a requirements file changed. With --test it also installs the Debian
# packages the tests use: espeak-ng and sox for real audio, chromium for the console's
# browser tests (Playwright drives the system browser; it never downloads one).
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
[ "${1:-}" = "--test" ] && want_test=1

if [ "$want_test" = 1 ] && ! { command -v espeak-ng && command -v sox && command -v chromium; } >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq espeak-ng sox chromium >/dev/null
fi

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv

req=requirements.txt; [ "$want_test" = 1 ] && req=requirements-dev.txt
stamp=".venv/.installed-$(basename "$req" .txt)"
digest=$(cat requirements.txt "$req" | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$digest" ]; then
  .venv/bin/pip install -q --upgrade pip
  # torch first and pinned: an unpinned torch pulls gigabytes of CUDA wheels
  .venv/bin/pip install -q "$(grep -E '^torch==' requirements.txt)"
  .venv/bin/pip install -q -r "$req"
  echo "$digest" > "$stamp"
fi
