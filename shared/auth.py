"""Credentials shared by the services: callers, hashed keys, signed session tokens, the service token."""
from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass

from flask import request

from shared import errors

SERVICE_TOKEN_HEADER = "X-Service-Token"


@dataclass(frozen=True)
class Caller:
    kind: str  # "buyer" | "agent" | "admin" | "anonymous"
    id: str | None = None  # wallet, agent id, admin key fingerprint, or client IP
    chain: str | None = None

    @property
    def key(self) -> str:
        """Who this is for rate limits and idempotency keys."""
        return f"{self.kind}:{self.id}"


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_api_key() -> str:
    return "atl_" + secrets.token_urlsafe(32)


def new_webhook_secret() -> str:
    return "whsec_" + secrets.token_urlsafe(32)


def anonymous_caller() -> Caller:
    """The caller of a request without credentials, known by its address (the client's, behind the gateway)."""
    return Caller("anonymous", request.remote_addr or "unknown")


def bearer_token() -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if not header:
        return None
    if scheme.lower() != "bearer" or not token.strip():
        raise errors.Unauthenticated("Use 'Authorization: Bearer <token>'.")
    return token.strip()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign_session(secret: str, wallet: str, chain: str, ttl: int, now: float | None = None) -> tuple[str, int]:
    """A stateless session token: `ses.<payload>.<hmac>`; no database read to check it."""
    expires = int((now or time.time()) + ttl)
    payload = _b64(json.dumps({"w": wallet, "c": chain, "e": expires, "n": secrets.token_hex(4)},
                              separators=(",", ":")).encode())
    mac = _b64(hmac.new(secret.encode(), payload.encode(), hashlib.sha256).digest())
    return f"ses.{payload}.{mac}", expires


def verify_session(secret: str, token: str, now: float | None = None) -> Caller | None:
    if len(token) > MAX_SESSION_TOKEN:
        return None
    verified = _verified(secret, token)
    if verified is None or verified[2] < (now or time.time()):  # expiry: checked on every use
        return None
    return Caller("buyer", verified[0], verified[1])


MAX_SESSION_TOKEN = 512  # ours are about 150 characters; longer is not one, and not worth caching


@functools.lru_cache(maxsize=4096)
def _verified(secret: str, token: str) -> tuple[str, str, int] | None:
    """(wallet, chain, expires) of a token whose MAC checks out, else None; each token is checked
    once per process (a buyer's every request carries the same one)."""
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != "ses" or not token.isascii():
        return None
    expected = _b64(hmac.new(secret.encode(), parts[1].encode(), hashlib.sha256).digest())
    if not hmac.compare_digest(expected, parts[2]):
        return None
    try:
        data = json.loads(_unb64(parts[1]))
        return str(data["w"]), str(data["c"]), int(data["e"])
    except (ValueError, KeyError, TypeError):
        return None


def is_admin_key(token: str, admin_keys: tuple[str, ...]) -> bool:
    return any(hmac.compare_digest(token.encode(), key.encode()) for key in admin_keys if key)


def require_service(expected: str) -> None:
    """Guard for /internal/*: a service credential, never a user's."""
    given = request.headers.get(SERVICE_TOKEN_HEADER, "")
    if not given or not hmac.compare_digest(given.encode(), expected.encode()):
        raise errors.NotFound()
