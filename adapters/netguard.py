"""Outbound URL safety: refuse receivers on loopback, private, link-local and other
non-public addresses, so a configured URL cannot make the service call into its own network
(SSRF). Shared by webhook delivery and custom HTTP tools.

Two layers, because a hostname can resolve differently later (DNS rebinding):

- `check_public_url(url, allow_private)`: syntax only, no DNS. For API validation.
- `PublicOnlyTransport`: an httpx transport that resolves the host at send time, refuses
  the request if any address is not public, and connects to the address it checked (the
  TLS name stays the original host through httpx's `sni_hostname` extension).

Must not import: fastapi, starlette, uvicorn, sqlalchemy, chromadb, api, store, knowledge,
tools, postcall, voice_pipeline, models.
Of ours, imports only: nothing.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import httpx

Resolver = Callable[[str, int], Awaitable[list[str]]]
"""(host, port) -> IP address strings."""

_BLOCKED_SUFFIXES = (".localhost", ".local", ".internal")


class UnsafeURLError(ValueError):
    """The URL points at a non-public address (or is not an http(s) URL)."""


def is_public_address(address: str) -> bool:
    """Whether `address` is globally routable unicast. IPv4-mapped IPv6 is judged by its
    IPv4 part."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def _literal_ip(host: str) -> str | None:
    """The address a literal host denotes, including legacy IPv4 forms ("127.1",
    "2130706433", "0x7f.0.0.1") that resolvers accept; None for a hostname."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        return socket.inet_ntoa(socket.inet_aton(host))
    except OSError:
        return None


def check_public_url(url: str, allow_private: bool) -> None:
    """Raise UnsafeURLError (a ValueError) unless `url` is http(s) with a host that is not
    obviously internal. Does no DNS: delivery time checks the resolved addresses again."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UnsafeURLError("must be an http(s) URL with a host")
    if allow_private:
        return
    host = parts.hostname.rstrip(".").lower()
    if host == "localhost" or host.endswith(_BLOCKED_SUFFIXES):
        raise UnsafeURLError(f"{host} is a local host name; private URLs are not allowed")
    address = _literal_ip(host)
    if address is not None and not is_public_address(address):
        raise UnsafeURLError(f"{address} is not a public address; private URLs are not allowed")


async def resolve_host(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


async def public_address(host: str, port: int, resolve: Resolver = resolve_host) -> str:
    """The address to connect to for `host`, once every address it resolves to is public."""
    try:
        addresses = await resolve(host, port)
    except OSError as exc:
        raise httpx.ConnectError(f"cannot resolve {host}: {exc}") from exc
    if not addresses:
        raise httpx.ConnectError(f"cannot resolve {host}")
    private = [a for a in addresses if not is_public_address(a)]
    if private:
        raise UnsafeURLError(f"{host} resolves to non-public address {private[0]}")
    return addresses[0]


class PublicOnlyTransport(httpx.AsyncBaseTransport):
    """Wraps an httpx transport; with `allow_private` False every request is checked and
    pinned to the public address it resolved to. Raises UnsafeURLError before connecting."""

    def __init__(
        self,
        inner: httpx.AsyncBaseTransport | None = None,
        *,
        allow_private: bool = False,
        resolve: Resolver = resolve_host,
    ) -> None:
        self.inner = inner or httpx.AsyncHTTPTransport()
        self.allow_private = allow_private
        self.resolve = resolve

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if not self.allow_private:
            await self._pin(request)
        return await self.inner.handle_async_request(request)

    async def _pin(self, request: httpx.Request) -> None:
        url = request.url
        check_public_url(str(url), allow_private=False)
        port = url.port or (443 if url.scheme == "https" else 80)
        address = await public_address(url.host, port, self.resolve)
        # The Host header was set from the original URL when the request was built.
        request.extensions = {**request.extensions, "sni_hostname": url.host}
        request.url = url.copy_with(host=address)

    async def aclose(self) -> None:
        await self.inner.aclose()
