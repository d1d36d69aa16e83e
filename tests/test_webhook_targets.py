"""Webhook target policy: address and URL rules, and the transport that enforces them at connect
time (DNS rebinding). Needs no database; the only network used is 127.0.0.1."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

import httpcore2
import httpx2
import pytest

from app.webhooks.targets import (
    SafeNetworkBackend,
    TargetPolicy,
    UnsafeTarget,
    check_peer,
    is_refusal,
    peer_address,
    safe_transport,
    system_resolver,
)

PRODUCTION = TargetPolicy.of(True, [])
DEVELOPMENT = TargetPolicy.of(False, [])


def fake_resolver(table: dict[str, list[str]]) -> Any:
    async def resolve(host: str, port: int) -> list[str]:
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return table[host]

    return resolve


# --- check_address ---------------------------------------------------------------------------

PRODUCTION_REFUSES = [
    "127.0.0.1",
    "::1",
    "10.0.0.1",
    "172.16.5.4",
    "192.168.1.1",
    "169.254.169.254",
    "169.254.170.2",
    "100.100.100.200",
    "fd00:ec2::254",
    "100.64.0.1",
    "fe80::1",
    "fc00::1",
    "::ffff:127.0.0.1",
    "::ffff:169.254.169.254",
    "2002:a00:1::1",  # 6to4 of 10.0.0.1
    "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
    "0.0.0.0",
    "::",
    "224.0.0.1",
    "192.0.2.1",  # documentation
    "2001:db8::1",
]
PRODUCTION_ALLOWS = ["8.8.8.8", "2001:4860:4860::8888", "::ffff:8.8.8.8", "64:ff9b::808:808"]
DEVELOPMENT_REFUSES = [
    "169.254.169.254",
    "fd00:ec2::254",
    "::ffff:169.254.169.254",
    "0.0.0.0",
    "::",
    "ff02::1",
]
DEVELOPMENT_ALLOWS = ["127.0.0.1", "::1", "10.0.0.1", "192.168.1.1", "fe80::1", "8.8.8.8"]


@pytest.mark.parametrize("address", PRODUCTION_REFUSES)
def test_production_refuses(address: str) -> None:
    with pytest.raises(UnsafeTarget) as caught:
        PRODUCTION.check_address(address)
    assert "never allowed" in str(caught.value) or "public addresses" in str(caught.value)


@pytest.mark.parametrize("address", PRODUCTION_ALLOWS)
def test_production_allows(address: str) -> None:
    PRODUCTION.check_address(address)


@pytest.mark.parametrize("address", DEVELOPMENT_REFUSES)
def test_development_refuses(address: str) -> None:
    with pytest.raises(UnsafeTarget, match="never allowed"):
        DEVELOPMENT.check_address(address)


@pytest.mark.parametrize("address", DEVELOPMENT_ALLOWS)
def test_development_allows(address: str) -> None:
    DEVELOPMENT.check_address(address)


def test_messages_name_address_and_reason() -> None:
    with pytest.raises(UnsafeTarget, match=r"^10\.0\.0\.1 is a private address"):
        PRODUCTION.check_address("10.0.0.1")
    with pytest.raises(UnsafeTarget, match=r"\(IPv4 127\.0\.0\.1\) is a loopback address"):
        PRODUCTION.check_address("::ffff:127.0.0.1")
    with pytest.raises(UnsafeTarget, match="cloud metadata"):
        DEVELOPMENT.check_address("169.254.169.254")
    with pytest.raises(UnsafeTarget, match="not an IP address"):
        PRODUCTION.check_address("example.com")


def test_allowed_networks_open_private_ranges() -> None:
    policy = TargetPolicy.of(True, ["10.1.0.0/16", " fd12::/16 "])
    policy.check_address("10.1.2.3")
    policy.check_address("::ffff:10.1.2.3")
    policy.check_address("fd12::1")
    with pytest.raises(UnsafeTarget):
        policy.check_address("10.2.0.1")
    with pytest.raises(UnsafeTarget):
        policy.check_address("127.0.0.1")


def test_of_rejects_a_bad_network() -> None:
    with pytest.raises(ValueError, match=r"'10\.0\.0\.0/33' is not a network in CIDR"):
        TargetPolicy.of(True, ["10.0.0.0/33"])


# --- check_url -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://example.com", "must use https"),
        ("https://localhost/x", "local name"),
        ("https://LOCALHOST./x", "local name"),
        ("https://hooks.localhost/x", "local name"),
        ("https://printer.local/x", "local name"),
        ("https://metadata.google.internal/x", "local name"),
        ("ftp://x", "absolute http or https"),
        ("hooks.example/x", "absolute http or https"),
        ("https:///x", "absolute http or https"),
        ("https://127.0.0.1/x", "loopback"),
        ("https://127.1/x", "loopback"),  # legacy IPv4 form, as getaddrinfo reads it
        ("https://[::ffff:127.0.0.1]/x", "loopback"),
        ("https://169.254.169.254/latest/meta-data", "metadata"),
        ("https://example.com/" + "a" * 2048, "longer than 2048"),
        ("https://exa mple.com/", "whitespace"),
        ("https://example.com:99999/", "invalid port"),
    ],
)
def test_production_refuses_url(url: str, reason: str) -> None:
    with pytest.raises(UnsafeTarget, match=reason):
        PRODUCTION.check_url(url)


@pytest.mark.parametrize("policy", [PRODUCTION, DEVELOPMENT])
def test_credentials_in_url_are_refused_without_echoing_them(policy: TargetPolicy) -> None:
    with pytest.raises(UnsafeTarget) as caught:
        policy.check_url("https://alice:pw@example.com/hook?token=sekrit")
    message = str(caught.value)
    assert "credentials" in message and "not the URL" in message
    assert "example.com" in message
    assert "pw" not in message and "alice" not in message and "sekrit" not in message


def test_url_messages_never_contain_the_query() -> None:
    for url in ("http://example.com/?token=sekrit", "https://10.0.0.1/?token=sekrit"):
        with pytest.raises(UnsafeTarget) as caught:
            PRODUCTION.check_url(url)
        assert "sekrit" not in str(caught.value)


@pytest.mark.parametrize(
    "url", ["https://example.com/hook?x=1", "https://8.8.8.8/", "https://[2001:4860::8888]:8443/"]
)
def test_production_allows_url(url: str) -> None:
    PRODUCTION.check_url(url)


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8080/hook", "http://localhost:8080/hook", "http://10.0.0.7/"]
)
def test_development_allows_url(url: str) -> None:
    DEVELOPMENT.check_url(url)


def test_development_still_refuses_metadata_url() -> None:
    with pytest.raises(UnsafeTarget, match="metadata"):
        DEVELOPMENT.check_url("http://169.254.169.254/latest/meta-data")


# --- check_host ------------------------------------------------------------------------------


async def test_check_host_refuses_a_name_resolving_to_a_private_address() -> None:
    resolver = fake_resolver({"rebind.example": ["10.0.0.5"]})
    with pytest.raises(UnsafeTarget, match=r"rebind\.example resolves to 10\.0\.0\.5, a private"):
        await PRODUCTION.check_host("https://rebind.example/hook", resolver=resolver)
    await DEVELOPMENT.check_host("https://rebind.example/hook", resolver=resolver)


async def test_check_host_refuses_if_any_address_is_refused() -> None:
    resolver = fake_resolver({"mixed.example": ["8.8.8.8", "127.0.0.1"]})
    with pytest.raises(UnsafeTarget, match=r"resolves to 127\.0\.0\.1, a loopback"):
        await PRODUCTION.check_host("https://mixed.example/", resolver=resolver)


async def test_check_host_passes_public_and_unresolvable_names() -> None:
    resolver = fake_resolver({"public.example": ["8.8.8.8", "2001:4860:4860::8888"]})
    await PRODUCTION.check_host("https://public.example/", resolver=resolver)
    await PRODUCTION.check_host("https://not-deployed-yet.example/", resolver=resolver)


async def test_check_host_checks_the_url_first() -> None:
    calls: list[str] = []

    async def resolver(host: str, port: int) -> list[str]:
        calls.append(host)
        return ["8.8.8.8"]

    with pytest.raises(UnsafeTarget, match="https"):
        await PRODUCTION.check_host("http://public.example/", resolver=resolver)
    await PRODUCTION.check_host("https://8.8.8.8/", resolver=resolver)
    assert calls == []


async def test_system_resolver_returns_ip_strings() -> None:
    assert await system_resolver("127.0.0.1", 80) == ["127.0.0.1"]


# --- the transport, end to end against a server on 127.0.0.1 ---------------------------------


@dataclass
class Server:
    port: int
    connections: int = 0
    hosts: list[str] = field(default_factory=list)


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    state = Server(port=0)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state.connections += 1
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.decode("latin-1").split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.lower() == "host":
                    state.hosts.append(value.strip())
                if name.lower() == "content-length":
                    length = int(value)
            await reader.readexactly(length)
            writer.write(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    listener = await asyncio.start_server(handle, "127.0.0.1", 0)
    state.port = listener.sockets[0].getsockname()[1]
    async with listener:
        yield state


REBIND = fake_resolver({"hooks.example": ["127.0.0.1"]})


async def test_production_refuses_a_name_resolving_to_loopback_before_connecting(
    server: Server,
) -> None:
    transport = safe_transport(PRODUCTION, resolver=REBIND)
    async with httpx2.AsyncClient(transport=transport) as client:
        with pytest.raises(httpx2.ConnectError) as caught:
            await client.post(f"http://hooks.example:{server.port}/", json={"a": 1})
    assert is_refusal(caught.value)
    assert "hooks.example resolves to 127.0.0.1, a loopback address" in str(caught.value)
    assert server.connections == 0


async def test_production_refuses_an_ip_literal_url(server: Server) -> None:
    async with httpx2.AsyncClient(transport=safe_transport(PRODUCTION)) as client:
        with pytest.raises(httpx2.ConnectError) as caught:
            await client.get(f"http://127.0.0.1:{server.port}/")
    assert is_refusal(caught.value)
    assert str(caught.value).startswith("127.0.0.1 is a loopback address")
    assert server.connections == 0


async def test_allowed_network_lets_the_delivery_through(server: Server) -> None:
    policy = TargetPolicy.of(True, ["127.0.0.0/8"])
    async with httpx2.AsyncClient(transport=safe_transport(policy, resolver=REBIND)) as client:
        response = await client.post(f"http://hooks.example:{server.port}/", json={"a": 1})
    assert response.status_code == 204
    assert server.hosts == [f"hooks.example:{server.port}"]


async def test_development_reaches_loopback(server: Server) -> None:
    transport = safe_transport(DEVELOPMENT, resolver=REBIND, limits=httpx2.Limits())
    async with httpx2.AsyncClient(transport=transport) as client:
        response = await client.post(f"http://hooks.example:{server.port}/", content=b"{}")
        again = await client.post(f"http://hooks.example:{server.port}/", content=b"{}")
    assert (response.status_code, again.status_code) == (204, 204)
    assert server.connections >= 1


async def test_an_ordinary_connection_failure_is_not_a_refusal() -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with httpx2.AsyncClient(transport=safe_transport(DEVELOPMENT)) as client:
        with pytest.raises(httpx2.ConnectError) as caught:
            await client.get(f"http://127.0.0.1:{port}/")
    assert not is_refusal(caught.value)


async def test_an_unresolvable_name_is_a_connect_error_not_a_refusal() -> None:
    async with httpx2.AsyncClient(transport=safe_transport(DEVELOPMENT, resolver=REBIND)) as c:
        with pytest.raises(httpx2.ConnectError) as caught:
            await c.get("http://nowhere.example/")
    assert not is_refusal(caught.value)
    assert "could not resolve nowhere.example" in str(caught.value)


# --- SafeNetworkBackend with a fake inner backend --------------------------------------------


class FakeStream(httpcore2.AsyncNetworkStream):
    def __init__(self, extra: dict[str, Any]) -> None:
        self.extra = extra
        self.closed = False

    async def aclose(self) -> None:
        self.closed = True

    def get_extra_info(self, info: str) -> Any:
        return self.extra.get(info)

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore2.AsyncNetworkStream:
        return self


class FakeBackend(httpcore2.AsyncNetworkBackend):
    """Records where it was asked to connect; `peers` says which peer each stream reports."""

    def __init__(self, peers: dict[str, str], refuse: Iterable[str] = ()) -> None:
        self.peers = peers
        self.refuse = set(refuse)
        self.calls: list[str] = []
        self.streams: list[FakeStream] = []

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore2.SOCKET_OPTION] | None = None,
    ) -> httpcore2.AsyncNetworkStream:
        self.calls.append(host)
        if host in self.refuse:
            raise httpcore2.ConnectError("[Errno 111] Connection refused")
        stream = FakeStream({"server_addr": (self.peers.get(host, host), port)})
        self.streams.append(stream)
        return stream

    async def sleep(self, seconds: float) -> None:
        return None


async def test_backend_connects_to_the_ip_not_the_name() -> None:
    inner = FakeBackend({})
    resolver = fake_resolver({"public.example": ["8.8.8.8"]})
    backend = SafeNetworkBackend(PRODUCTION, resolver, inner)
    await backend.connect_tcp("public.example", 443)
    assert inner.calls == ["8.8.8.8"]


async def test_backend_refuses_when_any_address_is_refused_without_connecting() -> None:
    inner = FakeBackend({})
    resolver = fake_resolver({"mixed.example": ["8.8.8.8", "10.0.0.1"]})
    backend = SafeNetworkBackend(PRODUCTION, resolver, inner)
    with pytest.raises(httpcore2.ConnectError) as caught:
        await backend.connect_tcp("mixed.example", 443)
    assert is_refusal(caught.value)
    assert inner.calls == []


async def test_backend_tries_the_next_address() -> None:
    inner = FakeBackend({}, refuse=["8.8.8.8"])
    resolver = fake_resolver({"two.example": ["8.8.8.8", "8.8.4.4"]})
    backend = SafeNetworkBackend(PRODUCTION, resolver, inner)
    await backend.connect_tcp("two.example", 443)
    assert inner.calls == ["8.8.8.8", "8.8.4.4"]

    inner = FakeBackend({}, refuse=["8.8.8.8", "8.8.4.4"])
    backend = SafeNetworkBackend(PRODUCTION, resolver, inner)
    with pytest.raises(httpcore2.ConnectError) as caught:
        await backend.connect_tcp("two.example", 443)
    assert not is_refusal(caught.value)


async def test_backend_rechecks_the_peer_and_closes_the_stream() -> None:
    # The inner backend ends up talking to a private address although a public one was dialled.
    inner = FakeBackend({"8.8.8.8": "10.0.0.9"})
    resolver = fake_resolver({"public.example": ["8.8.8.8"]})
    backend = SafeNetworkBackend(PRODUCTION, resolver, inner)
    with pytest.raises(
        httpcore2.ConnectError, match=r"connected peer 10\.0\.0\.9 is a private"
    ) as caught:
        await backend.connect_tcp("public.example", 443)
    assert is_refusal(caught.value)
    assert inner.streams[0].closed


async def test_backend_refuses_unix_sockets() -> None:
    backend = SafeNetworkBackend(DEVELOPMENT, backend=FakeBackend({}))
    with pytest.raises(httpcore2.ConnectError) as caught:
        await backend.connect_unix_socket("/run/docker.sock")
    assert is_refusal(caught.value)
    await backend.sleep(0)


def test_check_peer_uses_server_addr_or_the_raw_socket() -> None:
    check_peer(PRODUCTION, FakeStream({"server_addr": ("8.8.8.8", 443)}))
    with pytest.raises(UnsafeTarget, match="loopback"):
        check_peer(PRODUCTION, FakeStream({"server_addr": ("::1", 443, 0, 0)}))
    check_peer(PRODUCTION, FakeStream({}))  # a stream that cannot tell: the dialled IP stands

    with socket.socket() as listener, socket.socket() as client:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client.connect(listener.getsockname())
        stream = FakeStream({"socket": client})
        assert peer_address(stream) == "127.0.0.1"
        with pytest.raises(UnsafeTarget, match="loopback"):
            check_peer(PRODUCTION, stream)
        check_peer(DEVELOPMENT, stream)


def test_is_refusal_walks_the_chain() -> None:
    try:
        try:
            raise UnsafeTarget("10.0.0.1 is a private address")
        except UnsafeTarget as exc:
            raise httpx2.ConnectError("wrapped") from exc
    except httpx2.ConnectError as outer:
        assert is_refusal(outer)
    assert not is_refusal(httpx2.ConnectError("[Errno 111] Connection refused"))
