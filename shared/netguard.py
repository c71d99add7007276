"""Outbound HTTP to addresses an agent chose (image URLs, webhook endpoints): public addresses only.

The host is resolved once and every address it resolves to is checked; the socket then connects
to a checked address (pinned), with the original Host header and the hostname for TLS SNI and
certificate checks, so a DNS answer that changes between the check and the connection
(rebinding) cannot reach an internal address. One deadline covers a whole exchange: every socket
operation may block only until it. Hosts on an allow list (`host` or `host:port`) skip the
address check, for a known internal service or a test server."""
from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import time
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import quote, urlsplit

from requests import certs

METADATA = frozenset(ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200"))
SHARED = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT, which is_private leaves out
NAT64 = ipaddress.ip_network("64:ff9b::/96")

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class Refused(Exception):
    """The request was not made, or not completely; the message says why, for the agent."""


class Unresolvable(Refused):
    """The host has no address now (DNS may answer later)."""


@dataclass(frozen=True)
class Target:
    scheme: str
    host: str
    port: int
    path: str

    @classmethod
    def parse(cls, url: str, schemes: tuple[str, ...] = ("http", "https")) -> "Target":
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in schemes:
            raise Refused(f"Only {' and '.join(schemes)} URLs are allowed, not {shown(url)}.")
        if parts.username is not None or parts.password is not None:
            raise Refused("URLs with a user name or password are not allowed.")
        try:
            host = (parts.hostname or "").encode("idna").decode("ascii")
            port = parts.port or (443 if scheme == "https" else 80)
        except (UnicodeError, ValueError) as exc:
            raise Refused(f"The URL {shown(url)} is malformed ({exc}).") from exc
        if not host:
            raise Refused(f"The URL {shown(url)} has no host.")
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

    def allowed_by(self, hosts) -> bool:
        """Is this target on an allow list of `host` / `host:port` entries?"""
        allowed = {h.lower() for h in hosts}
        return self.host in allowed or self.netloc in allowed


def addresses(target: Target, resolve=socket.getaddrinfo) -> list[Address]:
    try:
        return [ipaddress.ip_address(target.host)]
    except ValueError:
        pass
    try:
        infos = resolve(target.host, target.port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise Unresolvable(f"The host {target.host} could not be resolved ({exc}).") from exc
    found = list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos))
    if not found:
        raise Unresolvable(f"The host {target.host} has no address.")
    return found


def refuse_internal(target: Target, found: list[Address], what: str) -> None:
    """Refuse if any address is not public: a name with one private answer among public ones is
    one rebinding away from it. `what` starts the message (e.g. "The image URL was not fetched")."""
    for address in found:
        reason = not_public(address)
        if reason:
            where = f"is {reason}" if target.host == str(address) else f"resolves to {address}, {reason}"
            raise Refused(f"{what}: {target.host} {where}; only public addresses are allowed.")


def not_public(address: Address) -> str | None:
    """Why this address must not be called, or None if it is public."""
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


def connect(target: Target, found: list[Address], deadline: float) -> socket.socket:
    """A socket to the first checked address that answers, TLS-wrapped for https."""
    failures = []
    for address in found:
        try:
            sock = socket.create_connection((str(address), target.port), timeout=remaining(deadline, target))
        except OSError as exc:
            failures.append(f"{address}: {exc}")
            continue
        if target.scheme == "http":
            return sock
        try:
            sock.settimeout(remaining(deadline, target))
            return _tls().wrap_socket(sock, server_hostname=target.host)
        except BaseException as exc:
            sock.close()
            if isinstance(exc, OSError):
                raise Refused(failure(target, exc)) from exc
            raise
    raise Refused(f"Could not connect to {target.host} ({'; '.join(failures)[:500]}).")


@lru_cache(maxsize=1)
def _tls() -> ssl.SSLContext:
    """Certificates checked against the hostname, with the CA bundle requests uses elsewhere."""
    return ssl.create_default_context(cafile=certs.where())


def send(sock: socket.socket, target: Target, deadline: float, method: str, headers: dict,
         body: bytes | None = None) -> http.client.HTTPResponse:
    """One request on the pinned socket: http.client never resolves or connects itself."""
    connection = http.client.HTTPConnection(target.host, target.port)
    connection.sock = sock
    sock.settimeout(remaining(deadline, target))
    connection.request(method, target.path, body=body, headers={"Host": target.host_header, **headers})
    sock.settimeout(remaining(deadline, target))
    return connection.getresponse()


def remaining(deadline: float, target: Target) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise Refused(f"The request to {target.host} took longer than allowed.")
    return left


def failure(target: Target, error: BaseException) -> str:
    if isinstance(error, ssl.SSLError):
        return f"The TLS connection to {target.host} failed ({error})."
    if isinstance(error, TimeoutError):
        return f"{target.host} did not answer in time."
    return f"The request to {target.host} failed ({error.__class__.__name__}: {error})."


def shown(url: str) -> str:
    return repr(url[:200])
