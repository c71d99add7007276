"""Transactional outbox: events are rows written in the state change's transaction and
published to their consumers' queues only after that transaction commits."""
from __future__ import annotations

import datetime as dt
import logging

from sqlalchemy import JSON, Index, Integer, String, select, update
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


# A header on the messages of an event's one hand-off after its commit. Delivered for the first
# time (not restored by the broker after a worker died: kombu marks those `redelivered`), such a
# message is the first anyone has seen of its event, but for a copy of it delivered alongside
# (first_sight below). A message the sweep publishes carries no such header: its event's hand-off
# may have been delivered already.
FROM_COMMIT = "from_commit"


def first_sight(request) -> bool:
    """Whether a task's message (its Celery request) is its event's hand-off after the commit,
    delivered for the first time: no consumer can have taken the event before, though a copy of
    the message (a broker's duplicate) may be taking it at this moment."""
    delivery = getattr(request, "delivery_info", None) or {}
    return bool(request.get(FROM_COMMIT)) and not request.get("redelivered") and not delivery.get("redelivered")


class Outbox:
    """Writes and relays the events of one service's outbox table.

    A committed transaction's events are published to their consumers right after the commit.
    Their ids go on a list in the broker in the same round trip, after the messages; the relay's
    beat sweep marks everything on that list published in one statement, then publishes whatever
    is still unpublished after a grace period, so a lost hand-off delays, never loses. (A service
    with no relay task publishes and marks its events itself, right after the commit.)
    """

    GRACE_SECONDS = 5.0  # a hand-off normally follows its commit within milliseconds
    MARK_BATCH = 1000

    def __init__(self, model, celery_app, database, relay_task: str | None):
        self.model = model
        self.celery = celery_app
        self.db = database
        self.relay_task = relay_task
        copies = 2 if getattr(celery_app, "duplicates", False) else 1  # the FAULT_DUPLICATE_MESSAGES test fault
        self.publisher = Publisher(celery_app.conf.broker_url, copies=copies)
        self.handed_key = f"outbox:handed:{model.__tablename__}"  # ids published, not yet marked

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
        consumers at once, in one round trip to the broker that ends by listing their ids for the
        sweep to mark (Redis runs them in order, so a listed event's messages went out before it).
        If this process dies in between, the sweep publishes them again: consumers are idempotent
        by event id. `also(commands)` may append commands of its own (tuples) to the same round
        trip (the broker is the services' Redis)."""
        tasks = [task for message in messages for task in self._tasks(message, from_commit=True)]

        def then(commands: list) -> None:
            if also is not None:
                also(commands)
            commands.append(("RPUSH", self.handed_key, *(m["id"] for m in messages)))

        try:
            self.publisher.publish(tasks, then)
        except Exception:  # the beat sweep publishes whatever this missed
            log.warning("outbox hand-off after commit failed; the sweep will relay", exc_info=True)

    def mark_handed(self) -> int:
        """Mark published the events their hand-offs listed (one statement per batch). An id taken
        off the list and lost before the commit only means the sweep publishes that event again."""
        marked = 0
        while ids := self.publisher.client.lpop(self.handed_key, self.MARK_BATCH):
            with self.db.transaction() as session:
                marked += session.execute(
                    update(self.model)
                    .where(self.model.id.in_([i.decode() for i in ids]), self.model.published_at.is_(None))
                    .values(published_at=utcnow(), attempts=self.model.attempts + 1)).rowcount
            if len(ids) < self.MARK_BATCH:
                break
        return marked

    def sweep(self, limit: int = 200) -> int:
        """The relay's beat sweep: mark what the hand-offs published, then publish and mark what is
        still unpublished after the grace period (a hand-off lost to a crash or a broker outage)."""
        try:
            self.mark_handed()
        except Exception:  # unmarked events are published again below, once they are old enough
            log.warning("marking handed-off events failed", exc_info=True)
        relayed = 0
        while True:  # drain in batches so one sweep clears a backlog
            count = self.relay(limit=limit, older_than=dt.timedelta(seconds=self.GRACE_SECONDS))
            relayed += count
            if count < limit:
                return relayed

    def _tasks(self, message: dict, from_commit: bool = False) -> list[Task]:
        """The tasks that publish one event: one per consumer, with an id made of the event's,
        so a consumer can tell a copy from a new event. `from_commit` marks the messages of the
        hand-off right after the event's commit (FROM_COMMIT): the sweep's are not so marked."""
        headers = {"request_id": message["request_id"] or logs.request_id.get()}
        if from_commit:
            headers[FROM_COMMIT] = True
        args = [message]  # one list for all: the publisher encodes each task's arguments once
        return [Task(sub.task, sub.queue, args, id=f"{message['id']}:{sub.task}", headers=headers)
                for sub in events.consumers(message["event"], message["data"])]

    def relay(self, ids: list[str] | None = None, limit: int = 200, published: bool = False,
              older_than: dt.timedelta | None = None) -> int:
        """Publish unpublished events (these ids, or the oldest; only those written more than
        `older_than` ago) to their consumers; mark them published. With `published`, the events
        were already published by their transaction's hand-off: only mark.

        A crash between publish and mark publishes again: consumers are idempotent by event id.
        """
        with self.db.transaction() as session:
            query = select(self.model).where(self.model.published_at.is_(None))
            if ids is not None:
                query = query.where(self.model.id.in_(ids))
            if older_than is not None:
                query = query.where(self.model.created_at < utcnow() - older_than)
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
