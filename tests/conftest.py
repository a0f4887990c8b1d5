"""Shared fixtures: per-test settings and database in tmp_path, the real app through
httpx.ASGITransport, the Twilio REST emulator, signing helpers, and a leaked-task guard."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from twilio.request_validator import RequestValidator

from config import Settings
from main import create_app

ACCOUNT_SID = "AC" + "1" * 32
AUTH_TOKEN = "test-auth-token"
API_KEY = "test-api-key"
PUBLIC_BASE = "https://voice.example.test"


@pytest.fixture(autouse=True)
async def fail_on_leaked_tasks() -> AsyncIterator[None]:
    """Fails any async test that leaves a task running on its loop."""
    before = asyncio.all_tasks()
    yield
    current = asyncio.current_task()
    deadline = asyncio.get_running_loop().time() + 1.0
    while True:
        leaked = [t for t in asyncio.all_tasks() - before if t is not current and not t.done()]
        if not leaked or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.02)
    for task in leaked:
        task.cancel()
    assert not leaked, f"test leaked tasks: {[t.get_coro() for t in leaked]}"


@pytest.fixture(scope="session")
def embedding_model() -> None:
    """Loads the MiniLM model once for the session (seconds); every KnowledgeBase, and every
    app's knowledge base, shares it."""
    from knowledge.embedding import embed

    embed(["warm up"])


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "ENVIRONMENT": "test",
        "DATA_DIR": tmp_path,
        "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/test.db",
        "CHROMA_PATH": tmp_path / "chroma",
        "PUBLIC_BASE_URL": PUBLIC_BASE,
        "API_KEYS": [API_KEY],
        "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
        "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
        "TWILIO_API_BASE_URL": "http://127.0.0.1:9",
        "DEEPGRAM_API_KEY": "dg-test-key",
        "DEEPGRAM_BASE_URL": "http://127.0.0.1:9",
        "OLLAMA_HOST": "http://127.0.0.1:9",
        "ALLOW_PRIVATE_URLS": True,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)


def api_client(app: Any, *, authorized: bool = True) -> httpx.AsyncClient:
    """An httpx client on the app through ASGITransport, with the API key unless told not."""
    headers = {"Authorization": f"Bearer {API_KEY}"} if authorized else {}
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://testserver", headers=headers
    )


@asynccontextmanager
async def running_app(settings: Settings) -> AsyncIterator[tuple[Any, httpx.AsyncClient]]:
    """The real app with its lifespan running, and an API client on it."""
    application = create_app(settings)
    async with application.router.lifespan_context(application), api_client(application) as http:
        yield application, http


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[Any]:
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
async def client(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(app) as http:
        yield http


@pytest.fixture
def twilio_emulator() -> Iterator[Any]:
    from emulators.twilio_rest import TwilioRestEmulator

    with TwilioRestEmulator(ACCOUNT_SID, AUTH_TOKEN) as emulator:
        yield emulator


def twilio_signature(url: str, params: dict[str, Any]) -> str:
    return str(RequestValidator(AUTH_TOKEN).compute_signature(url, params))


async def post_signed(
    http: httpx.AsyncClient, path: str, params: dict[str, str], *, token_ok: bool = True
) -> httpx.Response:
    """POST a form as Twilio does, signed over the public URL."""
    signature = twilio_signature(PUBLIC_BASE + path, params) if token_ok else "forged"
    return await http.post(path, data=params, headers={"X-Twilio-Signature": signature})


async def create_agent(http: httpx.AsyncClient, **fields: Any) -> dict[str, Any]:
    body = {"name": "Test agent", "first_message": "Hi {{name}}, this is Acme.", **fields}
    response = await http.post("/v1/agents", json=body)
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]
