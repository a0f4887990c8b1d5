#!/usr/bin/env bash
# Sets up ./.venv and starts the service on embedded defaults (SQLite + Chroma under ./data).
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh
mkdir -p data
exec .venv/bin/uvicorn main:create_app --factory --host "${HOST:-0.0.0.0}" --port "${PORT:-8000}" \
  --http api.http_protocol:HeadTimeoutProtocol --ws api.media_ws:MediaStreamProtocol \
  --ws-per-message-deflate false --ws-max-size 262144 "$@"
