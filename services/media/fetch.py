"""Fetching an agent's image URL (DESIGN.md §5): public addresses only, with size and time limits.

The host is resolved once per hop and every address it resolves to is checked; the connection
then goes to a checked address (pinned), with the original Host header and the hostname for TLS
SNI and certificate checks, so a DNS answer that changes between the check and the connection
(rebinding) cannot reach an internal address. Redirects are followed by hand, each hop checked
the same way. Hosts in `media_fetch_allowed_hosts` (`host` or `host:port`) skip the address
check, for a known internal store or a test server."""
from __future__ import annotations

import ipaddress
import socket
import time
from dataclasses import dataclass
from http.client import HTTPException
from typing import BinaryIO
from urllib.parse import urljoin, urlsplit

import certifi
import urllib3
from urllib3.exceptions import HTTPError, MaxRetryError, NewConnectionError, SSLError, TimeoutError

from shared.settings import Settings

MAX_REDIRECTS = 5
REDIRECTS = (301, 302, 303, 307, 308)
CHUNK = 64 * 1024
USER_AGENT = "OrderDesk-Media/1"
METADATA = frozenset(ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200"))
SHARED = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT, not covered by is_private
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
            raise FetchRefused(f"Only http and https URLs are fetched, not {url[:200]!r}.")
        if parts.username is not None or parts.password is not None:
            raise FetchRefused("URLs with a user name or password are not fetched.")
        try:
            host = (parts.hostname or "").encode("idna").decode("ascii")
            port = parts.port or (443 if scheme == "https" else 80)
        except (UnicodeError, ValueError) as exc:
            raise FetchRefused(f"The URL {url[:200]!r} is malformed ({exc}).") from exc
        if not host:
            raise FetchRefused(f"The URL {url[:200]!r} has no host.")
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return cls(scheme, host, port, path)

    @property
    def netloc(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        if self.port != default:
            return self.netloc
        return f"[{self.host}]" if ":" in self.host else self.host


def fetch_image(url: str, dest: BinaryIO, settings: Settings, resolve=socket.getaddrinfo) -> str:
    """Stream the body at `url` into `dest`; returns the URL it finally came from. On
    FetchRefused, `dest` may hold part of the body: the caller discards it."""
    deadline = time.monotonic() + settings.media_fetch_timeout_seconds
    allowed = {h.lower() for h in settings.media_fetch_allowed_hosts}
    for _ in range(MAX_REDIRECTS + 1):
        target = Target.parse(url)
        addresses = _addresses(target, resolve)
        if target.host not in allowed and target.netloc not in allowed:
            _refuse_internal(target, addresses)
        pool, response = _open(target, addresses, deadline)
        try:
            location = response.headers.get("Location")
            if response.status in REDIRECTS and location:
                url = urljoin(url, location)
                continue
            if not 200 <= response.status < 300:
                raise FetchRefused(f"{_shown(url)} answered HTTP {response.status}.")
            _stream(response, dest, settings.media_fetch_max_bytes, deadline, url)
            return url
        finally:
            response.close()
            pool.close()
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


def _open(target: Target, addresses: list[Address], deadline: float):
    """Connect to the first checked address that answers and send the request."""
    failures = []
    for address in addresses:
        remaining = _remaining(deadline, target)
        pool = _pool(target, address)
        try:
            response = pool.urlopen(
                "GET", target.path, headers=_headers(target), redirect=False, retries=False,
                preload_content=False, decode_content=False, assert_same_host=False,
                timeout=urllib3.Timeout(connect=remaining, read=remaining))
            return pool, response
        except MaxRetryError as exc:  # urllib3 wraps some errors even without retries
            error = exc.reason or exc
        except (HTTPError, HTTPException, OSError, ValueError) as exc:
            error = exc
        pool.close()
        if isinstance(error, NewConnectionError) or (
                isinstance(error, TimeoutError) and "connect" in str(error).lower()):
            failures.append(f"{address}: {error}")
            continue
        raise FetchRefused(_failure(target, error)) from error
    raise FetchRefused(f"Could not connect to {target.host} ({'; '.join(failures)[:500]}).")


def _failure(target: Target, error: BaseException) -> str:
    if isinstance(error, SSLError):
        return f"The TLS connection to {target.host} failed ({error})."
    if isinstance(error, TimeoutError):
        return f"{target.host} did not answer in time."
    return f"The request to {target.host} failed ({error.__class__.__name__}: {error})."


def _pool(target: Target, address: Address) -> urllib3.HTTPConnectionPool:
    if target.scheme == "https":
        return urllib3.HTTPSConnectionPool(
            str(address), target.port, maxsize=1, server_hostname=target.host, assert_hostname=target.host,
            cert_reqs="CERT_REQUIRED", ca_certs=certifi.where())
    return urllib3.HTTPConnectionPool(str(address), target.port, maxsize=1)


def _headers(target: Target) -> dict:
    # identity: what arrives is what is counted against the size cap, never a compressed bomb
    return {"Host": target.host_header, "User-Agent": USER_AGENT, "Accept": "image/*",
            "Accept-Encoding": "identity"}


def _stream(response, dest: BinaryIO, max_bytes: int, deadline: float, url: str) -> None:
    length = response.headers.get("Content-Length", "")
    if length.isdigit() and int(length) > max_bytes:
        raise FetchRefused(f"{_shown(url)} is {int(length):,} bytes; the limit is {max_bytes:,}.")
    received = 0
    target = Target.parse(url)
    try:
        while True:
            # each read may block at most until the overall deadline
            response.connection.sock.settimeout(_remaining(deadline, target))
            chunk = response.read1(CHUNK)
            if not chunk:
                return
            received += len(chunk)
            if received > max_bytes:
                raise FetchRefused(f"{_shown(url)} sent more than the limit of {max_bytes:,} bytes.")
            dest.write(chunk)
    except (HTTPError, HTTPException, OSError) as exc:
        raise FetchRefused(_failure(target, exc)) from exc


def _remaining(deadline: float, target: Target) -> float:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise FetchRefused(f"Fetching from {target.host} took longer than allowed.")
    return remaining


def _shown(url: str) -> str:
    return f"The URL {url[:200]}"
