"""Fixed-window rate limits counted in Redis, so every process shares one count per caller."""
from __future__ import annotations

import time
from dataclasses import dataclass

import redis


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
    pipe = client.pipeline(transaction=True)
    pipe.incr(bucket)
    pipe.expire(bucket, window + 1)
    count = pipe.execute()[0]
    return Verdict(count <= limit, limit, max(0, limit - count), start + window - now)
