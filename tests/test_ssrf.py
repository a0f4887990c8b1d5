"""SSRF: every outbound customer URL (webhook receivers, HTTP tools, redirects) passes one
guard (`adapters.netguard`) at agent create, at update and at send. The address forms below
reach loopback or private IPv4 although Python's `ipaddress` calls most of them global."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from adapters.netguard import UnsafeURLError, guarded_client, is_public_address
from models import Agent
from tests.conftest import create_agent, make_settings, running_app
from tests.post_call_support import FAST, CallDriver, WebhookReceiver, eventually
from tests.test_tools import Env, _http_tool
from tests.tool_server import ToolServer

REFUSED = [
    "127.0.0.1",
    "10.1.2.3",
    "169.254.169.254",
    "100.64.0.1",
    "0.0.0.0",
    "::",
    "::1",
    "::127.0.0.1",  # IPv4-compatible
    "::a9fe:a9fe",  # IPv4-compatible 169.254.169.254
    "::ffff:127.0.0.1",  # IPv4-mapped
    "::ffff:0:7f00:1",  # SIIT (IPv4-translated)
    "::ffff:0:a00:1",  # SIIT 10.0.0.1
    "64:ff9b::7f00:1",  # NAT64 well-known prefix
    "64:ff9b::a9fe:a9fe",
    "64:ff9b:1::808:808",  # local-use NAT64, refused whole
    "2002:7f00:1::1",  # 6to4 of 127.0.0.1
    "2002:a9fe:a9fe::",  # 6to4 of 169.254.169.254
    "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # Teredo
    "2001::1",
    "fec0::1",  # site-local
    "fe80::1",
    "fc00::1",
    "ff02::1",
]
ALLOWED = ["8.8.8.8", "2606:4700:4700::1111", "64:ff9b::808:808", "2002:808:808::1"]


def _url(address: str, path: str = "/hook") -> str:
    host = f"[{address}]" if ":" in address else address
    return f"http://{host}:8080{path}"


def test_the_policy_refuses_every_form_that_reaches_a_private_address() -> None:
    assert [a for a in REFUSED if is_public_address(a)] == []
    assert all(is_public_address(a) for a in ALLOWED)


async def test_every_form_is_refused_at_create_and_at_update(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, ALLOW_PRIVATE_URLS=False)
    async with running_app(settings) as (_app, client):
        agent = await create_agent(client, webhook_url="https://hooks.example.com/h")
        for address in REFUSED:
            hook = {"webhook_url": _url(address)}
            tools = {"tools": [{"type": "end_call"}, _http_tool(_url(address, "/orders"))]}
            attempts = {
                "webhook_url": [
                    await client.post("/v1/agents", json={"name": "A", **hook}),
                    await client.patch(f"/v1/agents/{agent['id']}", json=hook),
                ],
                "tools.1.url": [
                    await client.post("/v1/agents", json={"name": "A", **tools}),
                    await client.patch(f"/v1/agents/{agent['id']}", json=tools),
                ],
            }
            for field, responses in attempts.items():
                for response in responses:
                    assert response.status_code == 422, (address, response.text)
                    error = response.json()["error"]
                    assert error["field"] == field and "not allowed" in error["message"], error
        unchanged = (await client.get(f"/v1/agents/{agent['id']}")).json()
        public = await client.post(
            "/v1/agents",
            json={"name": "P", "tools": [_http_tool("https://[2606:4700:4700::1111]/x")]},
        )
    assert unchanged["webhook_url"] == "https://hooks.example.com/h" and unchanged["tools"] == []
    assert public.status_code == 201, public.text


async def test_a_stored_private_tool_url_is_refused_at_send(tmp_path: Path) -> None:
    """A row written before the guard (or by hand) still cannot reach the network."""
    with ToolServer() as server:
        async with running_app(make_settings(tmp_path, ALLOW_PRIVATE_URLS=False)) as (app, http):
            env = Env(app, http)
            agent = await env.agent()
            forms = ["127.0.0.1", "::ffff:127.0.0.1", "::127.0.0.1", "64:ff9b::7f00:1"]
            for address in forms:
                url = _url(address, "/x").replace(":8080", f":{server.port}")
                async with app.state.db.sessionmaker() as session, session.begin():
                    await session.execute(
                        update(Agent).where(Agent.id == agent["id"]).values(tools=[_http_tool(url)])
                    )
                outcome = await env.run(await env.call(agent), "lookup_order", order_id=address)
                assert "URL was refused" in outcome.result["error"], (address, outcome.result)
        assert server.requests == []


async def test_a_private_webhook_receiver_in_an_ipv6_form_is_refused_at_delivery(
    tmp_path: Path,
) -> None:
    with WebhookReceiver() as receiver:
        url = f"http://[::ffff:127.0.0.1]:{receiver.port}/hook"
        settings = make_settings(
            tmp_path, ALLOW_PRIVATE_URLS=False, DEFAULT_WEBHOOK_URL=url, **FAST
        )
        async with running_app(settings) as (app, client):
            await create_agent(client, phone_number="+14155550100")
            call = CallDriver(app, client)
            await call.ring()
            await call.answer()
            await call.hang_up()

            async def settled() -> list[dict[str, Any]] | None:
                rows = (await client.get("/v1/webhook-deliveries")).json()["items"]
                done = rows and all(r["status"] in ("failed", "delivered") for r in rows)
                return rows if done else None

            rows = await eventually(settled)
    assert receiver.received == []
    assert {r["status"] for r in rows} == {"failed"}
    assert all(r["last_error"].startswith("refused") for r in rows), rows


@pytest.mark.parametrize("address", REFUSED)
async def test_a_name_resolving_to_any_form_is_refused_at_send(address: str) -> None:
    """DNS can answer with any of the forms: the transport checks what it resolved."""
    sent: list[httpx.Request] = []

    def network(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200)

    async def resolve(host: str, port: int) -> list[str]:
        return [address]

    async with guarded_client(
        allow_private=False, inner=httpx.MockTransport(network), resolve=resolve
    ) as http:
        with pytest.raises(UnsafeURLError):
            await http.post("https://hooks.example.test/hook", content=b"{}")
    assert sent == []


async def test_redirects_are_not_followed_and_each_hop_is_checked() -> None:
    sent: list[str] = []

    def network(request: httpx.Request) -> httpx.Response:
        sent.append(str(request.url))
        return httpx.Response(302, headers={"Location": "http://internal.example.test/admin"})

    answers = {"hooks.example.test": ["93.184.216.34"], "internal.example.test": ["10.0.0.7"]}

    async def resolve(host: str, port: int) -> list[str]:
        return answers[host]

    async with guarded_client(
        allow_private=False, inner=httpx.MockTransport(network), resolve=resolve
    ) as http:
        response = await http.get("https://hooks.example.test/hook")
        assert response.status_code == 302  # an answer, not followed
        with pytest.raises(UnsafeURLError):  # followed on request: the next hop is checked
            await http.get("https://hooks.example.test/hook", follow_redirects=True)
    assert sent == ["https://93.184.216.34/hook"] * 2
