"""The webhooks worker (queue `webhooks`; the orders Celery app, its own process): records each
order event for its agent and POSTs it to the agent's endpoint; the sweep makes the attempts that
come due (retries, and attempts a killed worker left behind)."""
from __future__ import annotations

import logging

from shared import logs
from shared.celery_app import retried_on_outage
from shared.db import Database, utcnow

from . import services, webhooks
from .tasks import app, runtime, settings

log = logging.getLogger(__name__)
ATTEMPT_TASK = "webhooks.attempt"


# the sweep retries attempts, not recording: an outage while recording is retried here
@app.task(name="webhooks.deliver_event", acks_late=True, **retried_on_outage(settings))
def deliver_event(message: dict) -> str | None:
    logs.order_id.set(message.get("order_id"))
    return handle_event(*runtime(), message)


def handle_event(db: Database, rt: services.Runtime, message: dict) -> str | None:
    """An order event: record it in the agent's feed and log, then make the first attempt."""
    with db.transaction() as session:
        claim = webhooks.record(session, rt.settings, message)
    return _attempt(db, rt, claim) if claim is not None else None


@app.task(name=ATTEMPT_TASK, acks_late=True)
def attempt(delivery_id: str) -> str | None:
    db, rt = runtime()
    return attempt_now(db, rt, delivery_id)


def attempt_now(db: Database, rt: services.Runtime, delivery_id: str) -> str | None:
    """One attempt, if it is due and no one else has it."""
    with db.transaction() as session:
        claim = webhooks.claim(session, rt.settings, delivery_id, utcnow())
    return _attempt(db, rt, claim) if claim is not None else None


def _attempt(db: Database, rt: services.Runtime, claim: webhooks.Claim) -> str:
    """POST a claimed attempt, outside any transaction, and record how it went."""
    outcome = webhooks.post(claim, rt.settings)
    with db.transaction() as session:
        status = webhooks.finish(session, rt.settings, claim, outcome, utcnow())
    if status != "delivered":
        log.info("webhook %s (%s) attempt %d: %s, %s", claim.id, claim.event, claim.attempt,
                 outcome.error, status)
    return status


@app.task(name="webhooks.sweep", acks_late=True)
def sweep() -> int:
    """Hand every due attempt to the worker pool (each claims its row, so a repeat is harmless)."""
    db, _rt = runtime()
    with db.transaction() as session:
        ids = webhooks.due_ids(session, utcnow())
    for delivery_id in ids:
        app.send_task(ATTEMPT_TASK, args=[delivery_id], queue="webhooks")
    return len(ids)
