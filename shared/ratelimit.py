"""Fixed-window rate limits counted in Redis, so every process shares one count per caller."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import redis

from shared.redisconn import Commands

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    limit: int
    remaining: int
    reset: int  # seconds until the window ends

    def headers(self) -> dict[str, str]:
        headers = {"X-RateLimit-Limit": str(self.limit), "X-RateLimit-Remaining": str(self.remaining),
                   "X-RateLimit-Reset": str(self.reset)}
        if not self.allowed:
            headers["Retry-After"] = str(self.reset)
        return headers


def hit(client: redis.Redis, key: str, limit: int, window: int = 60, now: float | None = None) -> Verdict:
    now = int(now if now is not None else time.time())
    start = now - now % window
    bucket = f"ratelimit:{key}:{start}"
    # one round trip; the window's expiry is set before the first count, so no count outlives it
    _, count = Commands.of(client).run([("SET", bucket, 0, "EX", window + 1, "NX"), ("INCR", bucket)])
    return Verdict(count <= limit, limit, max(0, limit - count), start + window - now)


def limit_caller(client: redis.Redis, settings, caller, files: bool = False) -> None:
    """The per-minute budget of one caller (wallet, agent, admin key, or IP when anonymous),
    shared by every service, or with `files` the caller's separate budget for file links; the
    verdict goes on `g` for the response headers."""
    from flask import g

    from shared import errors

    if not settings.rate_limits:
        return
    if files:
        limit, key = settings.rate_limit_files_per_minute, f"files:{caller.key}"
    else:
        limit = settings.rate_limit_anonymous_per_minute if caller.kind == "anonymous" else settings.rate_limit_per_minute
        key = caller.key
    try:
        verdict = hit(client, key, limit)
    except redis.RedisError:
        log.warning("rate limiter unavailable; letting the request through", exc_info=True)
        return
    g.rate_limit = verdict
    if not verdict.allowed:
        raise errors.RateLimited(f"Rate limit of {limit} requests per minute reached; retry in "
                                 f"{verdict.reset} s.", headers=verdict.headers())


def limit_request(client: redis.Redis, settings, resolve, files: bool = False):
    """The request's caller (`resolve()`), counted against its budget as limit_caller counts it.
    Credentials that are refused count against their address's anonymous budget before the 401, so
    guessing keys or tokens is limited like any anonymous caller: past the limit the answer is 429."""
    from shared import errors
    from shared.auth import anonymous_caller

    try:
        caller = resolve()
    except errors.Unauthenticated:
        limit_caller(client, settings, anonymous_caller())
        raise
    limit_caller(client, settings, caller, files=files)
    return caller


def add_headers(response):
    """after_request: the X-RateLimit-* headers of the request's verdict."""
    from flask import g

    verdict = g.get("rate_limit")
    if verdict is not None:
        for key, value in verdict.headers().items():
            response.headers.setdefault(key, value)
    return response
