"""Wire-level emulators of the cloud vendors (Twilio, Deepgram, Ollama) for tests, the
benchmark and the "try it without accounts" mode. Each server emulator runs a real
HTTP/WebSocket server on 127.0.0.1 in its own thread; `TwilioCaller` is a scripted phone
caller speaking the Media Streams protocol. See docs/ARCHITECTURE.md, section "Emulators".

Of ours, imports only: emulators, utils.
"""

from emulators.deepgram import DeepgramConfig, DeepgramEmulator, ListenRecord, SpeakRecord
from emulators.ollama import ChatRecord, OllamaConfig, OllamaEmulator, Reply
from emulators.twilio_caller import (
    CallerResult,
    Dtmf,
    Hangup,
    HangupAfterAgentAudio,
    Say,
    SayAfterAgentAudio,
    TwilioCaller,
    run_callers,
)
from emulators.twilio_rest import TwilioRestEmulator

__all__ = [
    "CallerResult",
    "ChatRecord",
    "DeepgramConfig",
    "DeepgramEmulator",
    "Dtmf",
    "Hangup",
    "HangupAfterAgentAudio",
    "ListenRecord",
    "OllamaConfig",
    "OllamaEmulator",
    "Reply",
    "Say",
    "SayAfterAgentAudio",
    "SpeakRecord",
    "TwilioCaller",
    "TwilioRestEmulator",
    "run_callers",
]
