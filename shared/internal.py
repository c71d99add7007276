"""The internal HTTP client one service uses to call another's `/internal/*` API."""
from __future__ import annotations

import threading

import requests

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
    def __init__(self, base_url: str, token: str, timeout: float = 5.0):
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self._sessions = ThreadSessions()

    def get(self, path: str, params: dict | None = None):
        return self._call("GET", path, params=params)

    def post(self, path: str, body: dict):
        return self._call("POST", path, json=body)

    def _call(self, method: str, path: str, **kwargs):
        headers = {SERVICE_TOKEN_HEADER: self.token}
        if logs.request_id.get():
            headers[logs.REQUEST_ID_HEADER] = logs.request_id.get()
        try:
            response = self._sessions.get().request(method, self.base_url + path, headers=headers,
                                                    timeout=self.timeout, **kwargs)
        except requests.ConnectTimeout as exc:
            raise Unavailable(f"{method} {path}: cannot connect", ambiguous=False) from exc
        except requests.RequestException as exc:
            # a request that never reached the server certainly did nothing; any other failure
            # (read timeout, connection dropped mid-answer) may have come after the work was done
            never_sent = isinstance(exc, requests.ConnectionError) and "Failed to establish" in str(exc)
            raise Unavailable(f"{method} {path}: {exc.__class__.__name__}", ambiguous=not never_sent) from exc
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code >= 500 or response.status_code == 429 or not isinstance(body, dict):
            raise Unavailable(f"{method} {path}: HTTP {response.status_code}", ambiguous=method != "GET")
        if response.status_code >= 400:
            raise InternalError(response.status_code, body.get("code", "error"), body.get("error", ""))
        return body.get("data")
