"""Custom HTTP tools: a signed request to the customer's fixed URL and method, whose answer
goes back to the LLM. The service's context (`tool`, `call_id`, `agent_id`,
`caller_number`) always wins over an LLM argument of the same name. The client refuses
private addresses at send time (`adapters.netguard.guarded_client`).

Must not import FastAPI, routes or voice_pipeline. Arguments are never logged.

Must not import: fastapi, starlette, uvicorn, twilio, deepgram, ollama, api, voice_pipeline,
chromadb.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx

from adapters.netguard import UnsafeURLError, check_public_url
from adapters.signing import SIGNATURE_HEADER, signature
from config import Settings
from pipeline.contracts import ToolContext, ToolOutcome
from pipeline.providers import ToolCall
from schemas import HttpTool
from tools.common import error, key_hash

HTTP_RESULT_MAX_BYTES = 16 * 1024  # what the LLM context can usefully take
_DROPPED_HEADERS = {"host", "content-length", "transfer-encoding", "connection"}


class HttpTools:
    def __init__(self, http: httpx.AsyncClient, settings: Settings) -> None:
        self.http = http
        self.settings = settings

    async def run(self, tool: HttpTool, call: ToolCall, ctx: ToolContext) -> ToolOutcome:
        try:
            check_public_url(str(tool.url), self.settings.ALLOW_PRIVATE_URLS)
            request = self._request(tool, call, ctx)
            async with asyncio.timeout(tool.timeout_seconds):
                response = await self.http.send(request, stream=True)
                try:
                    body, truncated = await _read_capped(response, HTTP_RESULT_MAX_BYTES)
                finally:
                    await response.aclose()
        except UnsafeURLError as exc:
            return error(f"the {tool.name} tool's URL was refused: {exc}")
        except TimeoutError:
            return error(f"{tool.name} did not answer within {tool.timeout_seconds:g} seconds")
        except httpx.HTTPError as exc:
            return error(f"{tool.name} could not be reached ({type(exc).__name__})")
        return ToolOutcome(_http_result(tool, response, body, truncated))

    def _request(self, tool: HttpTool, call: ToolCall, ctx: ToolContext) -> httpx.Request:
        """The request carries the call context; the signature covers the exact bytes sent:
        the JSON body, or for GET and DELETE the query string."""
        config = ctx.config
        context = {
            "tool": tool.name,
            "call_id": config.call_id,
            "agent_id": config.agent_id,
            "caller_number": config.caller_number,
        }
        headers = {k: v for k, v in tool.headers.items() if k.lower() not in _DROPPED_HEADERS}
        headers["X-Idempotency-Key"] = key_hash(ctx.idempotency_key)
        if tool.method in ("GET", "DELETE"):
            # the service's context last: an LLM argument cannot stand in for it
            params = {**{k: _param(v) for k, v in call.arguments.items()}, **context}
            request = self.http.build_request(
                tool.method,
                httpx.URL(str(tool.url)).copy_merge_params(params),
                headers=headers,
                timeout=tool.timeout_seconds,
            )
            signed = request.url.query
        else:
            body = json.dumps({**context, "arguments": call.arguments}, separators=(",", ":"))
            headers["Content-Type"] = "application/json"
            request = self.http.build_request(
                tool.method,
                str(tool.url),
                content=body.encode(),
                headers=headers,
                timeout=tool.timeout_seconds,
            )
            signed = request.content
        secret = self.settings.WEBHOOK_SIGNING_SECRET
        request.headers[SIGNATURE_HEADER] = signature(secret, signed, int(time.time()))
        return request


def _param(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


async def _read_capped(response: httpx.Response, limit: int) -> tuple[bytes, bool]:
    body = bytearray()
    async for piece in response.aiter_bytes():
        body += piece
        if len(body) > limit:
            return bytes(body[:limit]), True
    return bytes(body), False


def _http_result(tool: HttpTool, response: httpx.Response, body: bytes, truncated: bool) -> Any:
    text = body.decode(response.encoding or "utf-8", errors="replace")
    if response.status_code >= 400:
        return {"error": f"{tool.name} answered HTTP {response.status_code}", "detail": text[:300]}
    if not truncated:
        try:
            return json.loads(text)
        except ValueError:
            pass
    return text + (" [truncated]" if truncated else "")
