"""Fetching an agent's image URL (DESIGN.md §5): public addresses only, with size and time limits.

The host is resolved once per hop and every address it resolves to is checked; the socket then
connects to a checked address (pinned), with the original Host header and the hostname for TLS
SNI and certificate checks, so a DNS answer that changes between the check and the connection
(rebinding) cannot reach an internal address. Redirects are followed by hand, each hop checked
the same way. One deadline covers the whole fetch: every socket operation may block only until
it. Hosts in `media_fetch_allowed_hosts` (`host` or `host:port`) skip the address check, for a
known internal store or a test server."""
from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import BinaryIO
from urllib.parse import quote, urljoin, urlsplit

from requests import certs

from shared.settings import Settings

MAX_REDIRECTS = 5
REDIRECTS = (301, 302, 303, 307, 308)
CHUNK = 64 * 1024
USER_AGENT = "OrderDesk-Media/1"
METADATA = frozenset(ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200"))
SHARED = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT, which is_private leaves out
NAT64 = ipaddress.ip_network("64:ff9b::/96")

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class FetchRefused(Exception):
    """The URL was not fetched, or not completely; the message says why, for the agent."""


@dataclass(frozen=True)
class Target:
    scheme: str
    host: str
    port: int
    path: str

    @classmethod
    def parse(cls, url: str) -> "Target":
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise FetchRefused(f"Only http and https URLs are fetched, not {_shown(url)}.")
        if parts.username is not None or parts.password is not None:
            raise FetchRefused("URLs with a user name or password are not fetched.")
        try:
            host = (parts.hostname or "").encode("idna").decode("ascii")
            port = parts.port or (443 if scheme == "https" else 80)
        except (UnicodeError, ValueError) as exc:
            raise FetchRefused(f"The URL {_shown(url)} is malformed ({exc}).") from exc
        if not host:
            raise FetchRefused(f"The URL {_shown(url)} has no host.")
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        # as a browser sends it: spaces and non-ASCII escaped, what is already escaped left alone
        return cls(scheme, host, port, quote(path, safe="/%:@!$&'()*+,;=?~"))

    @property
    def netloc(self) -> str:
        return f"{self._bracketed}:{self.port}"

    @property
    def host_header(self) -> str:
        return self._bracketed if self.port == (443 if self.scheme == "https" else 80) else self.netloc

    @property
    def _bracketed(self) -> str:
        return f"[{self.host}]" if ":" in self.host else self.host


def fetch_image(url: str, dest: BinaryIO, settings: Settings, resolve=socket.getaddrinfo) -> str:
    """Stream the body at `url` into `dest`; returns the URL it finally came from. After a
    FetchRefused, `dest` may hold part of a body: the caller discards it."""
    deadline = time.monotonic() + settings.media_fetch_timeout_seconds
    allowed = {h.lower() for h in settings.media_fetch_allowed_hosts}
    for _ in range(MAX_REDIRECTS + 1):
        target = Target.parse(url)
        addresses = _addresses(target, resolve)
        if target.host not in allowed and target.netloc not in allowed:
            _refuse_internal(target, addresses)
        sock, response = _connect(target, addresses, deadline), None
        try:
            response = _request(sock, target, deadline)
            location = response.getheader("Location")
            if response.status in REDIRECTS and location:
                url = urljoin(url, location)
                continue
            if not 200 <= response.status < 300:
                raise FetchRefused(f"The URL {_shown(url)} answered HTTP {response.status}.")
            _stream(sock, response, dest, settings.media_fetch_max_bytes, deadline, target)
            return url
        except (OSError, http.client.HTTPException) as exc:
            raise FetchRefused(_failure(target, exc)) from exc
        finally:
            if response is not None:
                response.close()
            sock.close()
    raise FetchRefused(f"The URL redirected more than {MAX_REDIRECTS} times.")


def _addresses(target: Target, resolve) -> list[Address]:
    try:
        return [ipaddress.ip_address(target.host)]
    except ValueError:
        pass
    try:
        infos = resolve(target.host, target.port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise FetchRefused(f"The host {target.host} could not be resolved ({exc}).") from exc
    addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos))
    if not addresses:
        raise FetchRefused(f"The host {target.host} has no address.")
    return addresses


def _refuse_internal(target: Target, addresses: list[Address]) -> None:
    """Refuse if any address is not public: a name with one private answer among public ones is
    one rebinding away from it."""
    for address in addresses:
        reason = not_public(address)
        if reason:
            where = f"is {reason}" if target.host == str(address) else f"resolves to {address}, {reason}"
            raise FetchRefused(f"The image URL was not fetched: {target.host} {where}; only public "
                               "addresses are fetched.")


def not_public(address: Address) -> str | None:
    """Why this address must not be fetched from, or None if it is public."""
    if address.version == 6:
        embedded = address.ipv4_mapped or address.sixtofour or (
            ipaddress.IPv4Address(int(address) & 0xFFFFFFFF) if address in NAT64 else None)
        if embedded is not None:
            return not_public(embedded)
    checks = (
        (address in METADATA, "a cloud metadata address"),
        (address.is_loopback, "a loopback address"),
        (address.is_link_local, "a link-local address"),
        (address.is_multicast, "a multicast address"),
        (address.is_unspecified, "an unspecified address"),
        (address.version == 4 and address in SHARED, "a shared (carrier-grade NAT) address"),
        (address.is_private, "a private address"),
        (address.is_reserved, "a reserved address"),
        (not address.is_global, "not a public address"),
    )
    return next((reason for refused, reason in checks if refused), None)


def _connect(target: Target, addresses: list[Address], deadline: float) -> socket.socket:
    """A socket to the first checked address that answers, TLS-wrapped for https."""
    failures = []
    for address in addresses:
        try:
            sock = socket.create_connection((str(address), target.port), timeout=_remaining(deadline, target))
        except OSError as exc:
            failures.append(f"{address}: {exc}")
            continue
        if target.scheme == "http":
            return sock
        try:
            sock.settimeout(_remaining(deadline, target))
            return _tls().wrap_socket(sock, server_hostname=target.host)
        except BaseException as exc:
            sock.close()
            if isinstance(exc, OSError):
                raise FetchRefused(_failure(target, exc)) from exc
            raise
    raise FetchRefused(f"Could not connect to {target.host} ({'; '.join(failures)[:500]}).")


@lru_cache(maxsize=1)
def _tls() -> ssl.SSLContext:
    """Certificates checked against the hostname, with the CA bundle requests uses elsewhere."""
    return ssl.create_default_context(cafile=certs.where())


def _request(sock: socket.socket, target: Target, deadline: float) -> http.client.HTTPResponse:
    connection = http.client.HTTPConnection(target.host, target.port)
    connection.sock = sock  # the pinned socket: http.client never resolves or connects itself
    sock.settimeout(_remaining(deadline, target))
    # identity: what arrives is what counts against the size cap, never a compressed bomb
    connection.request("GET", target.path, headers={
        "Host": target.host_header, "User-Agent": USER_AGENT, "Accept": "image/*",
        "Accept-Encoding": "identity", "Connection": "close"})
    sock.settimeout(_remaining(deadline, target))
    return connection.getresponse()


def _stream(sock: socket.socket, response: http.client.HTTPResponse, dest: BinaryIO, max_bytes: int,
            deadline: float, target: Target) -> None:
    length = response.getheader("Content-Length", "")
    if length.isdigit() and int(length) > max_bytes:
        raise FetchRefused(f"The image at {target.host} is {int(length):,} bytes; the limit is {max_bytes:,}.")
    received = 0
    while True:
        sock.settimeout(_remaining(deadline, target))  # a slow drip cannot outlast the deadline
        chunk = response.read1(CHUNK)
        if not chunk:
            return
        received += len(chunk)
        if received > max_bytes:
            raise FetchRefused(f"The image at {target.host} is larger than the limit of {max_bytes:,} bytes.")
        dest.write(chunk)


def _remaining(deadline: float, target: Target) -> float:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise FetchRefused(f"Fetching from {target.host} took longer than allowed.")
    return remaining


def _failure(target: Target, error: BaseException) -> str:
    if isinstance(error, ssl.SSLError):
        return f"The TLS connection to {target.host} failed ({error})."
    if isinstance(error, TimeoutError):
        return f"{target.host} did not answer in time."
    return f"The request to {target.host} failed ({error.__class__.__name__}: {error})."


def _shown(url: str) -> str:
    return repr(url[:200])
