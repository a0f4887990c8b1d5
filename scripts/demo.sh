#!/usr/bin/env bash
# "Try it without accounts": the service against the local wire emulators (Twilio REST,
# Deepgram listen/speak, Ollama chat), then one simulated phone call with spoken audio,
# then a ten-contact campaign with mixed outcomes (the emulator's dial plan below decides
# who answers) and its results CSV.
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
cat > data/demo/dial_plan.json <<'PLAN'
{"app_base": "http://127.0.0.1:8000", "media_url": "ws://127.0.0.1:8000/twilio/media",
 "default": {"kind": "human", "hangup_s": 8, "amd_after_s": 0.5},
 "numbers": {
   "+14155550103": [{"kind": "machine", "hangup_s": 30, "amd_after_s": 2}],
   "+14155550104": [{"kind": "no-answer"}, {"kind": "human", "hangup_s": 6, "amd_after_s": 0.5}],
   "+14155550105": [{"kind": "busy"}],
   "+14155550106": [{"kind": "invalid"}],
   "+14155550109": [{"kind": "machine", "hangup_s": 30, "amd_after_s": 2}]}}
PLAN
.venv/bin/python -m emulators --dial-plan data/demo/dial_plan.json --account-sid "$TWILIO_ACCOUNT_SID" --auth-token "$TWILIO_AUTH_TOKEN" \
  --listen-line "Hi, I'd like to hear about your pricing." --listen-line "Thanks, goodbye." \
  --reply "Sure! We have three plans, starting at nineteen dollars a month." \
  --reply "Thanks for calling, goodbye!" > data/demo/emulators.log 2>&1 &
emulators=$!
.venv/bin/uvicorn main:create_app --factory --port 8000 --ws api.media_ws:MediaStreamProtocol --log-level warning > data/demo/service.log 2>&1 &
service=$!
trap 'kill $service $emulators 2>/dev/null' EXIT
.venv/bin/python scripts/demo_call.py
.venv/bin/python scripts/demo_campaign.py
