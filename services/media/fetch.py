"""Fetching an agent's image URL (DESIGN.md §5): public addresses only, with size and time limits.

Each hop goes through shared/netguard.py: the host is resolved once, every address is checked,
and the socket connects to a checked address (pinned), so DNS rebinding cannot reach an internal
address. Redirects are followed by hand, each hop checked the same way. One deadline covers the
whole fetch. Hosts in `media_fetch_allowed_hosts` (`host` or `host:port`) skip the address check,
for a known internal store or a test server."""
from __future__ import annotations

import http.client
import socket
import time
from typing import BinaryIO
from urllib.parse import urljoin

from shared import netguard
from shared.settings import Settings

MAX_REDIRECTS = 5
REDIRECTS = (301, 302, 303, 307, 308)
CHUNK = 64 * 1024
USER_AGENT = "OrderDesk-Media/1"


class FetchRefused(netguard.Refused):
    """The URL was not fetched, or not completely; the message says why, for the agent."""


def fetch_image(url: str, dest: BinaryIO, settings: Settings, resolve=socket.getaddrinfo) -> str:
    """Stream the body at `url` into `dest`; returns the URL it finally came from. After a
    FetchRefused, `dest` may hold part of a body: the caller discards it."""
    try:
        return _fetch(url, dest, settings, resolve)
    except FetchRefused:
        raise
    except netguard.Refused as exc:
        raise FetchRefused(str(exc)) from exc


def _fetch(url: str, dest: BinaryIO, settings: Settings, resolve) -> str:
    deadline = time.monotonic() + settings.media_fetch_timeout_seconds
    for _ in range(MAX_REDIRECTS + 1):
        target = netguard.Target.parse(url)
        addresses = netguard.addresses(target, resolve)
        if not target.allowed_by(settings.media_fetch_allowed_hosts):
            netguard.refuse_internal(target, addresses, "The image URL was not fetched")
        sock, response = netguard.connect(target, addresses, deadline), None
        try:
            # identity: what arrives is what counts against the size cap, never a compressed bomb
            response = netguard.send(sock, target, deadline, "GET", {
                "User-Agent": USER_AGENT, "Accept": "image/*", "Accept-Encoding": "identity",
                "Connection": "close"})
            location = response.getheader("Location")
            if response.status in REDIRECTS and location:
                url = urljoin(url, location)
                continue
            if not 200 <= response.status < 300:
                raise FetchRefused(f"The URL {netguard.shown(url)} answered HTTP {response.status}.")
            _stream(sock, response, dest, settings.media_fetch_max_bytes, deadline, target)
            return url
        except (OSError, http.client.HTTPException) as exc:
            raise FetchRefused(netguard.failure(target, exc)) from exc
        finally:
            if response is not None:
                response.close()
            sock.close()
    raise FetchRefused(f"The URL redirected more than {MAX_REDIRECTS} times.")


def _stream(sock: socket.socket, response: http.client.HTTPResponse, dest: BinaryIO, max_bytes: int,
            deadline: float, target: netguard.Target) -> None:
    length = response.getheader("Content-Length", "")
    if length.isdigit() and int(length) > max_bytes:
        raise FetchRefused(f"The image at {target.host} is {int(length):,} bytes; the limit is {max_bytes:,}.")
    received = 0
    while True:
        sock.settimeout(netguard.remaining(deadline, target))  # a slow drip cannot outlast the deadline
        chunk = response.read1(CHUNK)
        if not chunk:
            return
        received += len(chunk)
        if received > max_bytes:
            raise FetchRefused(f"The image at {target.host} is larger than the limit of {max_bytes:,} bytes.")
        dest.write(chunk)
