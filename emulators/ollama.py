"""Ollama emulator: `/api/chat` with NDJSON streaming (and `stream:false`, `format`), plus
`/api/tags`, `/api/show`, `/api/ps`, `/api/version`, speaking PROTOCOLS C1-C4 so the real
`ollama.AsyncClient(host=emu.url)` can be pointed at it.

Replies come from a script, not a model: a list indexed by the number of user messages in
the request, or a callable over the messages. Timing is a time-to-first-token followed by
a steady token rate. Faults: unknown model (404), HTTP 500, a stall before the first
byte, an error line mid-stream, a slow first token. A client that disconnects before the
stream ends stops generation and is counted as a cancellation.

Each streamed chat's timing (received, first token line written, configured TTFT) is
served at `GET /emulator/timings` as `{"llm": [...]}` (see `emulators.base.timings_route`).

Of ours, imports only: emulators.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from emulators.base import (
    RECORDS_KEPT,
    PacedResponse,
    ThreadedServer,
    config_from,
    timings_route,
)

DEFAULT_REPLY = (
    "Thanks for taking my call! I'm reaching out because we help teams like yours book more "
    "meetings with less effort. Would you be open to a quick fifteen minute chat this week?"
)
FAULTS = ("http500", "stall", "midstream_error", "slow")
MODEL_ERROR = "an error was encountered while running the model"


@dataclass
class Reply:
    """One scripted assistant turn."""

    text: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    """Each {"name": str, "arguments": dict}; streamed whole, after the text."""
    json: Any = None
    """Content used when the request has `format` (serialised with json.dumps)."""
    fault: str | None = None
    """"http500", "stall" or "midstream_error" for this reply only."""

    @classmethod
    def of(cls, value: Reply | str | dict[str, Any]) -> Reply:
        if isinstance(value, Reply):
            return value
        if isinstance(value, str):
            return cls(text=value)
        return cls(**value)


ReplyScript = list[Reply | str | dict[str, Any]] | Callable[[list[dict[str, Any]]], Any]


def _default_replies() -> ReplyScript:
    return [Reply(DEFAULT_REPLY)]


@dataclass
class OllamaConfig:
    models: list[str] = field(default_factory=lambda: ["llama3.2"])
    replies: ReplyScript = field(default_factory=_default_replies)
    ttft_ms: float = 250.0
    tokens_per_s: float = 40.0
    midstream_error_after: int = 3
    """Tokens sent before a mid-stream error line."""
    version: str = "0.12.3"


@dataclass
class Fault:
    mode: str
    remaining: int | None = None
    """Requests still to affect; None = until cleared."""
    ttft_ms: float | None = None


@dataclass
class ChatRecord:
    body: dict[str, Any]
    time: float
    status: str = "pending"
    """"completed", "cancelled", "midstream_error", "http_error" or "pending"."""
    http_status: int = 200
    tokens_sent: int = 0
    reply: Reply | None = None
    received: float | None = None
    """`time.monotonic()` once the request body was read."""
    first: float | None = None
    """`time.monotonic()` once the first content token line was handed to the transport
    (streaming replies only; None when no token went out)."""
    configured_ms: float | None = None
    """The time to first token this request was given (config, or a "slow" fault)."""


def split_tokens(text: str) -> list[str]:
    """Word-ish tokens that keep their leading whitespace: they join back to `text`."""
    tokens = re.findall(r"\s*\S+", text)
    tail = text[len("".join(tokens)) :]
    if tail:
        tokens.append(tail)
    return tokens


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _line(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj) + "\n").encode()


def _same_model(a: str, b: str) -> bool:
    def norm(name: str) -> str:
        return name if ":" in name else name + ":latest"

    return norm(a) == norm(b)


class OllamaEmulator(ThreadedServer):
    """Scripted Ollama server.

    Recorded (copies): `requests` (ChatRecord per /api/chat call, the last RECORDS_KEPT),
    `request_bodies`, `cancellations` (clients gone before the stream ended),
    `active_generations`; over HTTP, `GET /emulator/timings`.
    Faults: `set_fault(mode, count=None, ttft_ms=None)`, `clear_faults()`.
    """

    name = "ollama"

    def __init__(
        self,
        config: OllamaConfig | dict[str, Any] | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        **overrides: Any,
    ) -> None:
        super().__init__(host=host, port=port)
        self.config = config_from(OllamaConfig, config, overrides)
        self._records: deque[ChatRecord] = deque(maxlen=RECORDS_KEPT)
        self._faults: deque[Fault] = deque()
        self._cancellations = 0
        self._active = 0

    # --- recorded state -----------------------------------------------------------------

    @property
    def requests(self) -> list[ChatRecord]:
        with self.lock:
            return [replace(r) for r in self._records]

    @property
    def request_bodies(self) -> list[dict[str, Any]]:
        with self.lock:
            return [r.body for r in self._records]

    @property
    def cancellations(self) -> int:
        with self.lock:
            return self._cancellations

    @property
    def active_generations(self) -> int:
        with self.lock:
            return self._active

    # --- script and faults --------------------------------------------------------------

    def set_replies(self, replies: ReplyScript) -> None:
        with self.lock:
            self.config.replies = replies

    def set_fault(self, mode: str, count: int | None = None, ttft_ms: float | None = None) -> None:
        """Apply `mode` to the next `count` chat requests (None: until cleared). "slow" only
        changes the time to first token (`ttft_ms`, default 5 s)."""
        if mode not in FAULTS:
            raise ValueError(f"unknown fault {mode!r}; expected one of {FAULTS}")
        if mode == "slow" and ttft_ms is None:
            ttft_ms = 5000.0
        with self.lock:
            self._faults.append(Fault(mode, count, ttft_ms))

    def clear_faults(self) -> None:
        with self.lock:
            self._faults.clear()

    def _take_fault(self) -> Fault | None:
        with self.lock:
            if not self._faults:
                return None
            fault = self._faults[0]
            if fault.remaining is not None:
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self._faults.popleft()
            return fault

    def reply_for(self, messages: list[dict[str, Any]]) -> Reply:
        script = self.config.replies
        if callable(script):
            return Reply.of(script(messages))
        if not script:
            return Reply()
        users = sum(1 for m in messages if isinstance(m, dict) and m.get("role") == "user")
        return Reply.of(script[min(max(users - 1, 0), len(script) - 1)])

    def has_model(self, name: str) -> bool:
        return any(_same_model(name, m) for m in self.config.models)

    # --- app ----------------------------------------------------------------------------

    def build_app(self) -> Starlette:
        routes = [
            Route("/", self._root, methods=["GET", "HEAD"]),
            Route("/api/version", self._version, methods=["GET"]),
            Route("/api/tags", self._tags, methods=["GET"]),
            Route("/api/ps", self._ps, methods=["GET"]),
            Route("/api/show", self._show, methods=["POST"]),
            Route("/api/chat", self._chat, methods=["POST"]),
            timings_route(self, "llm", lambda: self._records),
        ]
        return Starlette(routes=routes)

    async def _root(self, request: Request) -> Response:
        return PlainTextResponse("Ollama is running")

    async def _version(self, request: Request) -> Response:
        return JSONResponse({"version": self.config.version})

    def _model_entry(self, name: str) -> dict[str, Any]:
        full = name if ":" in name else name + ":latest"
        return {
            "name": full,
            "model": full,
            "modified_at": "2025-01-01T00:00:00Z",
            "size": 2019393189,
            "digest": secrets.token_hex(32),
            "details": _details(),
        }

    async def _tags(self, request: Request) -> Response:
        return JSONResponse({"models": [self._model_entry(m) for m in self.config.models]})

    async def _ps(self, request: Request) -> Response:
        models = [
            {**self._model_entry(m), "expires_at": "2099-01-01T00:00:00Z", "size_vram": 0}
            for m in self.config.models
        ]
        return JSONResponse({"models": models})

    async def _show(self, request: Request) -> Response:
        body = await _json_body(request)
        name = str(body.get("model") or body.get("name") or "")
        if not self.has_model(name):
            return JSONResponse({"error": f"model '{name}' not found"}, 404)
        return JSONResponse(
            {
                "modelfile": f"FROM {name}",
                "parameters": "",
                "template": "{{ .Prompt }}",
                "details": _details(),
                "model_info": {"general.architecture": "llama"},
                "capabilities": ["completion", "tools"],
                "modified_at": "2025-01-01T00:00:00Z",
            }
        )

    async def _chat(self, request: Request) -> Response | PacedResponse:
        body = await _json_body(request)
        record = ChatRecord(body=body, time=time.time(), received=time.monotonic())
        with self.lock:
            self._records.append(record)
        model = str(body.get("model") or "")
        rejection = self._reject(model)
        if rejection is not None:
            record.status, record.http_status = "http_error", rejection.status_code
            return rejection
        fault = self._take_fault()
        reply = self.reply_for(body.get("messages") or [])
        record.reply = reply
        mode = fault.mode if fault else reply.fault
        if mode == "http500":
            record.status, record.http_status = "http_error", 500
            return JSONResponse({"error": MODEL_ERROR}, 500)
        ttft = fault.ttft_ms if fault and fault.ttft_ms is not None else self.config.ttft_ms
        record.configured_ms = ttft
        return self._respond(model, body, reply, mode, ttft / 1000, record)

    def _reject(self, model: str) -> Response | None:
        if not model:
            return JSONResponse({"error": "model is required"}, 400)
        if not self.has_model(model):
            return JSONResponse({"error": f"model '{model}' not found"}, 404)
        return None

    def _respond(
        self,
        model: str,
        body: dict[str, Any],
        reply: Reply,
        mode: str | None,
        ttft: float,
        record: ChatRecord,
    ) -> PacedResponse:
        content = reply.text
        if body.get("format") and reply.json is not None:
            content = json.dumps(reply.json)
        turn = _Turn(self, model, body, content, reply.tool_calls, mode, ttft, record)
        streaming = body.get("stream", True) is not False
        status = 500 if (mode == "midstream_error" and not streaming) else 200

        def cancelled() -> None:
            with self.lock:
                record.status = "cancelled"
                self._cancellations += 1

        return PacedResponse(
            turn.stream() if streaming else turn.single(),
            status=status,
            media_type="application/x-ndjson" if streaming else "application/json; charset=utf-8",
            on_cancel=cancelled,
        )

    def _generation(self, delta: int) -> None:
        with self.lock:
            self._active += delta


class _Turn:
    """Produces the body of one /api/chat response."""

    def __init__(
        self,
        emu: OllamaEmulator,
        model: str,
        body: dict[str, Any],
        content: str,
        tool_calls: list[dict[str, Any]],
        mode: str | None,
        ttft: float,
        record: ChatRecord,
    ) -> None:
        self.emu, self.model, self.body, self.record = emu, model, body, record
        self.tokens = split_tokens(content)
        self.tool_calls = tool_calls
        self.mode, self.ttft = mode, ttft
        self.rate = max(emu.config.tokens_per_s, 1e-3)
        self.error_after = emu.config.midstream_error_after
        self.started = time.monotonic()

    async def stream(self) -> AsyncIterator[bytes]:
        self.emu._generation(+1)
        try:
            async for line in self._stream_lines():
                yield line
        finally:
            self.emu._generation(-1)

    async def _stream_lines(self) -> AsyncIterator[bytes]:
        if self.mode == "stall":
            await asyncio.Event().wait()
        if not self.body.get("messages"):
            yield _line(self._final("load"))
            self.record.status = "completed"
            return
        await asyncio.sleep(self.ttft)
        loop = asyncio.get_running_loop()
        first = loop.time()
        for i, token in enumerate(self.tokens):
            if self.mode == "midstream_error" and i >= self.error_after:
                break
            yield _line(self._chunk({"role": "assistant", "content": token}))
            # resumed once the line was sent: PacedResponse asks for the next one
            if i == 0:
                self.record.first = time.monotonic()
            self.record.tokens_sent += 1
            due = first + (i + 1) / self.rate
            if due > loop.time():
                await asyncio.sleep(due - loop.time())
        if self.mode == "midstream_error":
            self.record.status = "midstream_error"
            yield _line({"error": MODEL_ERROR})
            return
        if self.tool_calls:
            yield _line(self._chunk(self._tool_message()))
        yield _line(self._final("stop"))
        self.record.status = "completed"

    async def single(self) -> AsyncIterator[bytes]:
        self.emu._generation(+1)
        try:
            if self.mode == "stall":
                await asyncio.Event().wait()
            await asyncio.sleep(self.ttft + len(self.tokens) / self.rate)
            if self.mode == "midstream_error":
                self.record.status, self.record.http_status = "midstream_error", 500
                yield json.dumps({"error": MODEL_ERROR}).encode()
                return
            message: dict[str, Any] = {"role": "assistant", "content": "".join(self.tokens)}
            if self.tool_calls:
                message["tool_calls"] = self._tool_message()["tool_calls"]
            self.record.tokens_sent = len(self.tokens)
            self.record.status = "completed"
            yield json.dumps({**self._final("stop"), "message": message}).encode()
        finally:
            self.emu._generation(-1)

    def _chunk(self, message: dict[str, Any]) -> dict[str, Any]:
        return {"model": self.model, "created_at": _now(), "message": message, "done": False}

    def _tool_message(self) -> dict[str, Any]:
        calls = [
            {
                "id": "call_" + secrets.token_hex(4),
                "function": {
                    "index": i,
                    "name": call["name"],
                    "arguments": call.get("arguments") or {},
                },
            }
            for i, call in enumerate(self.tool_calls)
        ]
        return {"role": "assistant", "content": "", "tool_calls": calls}

    def _final(self, reason: str) -> dict[str, Any]:
        total_ns = int((time.monotonic() - self.started) * 1e9)
        prompt_chars = sum(len(str(m.get("content") or "")) for m in self.body.get("messages", []))
        return {
            "model": self.model,
            "created_at": _now(),
            "message": {"role": "assistant", "content": ""},
            "done": True,
            "done_reason": reason,
            "total_duration": total_ns,
            "load_duration": 1_000_000,
            "prompt_eval_count": max(1, prompt_chars // 4),
            "prompt_eval_duration": int(self.ttft * 1e9),
            "eval_count": len(self.tokens),
            "eval_duration": int(len(self.tokens) / self.rate * 1e9),
        }


def _details() -> dict[str, Any]:
    return {
        "parent_model": "",
        "format": "gguf",
        "family": "llama",
        "families": ["llama"],
        "parameter_size": "3.2B",
        "quantization_level": "Q4_K_M",
    }


async def _json_body(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


__all__ = [
    "DEFAULT_REPLY",
    "FAULTS",
    "ChatRecord",
    "OllamaConfig",
    "OllamaEmulator",
    "Reply",
    "split_tokens",
]
