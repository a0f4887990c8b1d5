"""`python -m emulators`: run the Twilio REST, Deepgram and Ollama emulators in one process
until SIGINT/SIGTERM, for the "try it without accounts" mode and the benchmark.

Settings come from an optional JSON file (`{"twilio": {...}, "deepgram": {...},
"ollama": {...}}`, keys as in TwilioRestEmulator's arguments, DeepgramConfig and
OllamaConfig) and then from flags. Once listening it prints one line per emulator and a
final machine-readable line: `EMULATORS_READY {"twilio": url, "deepgram": url, ...}`.
The Ollama and Deepgram URLs also serve `GET /emulator/timings` (their own lateness per
request, `{"llm": [...]}` and `{"tts": [...]}`), which the benchmark reads after a run.

Of ours, imports only: emulators.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from emulators.base import stop_all
from emulators.deepgram import DeepgramEmulator
from emulators.ollama import OllamaEmulator
from emulators.twilio_dialplan import DialPlan
from emulators.twilio_rest import TwilioRestEmulator

DEFAULT_PORTS = {"twilio": 4010, "deepgram": 4011, "ollama": 4012}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m emulators", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--config", type=Path, help="JSON file with twilio/deepgram/ollama sections")
    for name, port in DEFAULT_PORTS.items():
        p.add_argument(f"--{name}-port", type=int, default=port, help=f"default {port}; 0 = free")
    p.add_argument("--account-sid", help="Twilio account SID the REST emulator accepts")
    p.add_argument("--auth-token", help="Twilio auth token (Basic auth and signatures)")
    p.add_argument("--deepgram-api-key", help="require `Authorization: Token <key>`")
    p.add_argument("--listen-line", action="append", help="listen script line (repeatable)")
    p.add_argument("--stt-final-delay-ms", type=int)
    p.add_argument("--tts-first-byte-ms", type=int)
    p.add_argument("--tts-ms-per-char", type=float)
    p.add_argument("--ollama-model", action="append", help="model name served (repeatable)")
    p.add_argument("--reply", action="append", help="Ollama reply per user turn (repeatable)")
    p.add_argument("--ttft-ms", type=float, help="Ollama time to first token")
    p.add_argument("--tokens-per-s", type=float, help="Ollama token rate")
    p.add_argument("--dial-plan", type=Path, help="JSON: who answers the calls the service places")
    return p.parse_args(argv)


def _pick(args: argparse.Namespace, mapping: dict[str, str]) -> dict[str, Any]:
    return {key: getattr(args, attr) for key, attr in mapping.items() if getattr(args, attr)}


def build(args: argparse.Namespace) -> dict[str, Any]:
    config = json.loads(args.config.read_text()) if args.config else {}
    twilio = {
        **config.get("twilio", {}),
        **_pick(args, {"account_sid": "account_sid", "auth_token": "auth_token"}),
    }
    deepgram = {
        **config.get("deepgram", {}),
        **_pick(
            args,
            {
                "api_key": "deepgram_api_key",
                "listen_script": "listen_line",
                "stt_final_delay_ms": "stt_final_delay_ms",
                "tts_first_byte_ms": "tts_first_byte_ms",
                "tts_ms_per_char": "tts_ms_per_char",
            },
        ),
    }
    ollama = {
        **config.get("ollama", {}),
        **_pick(
            args,
            {
                "models": "ollama_model",
                "replies": "reply",
                "ttft_ms": "ttft_ms",
                "tokens_per_s": "tokens_per_s",
            },
        ),
    }
    twilio_emulator = TwilioRestEmulator(**twilio, host=args.host, port=args.twilio_port)
    if args.dial_plan:
        twilio_emulator.dial_plan = DialPlan.from_dict(json.loads(args.dial_plan.read_text()))
    return {
        "twilio": twilio_emulator,
        "deepgram": DeepgramEmulator(deepgram, host=args.host, port=args.deepgram_port),
        "ollama": OllamaEmulator(ollama, host=args.host, port=args.ollama_port),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    emulators = build(args)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        for emu in emulators.values():
            emu.start()
        twilio = emulators["twilio"]
        print(f"twilio   {twilio.url}  account {twilio.account_sid}", flush=True)
        print(f"deepgram {emulators['deepgram'].url}  {emulators['deepgram'].ws_url}", flush=True)
        print(f"ollama   {emulators['ollama'].url}", flush=True)
        ready = {name: emu.url for name, emu in emulators.items()}
        ready["deepgram_ws"] = emulators["deepgram"].ws_url
        print("EMULATORS_READY " + json.dumps(ready), flush=True)
        stop.wait()
    finally:
        stop_all(list(emulators.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
