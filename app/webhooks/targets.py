"""Where outbound webhooks may go: the target policy and an HTTP transport that enforces it.

Policy (`TargetPolicy`):

- Always: an absolute http(s) URL of at most 2048 characters, with a host and without
  credentials (user:password@). The unspecified (0.0.0.0, ::), multicast and cloud metadata
  addresses (169.254.169.254, 169.254.170.2, fd00:ec2::254, 100.100.100.200) are refused.
- Production: https only, no localhost / *.local / *.internal names, and only globally routable
  addresses: private, loopback, link-local, CGNAT, reserved, documentation ... are refused.
- Development: http and loopback / private addresses are allowed, so that a receiver on the same
  machine works.
- `allowed_networks` (CIDR) opens addresses that would otherwise be refused (metadata excepted).
- IPv4 embedded in IPv6 (IPv4-mapped, 6to4, NAT64 64:ff9b::/96) is judged as that IPv4 address.

The URL checks (`check_url`, `check_host`) give early feedback when an endpoint is saved. The
authoritative check is `SafeNetworkBackend`, at every connection: it resolves the name itself,
refuses if any address is refused, connects to the IP (TLS still verifies the hostname) and checks
the socket's peer address again, so a DNS answer that changes between check and connect (DNS
rebinding) gains nothing. A refusal reaches the httpx2 caller as `httpx2.ConnectError` carrying
the policy message; `is_refusal` tells it from an ordinary connection failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import anyio
import httpcore2
import httpx2

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], Awaitable[list[str]]]

MAX_URL_LENGTH = 2048
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in ("169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200")
)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_CGNAT = ipaddress.IPv4Network("100.64.0.0/10")
_LOCAL_SUFFIXES = (".localhost", ".local", ".internal")
_PRODUCTION_HINT = (
    "in production webhooks may only reach public addresses, unless the network is listed in "
    "TUNEGATE_WEBHOOKS__ALLOWED_NETWORKS"
)


class UnsafeTarget(Exception):
    """A webhook URL or address that policy refuses.

    str(exc) is safe to show to the API caller and to log: it names the host or address and the
    reason, never the URL's userinfo or query string.
    """


class _Refused(httpcore2.ConnectError):
    """A connection refused by policy; httpx2 maps it to `httpx2.ConnectError` (same message).

    A distinct class because httpcore2's pool re-raises connect errors `from None`, which drops
    the UnsafeTarget cause; httpx2 then chains its ConnectError to this exception.
    """


def _embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def _ip_literal(host: str) -> IPAddress | None:
    """The address when `host` is an IP literal, including legacy IPv4 forms (127.1, 0x7f.1)."""
    text = unquote(host).strip("[]")
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        pass
    # getaddrinfo reads these as IPv4 too (inet_aton); judge them as the address they mean.
    if text and all(c in "0123456789abcdefx." for c in text.lower()):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(text))
        except OSError:
            return None
    return None


def _kind(address: IPAddress) -> str:
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address"
    if address in _CGNAT:
        return "a shared (CGNAT) address"
    if address.is_private:
        return "a private address"
    if address.is_reserved:
        return "a reserved address"
    return "not a public address"


def _is_public(address: IPAddress) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.is_site_local:
        return False
    return address.is_global and not (
        address.is_private
        or address.is_reserved
        or address.is_loopback
        or address.is_link_local
        or address.is_multicast
    )


@dataclass(frozen=True)
class TargetPolicy:
    production: bool
    allowed_networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def of(cls, production: bool, allowed_networks: Iterable[str]) -> TargetPolicy:
        networks: list[IPNetwork] = []
        for text in allowed_networks:
            try:
                networks.append(ipaddress.ip_network(text.strip(), strict=False))
            except ValueError:
                raise ValueError(
                    f"{text!r} is not a network in CIDR notation (for example 10.20.0.0/16)"
                ) from None
        return cls(production=production, allowed_networks=tuple(networks))

    def check_url(self, url: str) -> None:
        """Refuse a URL by its syntax alone (no DNS); see the module docstring."""
        if len(url) > MAX_URL_LENGTH:
            raise UnsafeTarget(f"the URL is longer than {MAX_URL_LENGTH} characters")
        if any(c.isspace() or not c.isprintable() or c == "\\" for c in url):
            raise UnsafeTarget("the URL contains whitespace, control characters or backslashes")
        try:
            parsed = httpx2.URL(url)
            authority = urlsplit(url).netloc
        except (httpx2.InvalidURL, ValueError, TypeError):
            raise UnsafeTarget("the URL is not a valid URL") from None
        if parsed.scheme not in ("http", "https") or not parsed.is_absolute_url:
            raise UnsafeTarget("the URL must be an absolute http or https URL")
        host = parsed.raw_host.decode("ascii")
        if not host:
            raise UnsafeTarget("the URL has no host")
        if parsed.userinfo or "@" in authority:
            raise UnsafeTarget(
                f"the URL for {host} contains credentials (userinfo), which are not "
                "allowed: put credentials in the endpoint's signing secret (receivers verify the "
                "webhook signature), not the URL"
            )
        if parsed.port is not None and not 0 < parsed.port < 65536:
            raise UnsafeTarget(f"the URL for {host} has an invalid port")
        if self.production and parsed.scheme != "https":
            raise UnsafeTarget(f"{host}: webhook URLs must use https in production")
        literal = _ip_literal(host)
        if literal is not None:
            self.check_address(literal)
            return
        name = host.rstrip(".").lower()
        if self.production and (name == "localhost" or name.endswith(_LOCAL_SUFFIXES)):
            raise UnsafeTarget(
                f"{host} is a local name; webhook URLs in production need a public host"
            )

    def check_address(self, address: str | IPAddress) -> None:
        """Refuse an address the policy does not allow; see the module docstring."""
        refusal = self.refusal(address)
        if refusal is not None:
            raise UnsafeTarget(f"{refusal[0]} is {refusal[1]}")

    def refusal(self, address: str | IPAddress) -> tuple[str, str] | None:
        """(address as shown, reason) when the policy refuses `address`, else None."""
        if isinstance(address, str):
            parsed = _ip_literal(address)
            if parsed is None:
                return repr(address), "not an IP address"
            address = parsed
        if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
            address = ipaddress.IPv6Address(int(address))  # judge without the zone index
        embedded = _embedded_ipv4(address)
        judged = embedded or address
        shown = f"{address} (IPv4 {embedded})" if embedded else str(address)
        never = ", never allowed as a webhook target"
        if judged in METADATA_ADDRESSES:  # not even inside an allowed network
            return shown, "a cloud metadata address" + never
        if any(address in n or judged in n for n in self.allowed_networks):
            return None
        if judged.is_unspecified:
            return shown, "the unspecified address" + never
        if judged.is_multicast:
            return shown, "a multicast address" + never
        if self.production and not _is_public(judged):
            return shown, f"{_kind(judged)}; {_PRODUCTION_HINT}"
        return None

    async def check_host(self, url: str, *, resolver: Resolver | None = None) -> None:
        """`check_url`, then every address the host resolves to. A name that does not resolve
        passes (the receiver may not be deployed yet); delivery checks again at connect time."""
        self.check_url(url)
        parsed = httpx2.URL(url)
        host = parsed.raw_host.decode("ascii")
        if _ip_literal(host) is not None:
            return
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            addresses = await (resolver or system_resolver)(host, port)
        except OSError:
            return
        for address in addresses:
            refusal = self.refusal(address)
            if refusal is not None:
                raise UnsafeTarget(f"{host} resolves to {refusal[0]}, {refusal[1]}")


async def system_resolver(host: str, port: int) -> list[str]:
    """The host's addresses from the system resolver, unique, in the order given."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(sockaddr[0]) for *_, sockaddr in infos))


def peer_address(stream: httpcore2.AsyncNetworkStream) -> str | None:
    """The IP address a connected stream talks to, when the stream can tell."""
    address = stream.get_extra_info("server_addr")
    if address is None:
        sock = stream.get_extra_info("socket")
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                address = sock.getpeername()
    if isinstance(address, tuple) and address and isinstance(address[0], str):
        return address[0]
    return None


def check_peer(policy: TargetPolicy, stream: httpcore2.AsyncNetworkStream) -> None:
    """Raise `UnsafeTarget` when the stream's peer address is refused by `policy`. A stream that
    cannot tell its peer passes: it was opened to an address that was checked already."""
    address = peer_address(stream)
    if address is not None:
        policy.check_address(address)


def is_refusal(exc: BaseException) -> bool:
    """Whether an exception raised by an httpx2 client came from a policy refusal."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, UnsafeTarget | _Refused):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


class SafeNetworkBackend(httpcore2.AsyncNetworkBackend):
    """A network backend that connects only to addresses the policy allows (see module doc)."""

    def __init__(
        self,
        policy: TargetPolicy,
        resolver: Resolver | None = None,
        backend: httpcore2.AsyncNetworkBackend | None = None,
    ) -> None:
        self._policy = policy
        self._resolver = resolver or system_resolver
        self._backend = backend or httpcore2.AnyIOBackend()

    async def _resolve(self, host: str, port: int, seconds: float | None) -> list[str]:
        literal = _ip_literal(host)
        if literal is not None:
            return [str(literal)]
        try:
            with anyio.fail_after(seconds):
                addresses = await self._resolver(host, port)
        except TimeoutError:
            raise httpcore2.ConnectTimeout(f"resolving {host} timed out") from None
        except OSError as exc:
            raise httpcore2.ConnectError(f"could not resolve {host}: {exc}") from exc
        if not addresses:
            raise httpcore2.ConnectError(f"{host} has no addresses")
        return addresses

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore2's interface)
        local_address: str | None = None,
        socket_options: Iterable[httpcore2.SOCKET_OPTION] | None = None,
    ) -> httpcore2.AsyncNetworkStream:
        addresses = await self._resolve(host, port, timeout)
        for address in addresses:
            refusal = self._policy.refusal(address)
            if refusal is not None:
                shown, reason = refusal
                verb = "is" if _ip_literal(host) is not None else f"resolves to {shown},"
                unsafe = UnsafeTarget(f"{host} {verb} {reason}")
                raise _Refused(str(unsafe)) from unsafe
        failure: Exception | None = None
        for address in addresses:
            try:
                stream = await self._backend.connect_tcp(
                    address,
                    port,
                    timeout=timeout,
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except (OSError, httpcore2.ConnectError) as exc:
                failure = exc
                continue
            try:
                check_peer(self._policy, stream)
            except UnsafeTarget as exc:
                with contextlib.suppress(Exception):
                    await stream.aclose()
                unsafe = UnsafeTarget(f"{host}: the connected peer {exc}")
                raise _Refused(str(unsafe)) from unsafe
            return stream
        if isinstance(failure, httpcore2.ConnectError):
            raise failure
        raise httpcore2.ConnectError(f"could not connect to {host}: {failure}") from failure

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore2's interface)
        socket_options: Iterable[httpcore2.SOCKET_OPTION] | None = None,
    ) -> httpcore2.AsyncNetworkStream:
        unsafe = UnsafeTarget("unix socket webhook targets are not allowed")
        raise _Refused(str(unsafe)) from unsafe

    async def sleep(self, seconds: float) -> None:
        await self._backend.sleep(seconds)


def safe_transport(
    policy: TargetPolicy,
    *,
    resolver: Resolver | None = None,
    limits: httpx2.Limits | None = None,
) -> httpx2.AsyncHTTPTransport:
    """An httpx2 transport that connects only where `policy` allows. No proxies (an
    `AsyncClient` given a transport ignores proxy variables), no HTTP/2, no retries."""
    if limits is None:
        transport = httpx2.AsyncHTTPTransport(trust_env=False, http2=False, retries=0)
    else:
        transport = httpx2.AsyncHTTPTransport(
            trust_env=False, http2=False, retries=0, limits=limits
        )
    pool = transport._pool
    if not isinstance(pool, httpcore2.AsyncConnectionPool):  # pragma: no cover
        raise RuntimeError("httpx2.AsyncHTTPTransport no longer builds an AsyncConnectionPool")
    pool._network_backend = SafeNetworkBackend(policy, resolver, pool._network_backend)
    return transport
