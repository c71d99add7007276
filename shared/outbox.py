"""Transactional outbox: events are rows written in the state change's transaction and
published to their consumers' queues only after that transaction commits."""
from __future__ import annotations

import logging

from sqlalchemy import JSON, Index, Integer, String, select, update
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
    """Writes and relays the events of one service's outbox table."""

    def __init__(self, model, celery_app, database):
        self.model = model
        self.celery = celery_app
        self.db = database

    def record(self, session: Session, event: str, data: dict, order_id: str | None = None,
               sequence: int = 0) -> None:
        row = self.model(id=new_id("event"), event=event, order_id=order_id, sequence=sequence, data=data,
                         request_id=logs.request_id.get(), created_at=utcnow(), attempts=0)
        session.add(row)
        pending = session.info.setdefault("outbox_pending", [])
        if not pending:  # one relay per transaction, right after it commits
            after_commit(session, lambda: self._publish_committed(list(pending)))
        pending.append(row)

    def _publish_committed(self, rows: list) -> None:
        """Publish what this transaction just committed, then mark it published in one UPDATE."""
        try:
            self._send([row.message() for row in rows])
            with self.db.engine.begin() as conn:
                conn.execute(update(self.model)
                             .where(self.model.id.in_([row.id for row in rows]), self.model.published_at.is_(None))
                             .values(published_at=utcnow(), attempts=self.model.attempts + 1))
        except Exception:  # the beat sweep publishes whatever this missed
            log.warning("outbox relay after commit failed; the sweep will retry", exc_info=True)

    def _send(self, messages: list[dict]) -> None:
        with self.celery.producer_or_acquire() as producer:  # one pooled connection for the batch
            for message in messages:
                for sub in events.consumers(message["event"]):
                    self.celery.send_task(sub.task, args=[message], queue=sub.queue, producer=producer,
                                          task_id=f"{message['id']}:{sub.task}",
                                          headers={"request_id": message["request_id"]})

    def relay(self, limit: int = 200) -> int:
        """Publish the oldest unpublished events (the sweep), marking them published.

        A crash between publish and mark publishes again: consumers are idempotent by event id.
        """
        with self.db.transaction() as session:
            query = (select(self.model).where(self.model.published_at.is_(None))
                     .order_by(self.model.created_at).limit(limit))
            if self.db.is_postgres:
                query = query.with_for_update(skip_locked=True)
            rows = session.scalars(query).all()
            self._send([row.message() for row in rows])
            now = utcnow()
            for row in rows:
                row.attempts += 1
                row.published_at = now
            return len(rows)
