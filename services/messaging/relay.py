"""Messaging's outbox: `order.message` events commit with their message and reach the consumers'
queues (the webhooks worker) through the shared relay.

Messaging has no worker of its own, so the web process relays a transaction's events itself
right after the commit; a sweeper thread in every messaging process relays whatever that missed
(a crash between commit and relay, a broker hiccup). Concurrent sweepers are safe: the relay
claims rows with `FOR UPDATE SKIP LOCKED` on PostgreSQL, and SQLite has one writer at a time.
"""
from __future__ import annotations

import datetime as dt
import logging
import threading

from sqlalchemy import select

from shared.db import utcnow
from shared.outbox import Outbox

log = logging.getLogger(__name__)
BATCH = 200


class MessagingOutbox(Outbox):
    def __init__(self, model, celery_app, database):
        # no relay task: this process publishes and marks its own events right after the commit
        super().__init__(model, celery_app, database, relay_task=None)

    def sweep(self, older_than_seconds: float) -> int:
        """Relay events left unpublished for longer than the after-commit relay normally takes."""
        cutoff = utcnow() - dt.timedelta(seconds=older_than_seconds)
        published = 0
        while True:
            with self.db.read_sessionmaker() as session:
                ids = session.scalars(select(self.model.id)
                                      .where(self.model.published_at.is_(None), self.model.created_at < cutoff)
                                      .order_by(self.model.created_at).limit(BATCH)).all()
            if not ids:
                return published
            count = self.relay(ids)
            published += count
            if len(ids) < BATCH or count == 0:  # the rest is another sweeper's right now
                return published


class Sweeper:
    def __init__(self, outbox: MessagingOutbox, period_seconds: float, stop: threading.Event):
        self.outbox = outbox
        self.period = max(0.05, period_seconds)
        self.stop = stop

    def run(self) -> None:
        while not self.stop.wait(self.period):
            try:
                published = self.outbox.sweep(older_than_seconds=self.period)
                if published:
                    log.info("outbox sweeper relayed %d events", published)
            except Exception:
                log.warning("outbox sweep failed; retrying next period", exc_info=True)
