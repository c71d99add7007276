"""Transactional outbox: events are rows written in the state change's transaction and
published to their consumers' queues only after that transaction commits."""
from __future__ import annotations

import logging

from sqlalchemy import JSON, Index, Integer, String, select
from sqlalchemy.orm import Mapped, Session, declared_attr, mapped_column

from shared import events, logs
from shared.db import UTCDateTime, after_commit, isoformat, utcnow
from shared.ids import new_id

log = logging.getLogger(__name__)


class OutboxMixin:
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    event: Mapped[str] = mapped_column(String(64))
    order_id: Mapped[str | None] = mapped_column(String(32))
    sequence: Mapped[int] = mapped_column(Integer, default=0)
    data: Mapped[dict] = mapped_column(JSON)
    request_id: Mapped[str | None] = mapped_column(String(64))
    created_at = mapped_column(UTCDateTime(), nullable=False)
    published_at = mapped_column(UTCDateTime(), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)

    @declared_attr.directive
    def __table_args__(cls):
        return (Index(f"ix_{cls.__tablename__}_unpublished", "published_at", "created_at"),)

    def message(self) -> dict:
        return {"id": self.id, "event": self.event, "order_id": self.order_id, "sequence": self.sequence,
                "created_at": isoformat(self.created_at), "data": self.data, "request_id": self.request_id}


class Outbox:
    """Writes and relays the events of one service's outbox table.

    A committed transaction's events are published to their consumers right after the commit, and
    the relay task marks them published. A beat sweep runs the relay over whatever is still
    unpublished, publishing it, so a lost hand-off delays, never loses.
    """

    def __init__(self, model, celery_app, database, relay_task: str | None):
        self.model = model
        self.celery = celery_app
        self.db = database
        self.relay_task = relay_task

    def record(self, session: Session, event: str, data: dict, order_id: str | None = None,
               sequence: int = 0) -> None:
        row = self.model(id=new_id("event"), event=event, order_id=order_id, sequence=sequence, data=data,
                         request_id=logs.request_id.get(), created_at=utcnow(), attempts=0)
        session.add(row)
        pending = session.info.setdefault("outbox_pending", [])
        if not pending:  # one hand-off per transaction, right after it commits
            after_commit(session, lambda: self._hand_off(pending))
        pending.append(row)

    def _hand_off(self, rows: list) -> None:
        """Publish a committed transaction's events to their consumers at once (no relay hop on
        the way to them), then ask the relay to mark them published; a service with no relay task
        (`relay_task=None`) marks them here. If this process dies in between, the sweep publishes
        them again: consumers are idempotent by event id."""
        if self.relay_task is None:
            try:
                self.relay([row.id for row in rows])
            except Exception:  # the sweep publishes whatever this missed
                log.warning("relaying events after commit failed; the sweep will", exc_info=True)
            return
        try:
            with self.celery.producer_or_acquire() as producer:
                for row in rows:
                    self._publish(row, producer)
                self.celery.send_task(self.relay_task, args=[[row.id for row in rows]], kwargs={"published": True},
                                      queue="default", producer=producer)
        except Exception:  # the beat sweep publishes whatever this missed
            log.warning("outbox hand-off after commit failed; the sweep will relay", exc_info=True)

    def _publish(self, row, producer) -> None:
        message = row.message()
        for sub in events.consumers(row.event, row.data):
            self.celery.send_task(sub.task, args=[message], queue=sub.queue, producer=producer,
                                  task_id=f"{row.id}:{sub.task}", headers={"request_id": row.request_id})

    def relay(self, ids: list[str] | None = None, limit: int = 200, published: bool = False) -> int:
        """Publish unpublished events (these ids, or the oldest) to their consumers; mark them published.
        With `published`, the events were already published by their transaction's hand-off: only mark.

        A crash between publish and mark publishes again: consumers are idempotent by event id.
        """
        with self.db.transaction() as session:
            query = select(self.model).where(self.model.published_at.is_(None))
            if ids is not None:
                query = query.where(self.model.id.in_(ids))
            query = query.order_by(self.model.created_at).limit(limit)
            if self.db.is_postgres:
                query = query.with_for_update(skip_locked=True)
            rows = session.scalars(query).all()
            if not published:
                with self.celery.producer_or_acquire() as producer:  # one pooled connection for the batch
                    for row in rows:
                        self._publish(row, producer)
            now = utcnow()
            for row in rows:
                row.attempts += 1
                row.published_at = now
            return len(rows)
