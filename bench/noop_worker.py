"""The baseline of bench/payouts.py: a Celery app built like the services' own (shared.celery_app:
JSON, late acks, no result backend) whose one task only says it ran, by pushing its token onto a
Redis list the bench waits on with BLPOP. So a bare round trip costs one publish, one worker
pickup, one task run and one Redis observation, and nothing of the payout path's own work.

celery -A bench.noop_worker worker -Q bench_noop ... (bench/payouts.py starts it through
services.processes.worker, as the real workers are started).
"""
from __future__ import annotations

from functools import lru_cache

import redis

from shared import logs
from shared.celery_app import make_celery
from shared.settings import load

QUEUE = "bench_noop"
TASK = "bench.noop"
DONE = "bench:noop:done"  # a list: one token per task run

settings = load()
app = make_celery("bench-noop", settings)
logs.configure("bench-noop-worker", settings.log_level)  # as the real workers' entry points do


@lru_cache(maxsize=1)
def _redis() -> redis.Redis:
    return redis.Redis.from_url(settings.redis_url, socket_timeout=2, socket_connect_timeout=2)


@app.task(name=TASK, acks_late=True)
def noop(token: str) -> None:
    _redis().rpush(DONE, token)
