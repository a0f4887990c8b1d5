"""Outbound URL safety: the one guard for every URL a customer configures (webhook
receivers, HTTP tools). It refuses loopback, private, link-local, unspecified and other
non-public addresses, so a configured URL cannot make the service call into its own network
(SSRF).

Policy (`is_public_address`):

- an address must be globally routable unicast (Python's `is_global`, not multicast);
- IPv6 forms that carry an IPv4 address are judged by that IPv4 address, because the
  kernel or a translator may deliver them to it: IPv4-compatible `::a.b.c.d` (`::/96`, which
  also holds `::` and `::1`), IPv4-mapped `::ffff:0:0/96`, SIIT `::ffff:0:0:0/96`, NAT64
  `64:ff9b::/96` and 6to4 `2002::/16`. Python calls most of these global.
- tunnels and prefixes no public receiver uses are refused whole: Teredo `2001::/32`,
  local-use NAT64 `64:ff9b:1::/48` and the deprecated site-local `fec0::/10`.

Three layers, because a hostname can resolve differently later (DNS rebinding):

- `check_public_url(url, allow_private)`: syntax only, no DNS. At API create and update.
- `PublicOnlyTransport`: an httpx transport that resolves the host at send time, refuses
  the request if any address is not public, and connects to the address it checked (the
  TLS name stays the original host through httpx's `sni_hostname` extension).
- `guarded_client`: the httpx client every outbound customer request uses: that transport
  and no redirect following (a 3xx is an answer; were redirects followed, each hop would
  pass the transport's check again).

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


_V6 = ipaddress.IPv6Network
_REFUSED_V6 = (_V6("2001::/32"), _V6("64:ff9b:1::/48"), _V6("fec0::/10"))
"""Teredo, local-use NAT64, site-local: refused whatever they carry."""
_LAST_32_BITS = (_V6("::/96"), _V6("::ffff:0:0/96"), _V6("::ffff:0:0:0/96"), _V6("64:ff9b::/96"))
"""IPv4-compatible, IPv4-mapped, SIIT and well-known NAT64: the IPv4 address is the low 32
bits."""
_6TO4 = _V6("2002::/16")  # the IPv4 address is bits 16-47


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 transition form carries, or None."""
    if any(ip in network for network in _LAST_32_BITS):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in _6TO4:
        return ipaddress.IPv4Address((int(ip) >> 80) & 0xFFFFFFFF)
    return None


def is_public_address(address: str) -> bool:
    """Whether `address` is globally routable unicast; IPv6 transition forms are judged by
    the IPv4 address they carry (see the module docstring)."""
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address):
        if any(ip in network for network in _REFUSED_V6):
            return False
        ip = embedded_ipv4(ip) or ip
    return ip.is_global and not ip.is_multicast and not ip.is_unspecified


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


def guarded_client(
    *,
    allow_private: bool,
    timeout: float = 10.0,
    inner: httpx.AsyncBaseTransport | None = None,
    resolve: Resolver = resolve_host,
) -> httpx.AsyncClient:
    """The httpx client for requests to customer URLs (webhooks, HTTP tools): every request
    checked and pinned by `PublicOnlyTransport`, redirects never followed."""
    transport = PublicOnlyTransport(inner, allow_private=allow_private, resolve=resolve)
    return httpx.AsyncClient(transport=transport, timeout=timeout, follow_redirects=False)
