"""The processes `make run` starts: one table, read by the runner and checked against docker-compose.yml."""
from __future__ import annotations

import sys
from dataclasses import dataclass

from shared.settings import load

CELERY_APP = "services.orders.worker"
SETTINGS = load()
GATEWAY_PORT = SETTINGS.gateway_port


@dataclass(frozen=True)
class Process:
    name: str
    argv: tuple[str, ...]
    kind: str = "web"  # web | worker | beat | gateway
    port: int | None = None

    @property
    def health_url(self) -> str | None:
        return f"http://127.0.0.1:{self.port}/healthz" if self.port else None


def web(name: str, app: str, port: int, workers: int = 2, threads: int = 4, kind: str = "web") -> Process:
    # each server's control socket (`gunicornc -s var/run/gunicorn-<port>.ctl`) is its own: by default
    # every gunicorn of the user's shares ~/.gunicorn/gunicorn.ctl, each taking it from the last
    argv = (
        sys.executable, "-m", "gunicorn", "--worker-class", "gthread",
        "--workers", str(workers), "--threads", str(threads), "--bind", f"127.0.0.1:{port}",
        "--control-socket", f"var/run/gunicorn-{port}.ctl", app,
    )
    return Process(name, argv, kind, port)


def worker(queue: str, concurrency: int = 1, app: str = CELERY_APP) -> Process:
    argv = (
        sys.executable, "-m", "celery", "-A", app, "worker", "-Q", queue, "-n", f"{queue}@%h",
        "--concurrency", str(concurrency), "--prefetch-multiplier", "1", "--without-gossip", "--without-mingle",
    )
    return Process(f"worker-{queue}", argv, "worker")


def beat() -> Process:
    return Process("beat", (sys.executable, "-m", "celery", "-A", CELERY_APP, "beat",
                            "--schedule", "var/celerybeat-schedule"), "beat")


# Started in this order; the gateway last, so it comes up in front of ready services.
PROCESSES: list[Process] = [
    web("orders", "services.orders.wsgi:app", SETTINGS.orders_port),
    # each open event stream holds a thread
    web("messaging", "services.messaging.wsgi:app", SETTINGS.messaging_port, threads=32),
    worker("default"),
    worker("payouts", concurrency=4, app="services.payouts.worker"),
    # image decoding is CPU work: one render per core
    worker("media", concurrency=2, app="services.media.worker"),
    # dispatches generations, times out unanswered ones, closes workspaces at their period's end
    worker("workspaces", concurrency=2),
    # webhook requests wait on agents' endpoints (up to WEBHOOK_TIMEOUT_SECONDS each)
    worker("webhooks", concurrency=4),
    beat(),
    web("gateway", "services.gateway.wsgi:app", GATEWAY_PORT, workers=1, threads=16, kind="gateway"),
]
