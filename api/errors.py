"""The API's error shape and the handlers that keep every failure a clear JSON 4xx/5xx:
`{"error": {"code", "message", "field"}}`. Validation errors name the offending field.

Must not import: twilio, deepgram, ollama, chromadb, sqlalchemy, pipeline, voice_pipeline.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("ai_sdr.errors")


class APIError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field
        self.headers = headers


def not_found(kind: str, ident: str) -> APIError:
    return APIError(404, "not_found", f"{kind} {ident!r} does not exist")


def error_response(
    status: int,
    code: str,
    message: str,
    field: str | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    body: dict[str, Any] = {"code": code, "message": message, "field": field, **extra}
    if status == 401:
        headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def _field_name(loc: tuple[Any, ...]) -> str:
    """`("body", "calendar", "timezone")` -> "calendar.timezone"; only the leading location
    is dropped, so a body field named `query` keeps its name."""
    parts = [str(p) for p in loc]
    if len(parts) > 1 and parts[0] in ("body", "query", "path", "header", "cookie", "form"):
        parts = parts[1:]
    return ".".join(parts) or "body"


def _describe(error: dict[str, Any]) -> dict[str, str]:
    if error.get("type") == "json_invalid":
        reason = (error.get("ctx") or {}).get("error", "")
        return {"field": "body", "message": f"malformed JSON ({reason})".replace(" ()", "")}
    message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    return {"field": _field_name(tuple(error.get("loc", ()))), "message": message}


async def _validation_handler(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    details = [_describe(e) for e in exc.errors()] or [{"field": "body", "message": "invalid"}]
    field, message = details[0]["field"], f"{details[0]['field']}: {details[0]['message']}"
    return error_response(422, "validation_error", message, field, details=details)


async def _api_error_handler(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return error_response(exc.status, exc.code, exc.message, exc.field, exc.headers)


async def _http_handler(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = {
        401: "unauthorized",
        403: "forbidden",
        404: "not_found",
        405: "method_not_allowed",
        413: "too_large",
        415: "unsupported_media_type",
    }.get(exc.status_code, "http_error")
    return error_response(exc.status_code, code, str(exc.detail))


async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "internal_error", "internal server error")


class BodyTooLarge(StarletteHTTPException):
    """Raised from `receive` once a streamed (chunked) body passes its route's limit."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body larger than {limit} bytes")


class BodySizeLimit:
    """The request body limit, on every route: `max_bytes`, or the larger limit of a path
    that matches one of `routes` (a regex to bytes). A declared Content-Length over the
    limit gets a 413 before anything reads the body; a chunked body gets its 413 as soon as
    the bytes received pass the limit (the rest is never read)."""

    def __init__(self, app: Any, max_bytes: int, routes: dict[str, int] | None = None) -> None:
        self.app, self.max_bytes = app, max_bytes
        self.routes = [(re.compile(pattern), limit) for pattern, limit in (routes or {}).items()]

    def limit_for(self, path: str) -> int:
        for pattern, limit in self.routes:
            if pattern.fullmatch(path):
                return limit
        return self.max_bytes

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            if length.isdigit():
                response = error_response(413, "too_large", str(BodyTooLarge(limit).detail))
            else:
                response = error_response(400, "bad_request", "invalid Content-Length header")
            await response(scope, receive, send)
            return
        received, started = 0, False

        async def counted_receive() -> Any:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def watched_send(message: Any) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, watched_send)
        except BodyTooLarge as exc:  # a route that let it pass its handlers
            if started:
                raise
            await error_response(413, "too_large", str(exc.detail))(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(APIError, _api_error_handler)
    app.add_exception_handler(StarletteHTTPException, _http_handler)
    app.add_exception_handler(Exception, _unhandled)
