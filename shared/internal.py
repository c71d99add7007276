"""The internal HTTP client one service uses to call another's `/internal/*` API."""
from __future__ import annotations

import json
import threading
from urllib.parse import urlencode

import requests
import urllib3
from urllib3.exceptions import ConnectTimeoutError, HTTPError

from shared import logs
from shared.auth import SERVICE_TOKEN_HEADER


class InternalError(Exception):
    """The other service answered with an error (`status`, `code`) that retrying will not change."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


class Unavailable(Exception):
    """No usable answer. `ambiguous` says the request may have been carried out anyway
    (it was sent but the answer was lost); otherwise it certainly was not."""

    def __init__(self, message: str, ambiguous: bool):
        super().__init__(message)
        self.ambiguous = ambiguous


class ThreadSessions:
    """One keep-alive `requests.Session` per thread (a Session is not safe to share)."""

    def __init__(self):
        self._local = threading.local()

    def get(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        return session


class InternalClient:
    """Calls over one thread-safe keep-alive connection pool (urllib3, which requests is built on,
    without requests' per-call preparation: an internal call is on a payout's way to the rail)."""

    def __init__(self, base_url: str, token: str, timeout: float = 5.0):
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout
        # kept-alive connections up to the most threads a process calls from at once (gunicorn's
        # threads); past that a call opens a connection of its own and closes it afterwards
        self._pool = urllib3.connection_from_url(self.base_url, maxsize=32, block=False, retries=False,
                                                 timeout=urllib3.Timeout(connect=timeout, read=timeout))
        self._prefix = urllib3.util.parse_url(self.base_url).path or ""

    def get(self, path: str, params: dict | None = None):
        query = urlencode({k: v for k, v in (params or {}).items() if v is not None})
        return self._call("GET", path + ("?" + query if query else ""))

    def post(self, path: str, body: dict):
        return self._call("POST", path, json.dumps(body).encode())

    def _call(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        headers = {**(headers or {}), SERVICE_TOKEN_HEADER: self.token}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if logs.request_id.get():
            headers[logs.REQUEST_ID_HEADER] = logs.request_id.get()
        try:
            response = self._pool.urlopen(method, self._prefix + path, body=body, headers=headers)
        except ConnectTimeoutError as exc:  # includes a refused connection: nothing was sent
            raise Unavailable(f"{method} {path}: cannot connect", ambiguous=False) from exc
        except (HTTPError, OSError) as exc:
            # any other failure (read timeout, connection dropped mid-answer) may have come after
            # the work was done
            raise Unavailable(f"{method} {path}: {exc.__class__.__name__}", ambiguous=True) from exc
        try:
            answer = json.loads(response.data)
        except ValueError:
            answer = None
        if response.status >= 500 or response.status == 429 or not isinstance(answer, dict):
            raise Unavailable(f"{method} {path}: HTTP {response.status}", ambiguous=method != "GET")
        if response.status >= 400:
            raise InternalError(response.status, answer.get("code", "error"), answer.get("error", ""))
        return answer.get("data")
