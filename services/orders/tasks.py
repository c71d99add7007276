"""The orders service's own background work: the outbox relay, the timer sweep, the prune."""
from __future__ import annotations

import datetime as dt
import logging
from functools import lru_cache

import redis
from sqlalchemy import delete

from shared.celery_app import make_celery, retried_on_outage
from shared.db import Database, utcnow
from shared.settings import load

from . import notifications, services
from .models import IdempotencyRecord, OutboxEvent, Timer, Upload, WebhookDelivery

log = logging.getLogger(__name__)
settings = load()
app = make_celery("orders", settings)
app.conf.beat_schedule = {
    "relay-outbox": {"task": services.RELAY_TASK, "schedule": settings.outbox_sweep_seconds},
    "fire-due-timers": {"task": "orders.fire_due_timers", "schedule": settings.timer_sweep_seconds},
    "prune": {"task": "orders.prune", "schedule": 3600.0},
    "stuck-previews": {"task": "orders.request_stuck_previews", "schedule": 600.0},
    "workspaces-sweep": {"task": "workspaces.sweep", "schedule": settings.workspace_sweep_seconds,
                         "options": {"queue": "workspaces"}},
    "webhooks-sweep": {"task": "webhooks.sweep", "schedule": settings.webhook_sweep_seconds,
                       "options": {"queue": "webhooks"}},
    # the payouts worker's own sweep, sent by name to its queue (one beat for the whole system)
    "payouts-sweep": {"task": "payouts.sweep", "schedule": settings.payout_sweep_seconds,
                      "options": {"queue": "payouts"}},
    "payouts-prune": {"task": "payouts.prune", "schedule": 3600.0, "options": {"queue": "payouts"}},
}


@lru_cache(maxsize=1)
def runtime() -> tuple[Database, services.Runtime]:
    db = Database(settings.orders_db)
    cache_client = redis.Redis.from_url(settings.redis_url, socket_timeout=2, socket_connect_timeout=2)
    return db, services.build_runtime(settings, db, app, cache_client)[0]


@app.task(name=services.RELAY_TASK, acks_late=True)
def relay_outbox(ids: list[str] | None = None, published: bool = False) -> int:
    """The beat sweep (Outbox.sweep). With ids, the per-commit message that marked a transaction's
    events before hand-offs listed them for the sweep; one may still be queued from an older release."""
    db, rt = runtime()
    if ids is not None:
        return rt.outbox.relay(ids, published=published)
    relayed = rt.outbox.sweep()
    if relayed:
        log.info("outbox relayed %d events", relayed)
    return relayed


@app.task(name="orders.fire_due_timers", acks_late=True)
def fire_due_timers() -> int:
    db, rt = runtime()
    return sweep_timers(db, rt)


def sweep_timers(db: Database, rt: services.Runtime, now=None) -> int:
    """Fire every due timer, each in its own transaction so one bad order cannot block the rest."""
    now = now or utcnow()
    with db.transaction() as session:
        ids = services.due_timer_ids(session, now)
    fired = 0
    for timer_id in ids:
        try:
            with db.transaction() as session:
                if services.fire_timer(session, rt, timer_id, db.is_postgres, now) is not None:
                    fired += 1
        except Exception:
            log.exception("timer %s failed; it stays due and the next sweep retries it", timer_id)
    return fired


# no sweep looks for notifications a lost message left out: outages are retried
@app.task(name="orders.notify_buyer", acks_late=True, **retried_on_outage(settings))
def notify_buyer(message: dict) -> bool:
    """An order event the buyer should read about becomes a notification (once per event)."""
    db, _rt = runtime()
    with db.transaction() as session:
        return notifications.record(session, message)


@app.task(name="orders.request_stuck_previews", acks_late=True)
def request_stuck_previews() -> int:
    db, rt = runtime()
    with db.transaction() as session:
        return services.request_stuck_previews(session, rt, utcnow() - dt.timedelta(seconds=STUCK_PREVIEW_SECONDS))


# an image still pending this long after its delivery is asked for again
STUCK_PREVIEW_SECONDS = 900


@app.task(name="orders.prune", acks_late=True)
def prune_task() -> dict:
    db, rt = runtime()
    return prune(db, rt.settings, storage=rt.storage)


def prune(db: Database, settings, now=None, storage=None) -> dict:
    """Delete what no one can use any more: expired idempotency records, old published events,
    old fired timers, uploads never delivered (with their files). Unpublished events, pending
    timers and delivered files are never touched."""
    now = now or utcnow()
    kept_since = now - dt.timedelta(days=settings.retention_days)
    with db.transaction() as session:
        stale = session.execute(delete(Upload).where(
            Upload.item_id.is_(None),
            Upload.created_at < now - dt.timedelta(seconds=settings.unused_upload_ttl_seconds))
            .returning(Upload.storage_key)).scalars().all()
    if storage is not None:
        for key in stale:  # after the commit: a file with no row is harmless, a row with no file is not
            storage.delete(key)
    with db.transaction() as session:
        counts = {
            "idempotency_keys": session.execute(delete(IdempotencyRecord).where(
                IdempotencyRecord.created_at < now - dt.timedelta(seconds=settings.idempotency_ttl_seconds))).rowcount,
            "outbox_events": session.execute(delete(OutboxEvent).where(
                OutboxEvent.published_at.is_not(None), OutboxEvent.published_at < kept_since)).rowcount,
            "order_timers": session.execute(delete(Timer).where(
                Timer.fired_at.is_not(None), Timer.fired_at < kept_since)).rowcount,
            # the agents' feed and delivery log keep RETENTION_DAYS; what is still being sent stays
            "webhook_deliveries": session.execute(delete(WebhookDelivery).where(
                WebhookDelivery.status != "pending", WebhookDelivery.created_at < kept_since)).rowcount,
            "unused_uploads": len(stale),
        }
    log.info("pruned %s", counts)
    return counts
