"""Transactional outbox: events are rows written in the state change's transaction and
published to their consumers' queues only after that transaction commits."""
from __future__ import annotations

import logging

from sqlalchemy import JSON, Index, Integer, String, select
from sqlalchemy.orm import Mapped, Session, declared_attr, mapped_column

from shared import events, logs
from shared.broker import Publisher, Task
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
        copies = 2 if getattr(celery_app, "duplicates", False) else 1  # the FAULT_DUPLICATE_MESSAGES test fault
        self.publisher = Publisher(celery_app.conf.broker_url, copies=copies)

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
        if self.relay_task is None:
            try:
                self.relay([row.id for row in rows])
            except Exception:  # the sweep publishes whatever this missed
                log.warning("relaying events after commit failed; the sweep will", exc_info=True)
            return
        self.hand_off([row.message() for row in rows])

    def hand_off(self, messages: list[dict], also=None) -> None:
        """Publish committed events (their messages, as OutboxMixin.message makes them) to their
        consumers at once (no relay hop on the way to them), with the message that asks the relay
        to mark them published, all in one round trip to the broker. (A service with no relay
        task marks them itself, right after the commit.) If this process dies in between, the
        sweep publishes them again: consumers are idempotent by event id. `also(pipeline)` may add
        commands of its own to the same round trip (the broker is the services' Redis)."""
        tasks = [task for message in messages for task in self._tasks(message)]
        tasks.append(Task(self.relay_task, "default", [[m["id"] for m in messages]], {"published": True},
                          headers={"request_id": logs.request_id.get()}))
        try:
            self.publisher.publish(tasks, also)
        except Exception:  # the beat sweep publishes whatever this missed
            log.warning("outbox hand-off after commit failed; the sweep will relay", exc_info=True)

    def _tasks(self, message: dict) -> list[Task]:
        """The tasks that publish one event: one per consumer, with an id made of the event's,
        so a consumer can tell a copy from a new event."""
        headers = {"request_id": message["request_id"] or logs.request_id.get()}
        return [Task(sub.task, sub.queue, [message], id=f"{message['id']}:{sub.task}", headers=headers)
                for sub in events.consumers(message["event"], message["data"])]

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
            if not published and rows:
                self.publisher.publish([task for row in rows for task in self._tasks(row.message())])  # one round trip
            now = utcnow()
            for row in rows:
                row.attempts += 1
                row.published_at = now
            return len(rows)
