#!/usr/bin/env bash
# "Try it without accounts": the service against the local wire emulators (Twilio REST,
# Deepgram listen/speak, Ollama chat), then one simulated phone call with spoken audio.
# Needs ./test.sh's setup once (espeak-ng and sox for the caller's voice).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
export TWILIO_ACCOUNT_SID=AC00000000000000000000000000000001 TWILIO_AUTH_TOKEN=demo-token
export DEEPGRAM_API_KEY=demo-key API_KEYS=demo-key PUBLIC_BASE_URL=http://127.0.0.1:8000
export TWILIO_API_BASE_URL=http://127.0.0.1:4010 DEEPGRAM_BASE_URL=http://127.0.0.1:4011
export OLLAMA_HOST=http://127.0.0.1:4012 DATA_DIR=./data/demo
export DATABASE_URL=sqlite+aiosqlite:///./data/demo/ai_sdr.db CHROMA_PATH=./data/demo/chroma
mkdir -p data/demo
.venv/bin/python -m emulators --account-sid "$TWILIO_ACCOUNT_SID" --auth-token "$TWILIO_AUTH_TOKEN" \
  --listen-line "Hi, I'd like to hear about your pricing." --listen-line "Thanks, goodbye." \
  --reply "Sure! We have three plans, starting at nineteen dollars a month." \
  --reply "Thanks for calling, goodbye!" > data/demo/emulators.log 2>&1 &
emulators=$!
.venv/bin/uvicorn main:create_app --factory --port 8000 --ws api.media_ws:MediaStreamProtocol --log-level warning > data/demo/service.log 2>&1 &
service=$!
trap 'kill $service $emulators 2>/dev/null' EXIT
.venv/bin/python scripts/demo_call.py
