"""Live messages over Server-Sent Events, whichever messaging process took the post.

A committed post is announced on the order's Redis channel (`messaging:order:<id>`, the seq as
payload). A stream subscribes first, then sends what is stored after the client's position
(`Last-Event-ID`), then, on every announcement, whatever is stored after the last seq it sent.
The database stays the one source: an announcement is only a wake-up, so announcements that
arrive late, twice or out of order cannot reorder, repeat or skip a message (posts of one order
commit in seq order, see services.post_message).
"""
from __future__ import annotations

import json
import logging
import time
from typing import Iterator

import redis
from sqlalchemy.exc import SQLAlchemyError

from shared.db import Database

from . import services

log = logging.getLogger(__name__)
BATCH = 100
RECONNECT_MS = 2000


def channel(order_id: str) -> str:
    return f"messaging:order:{order_id}"


class Announcer:
    def __init__(self, client: redis.Redis):
        self.client = client

    def announce(self, order_id: str, seq: int) -> None:
        """After commit: wake up the streams of this order in every process."""
        try:
            self.client.publish(channel(order_id), str(seq))
        except redis.RedisError:  # streams catch up on the next announcement or reconnection
            log.warning("could not announce message %s of %s", seq, order_id, exc_info=True)


def event(message) -> str:
    data = json.dumps(services.present(message), separators=(",", ":"))
    return f"id: {message.seq}\nevent: message\ndata: {data}\n\n"


class MessageStream:
    """One client's stream. `open()` subscribes (before anything is read, so nothing committed
    from then on can be missed); iterating yields the SSE text."""

    def __init__(self, db: Database, pubsub_client: redis.Redis, order_id: str, after_seq: int | None,
                 heartbeat_seconds: float, max_seconds: float):
        self.db = db
        self.client = pubsub_client
        self.order_id = order_id
        self.after_seq = after_seq
        self.heartbeat = max(0.05, heartbeat_seconds)
        self.max_seconds = max_seconds
        self.pubsub = None

    def open(self) -> "MessageStream":
        pubsub = self.client.pubsub(ignore_subscribe_messages=False)
        try:
            pubsub.subscribe(channel(self.order_id))
            # wait for the confirmation: from here on every announcement reaches us
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                reply = pubsub.get_message(timeout=max(0.0, deadline - time.monotonic()))
                if reply is not None and reply["type"] == "subscribe":
                    break
            else:
                raise redis.TimeoutError("no subscribe confirmation")
        except BaseException:
            pubsub.close()
            raise
        self.pubsub = pubsub
        if self.after_seq is None:  # no position given: only what comes from now on
            with self.db.read_sessionmaker() as session:
                self.after_seq = services.last_seq(session, self.order_id)
        return self

    def _stored_after(self) -> Iterator[str]:
        while True:
            with self.db.read_sessionmaker() as session:
                batch = services.page(session, self.order_id, self.after_seq, BATCH)
            for message in batch:
                self.after_seq = message.seq
                yield event(message)
            if len(batch) < BATCH:
                return

    def _wait(self, timeout: float) -> bool:
        """True once an announcement came (those already waiting behind it are taken too)."""
        if self.pubsub.get_message(ignore_subscribe_messages=True, timeout=timeout) is None:
            return False
        while self.pubsub.get_message(ignore_subscribe_messages=True, timeout=0.0) is not None:
            pass  # one read of the database covers them all
        return True

    def __iter__(self) -> Iterator[str]:
        try:
            yield f"retry: {RECONNECT_MS}\n\n"
            yield from self._stored_after()
            started = time.monotonic()
            deadline = started + self.max_seconds
            next_beat = started + self.heartbeat
            while (now := time.monotonic()) < deadline:
                if self._wait(max(0.0, min(next_beat, deadline) - now)):
                    yield from self._stored_after()
                elif time.monotonic() >= next_beat:
                    yield ": keep-alive\n\n"
                    next_beat = time.monotonic() + self.heartbeat
        except (redis.RedisError, SQLAlchemyError):  # headers are sent: ending the stream is all that is left
            log.warning("stream of %s broke off; the client reconnects", self.order_id, exc_info=True)
        finally:
            self.close()

    def close(self) -> None:
        pubsub, self.pubsub = self.pubsub, None
        if pubsub is not None:
            try:
                pubsub.close()
            except Exception:
                pass
