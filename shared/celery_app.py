"""The Celery app factory every worker uses: JSON only, late acks, no results, named queues."""
from __future__ import annotations

import redis
from celery import Celery, signals
from kombu import Queue
from sqlalchemy import exc as sa_exc

from shared import events, logs
from shared.settings import Settings


class DuplicatingCelery(Celery):
    """A test fault (`FAULT_DUPLICATE_MESSAGES`): every message is published twice, as a broker
    may redeliver it. Consumers must not care. (The outbox's own publisher reads `duplicates`.)"""

    duplicates = True

    def send_task(self, *args, **kwargs):
        super().send_task(*args, **kwargs)
        return super().send_task(*args, **kwargs)


def longest_task_seconds(settings: Settings) -> float:
    """The longest a task may hold its message: a media render's hard limit, a payout attempt
    (the wallet read, the rail call and the lookup after an unclear answer), a webhook attempt."""
    return max(settings.media_task_time_limit_seconds, 3 * settings.rail_timeout_seconds + 5,
               2 * settings.webhook_timeout_seconds + 5)


def max_countdown(settings: Settings) -> float:
    """How far ahead a task may be scheduled. A worker holds a scheduled message unacknowledged
    until it runs; past the visibility timeout the broker would hand out a second copy."""
    return settings.broker_visibility_timeout_seconds / 2


# failures that say nothing about the message: the database or Redis was out of reach, or dropped
# the connection
TRANSIENT = (sa_exc.OperationalError, sa_exc.InterfaceError, redis.ConnectionError, redis.TimeoutError)


def retried_on_outage(settings: Settings) -> dict:
    """Task options for a consumer no sweep backs up. A failed task's message is acknowledged and
    gone, so a transient failure is retried instead: exponential backoff with full jitter, capped
    at max_countdown, 30 times (about an hour at the default cap); then the task fails and logs."""
    return {"autoretry_for": TRANSIENT, "retry_backoff": 2, "retry_backoff_max": int(max_countdown(settings)),
            "retry_jitter": True, "max_retries": 30}


def transport_options(settings: Settings) -> dict:
    """Redis redelivers a message its worker never acknowledged (the worker was killed) once it is
    `BROKER_VISIBILITY_TIMEOUT_SECONDS` old; every worker scans for such messages every few seconds.
    A task must finish well inside that time, even after waiting behind another as a prefetched
    message, or a second copy would run beside it."""
    visibility = settings.broker_visibility_timeout_seconds
    if visibility < 2 * longest_task_seconds(settings):
        raise ValueError(f"BROKER_VISIBILITY_TIMEOUT_SECONDS={visibility} must be at least twice the longest task "
                         f"({longest_task_seconds(settings):g} s: MEDIA_TASK_TIME_LIMIT_SECONDS, "
                         "RAIL_TIMEOUT_SECONDS, WEBHOOK_TIMEOUT_SECONDS)")
    return {"visibility_timeout": visibility, "unacked_restore_interval": max(1, min(10, visibility // 10)),
            "unacked_restore_throttle": 1, "socket_timeout": 5, "socket_connect_timeout": 2}


def make_celery(name: str, settings: Settings, include: tuple[str, ...] = ()) -> Celery:
    cls = DuplicatingCelery if settings.fault_duplicate_messages else Celery
    app = cls(name, broker=settings.redis_url, include=list(include))
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_backend=None,
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,  # a killed worker's task goes back to the queue
        worker_prefetch_multiplier=1,
        task_default_queue="default",
        task_queues=[Queue(q) for q in events.QUEUES],
        broker_transport_options=transport_options(settings),
        # a publisher gives up quickly: the outbox row stays unpublished and the sweep retries it
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.2,
                                   "interval_max": 0.5},
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        timezone="UTC",
        enable_utc=True,
    )
    return app


@signals.before_task_publish.connect
def _carry_request_id(headers=None, **_):
    # the request id follows a request into the tasks it causes
    if headers is not None and not headers.get("request_id") and logs.request_id.get():
        headers["request_id"] = logs.request_id.get()


@signals.task_prerun.connect
def _bind_task_context(task_id=None, task=None, **_):
    logs.task_id.set(task_id)
    logs.request_id.set(getattr(task.request, "request_id", None) or logs.new_request_id())


@signals.setup_logging.connect
def _json_logging(**_):
    # keep our JSON handler; celery would otherwise install its own
    pass
