"""Messages on an order: post, page through, mark read. No `request` here; the caller's party
(`client` or `agent`) and the order's access were settled by the view."""
from __future__ import annotations

import base64
import binascii
import hashlib
import re
from typing import Callable

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from shared.db import after_commit, insert, isoformat, utcnow
from shared.ids import new_id

from .models import Message, Thread

CLIENT, AGENT = "client", "agent"
OTHER = {CLIENT: AGENT, AGENT: CLIENT}
MESSAGE_EVENT = "order.message"
_CURSOR = re.compile(r"[A-Za-z0-9_-]{1,40}")
_SEQ = re.compile(r"(0|[1-9][0-9]{0,17})")


def present(message: Message) -> dict:
    return {"id": message.id, "sender_type": message.sender_type, "sender_id": message.sender_id,
            "content": message.content, "created_at": isoformat(message.created_at),
            "read_at": isoformat(message.read_at)}


# --- cursors -------------------------------------------------------------------------------

def encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"m{seq}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    """The seq an opaque cursor stands for; ValueError if it is not one of ours."""
    if not _CURSOR.fullmatch(cursor):
        raise ValueError("not a cursor")
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise ValueError("not a cursor") from None
    if not raw.startswith("m") or not _SEQ.fullmatch(raw[1:]):
        raise ValueError("not a cursor")
    return int(raw[1:])


def parse_event_id(value: str) -> int:
    """A stream position: an event id (the seq) or a page's cursor; ValueError otherwise."""
    value = value.strip()
    if _SEQ.fullmatch(value):
        return int(value)
    return decode_cursor(value)


# --- posting -------------------------------------------------------------------------------

def fingerprint(order_id: str, content: str) -> str:
    return hashlib.sha256(f"{order_id}\n{content}".encode()).hexdigest()


def find_by_idempotency_key(session: Session, party: str, sender_id: str, key: str) -> Message | None:
    return session.scalar(select(Message).where(Message.sender_type == party, Message.sender_id == sender_id,
                                                Message.idempotency_key == key))


def post_message(session: Session, outbox, order_id: str, party: str, sender_id: str, content: str,
                 idempotency_key: str | None = None,
                 announce: Callable[[str, int], None] | None = None) -> Message:
    """Store a message; after the commit, `announce(order_id, seq)` wakes the live streams and the
    message is relayed as an `order.message` event."""
    now = utcnow()
    # the thread row first: its lock makes the posts of one order commit in seq order, so a
    # reader who has seen seq n can never later find a new message below n
    _count_post(session, order_id, party, now)
    message = Message(id=new_id("message"), order_id=order_id, sender_type=party, sender_id=sender_id,
                      content=content, created_at=now, idempotency_key=idempotency_key,
                      fingerprint=fingerprint(order_id, content) if idempotency_key else None)
    session.add(message)
    session.flush()  # the seq, assigned under the lock
    if announce is not None:  # registered before the outbox's relay: live readers first
        seq = message.seq
        after_commit(session, lambda: announce(order_id, seq))
    # the agent hears about the buyer's messages (webhooks), the buyer about the agent's (notifications)
    outbox.record(session, MESSAGE_EVENT, {
        "order_id": order_id, "message_id": message.id, "sender_type": party, "sender_id": sender_id,
        "content": content, "created_at": isoformat(now)}, order_id=order_id, sequence=0)
    return message


def _count_post(session: Session, order_id: str, party: str, now) -> None:
    to_client, to_agent = int(party == AGENT), int(party == CLIENT)
    upsert = insert(session, Thread).values(order_id=order_id, client_unread=to_client, agent_unread=to_agent,
                                            message_count=1, last_message_at=now)
    session.execute(upsert.on_conflict_do_update(index_elements=[Thread.order_id], set_={
        "client_unread": Thread.client_unread + to_client, "agent_unread": Thread.agent_unread + to_agent,
        "message_count": Thread.message_count + 1, "last_message_at": now}))


# --- reading -------------------------------------------------------------------------------

def page(session: Session, order_id: str, after_seq: int, limit: int) -> list[Message]:
    """Oldest first after `after_seq`: an index range scan on (order_id, seq), whatever the order's size."""
    return list(session.scalars(select(Message).where(Message.order_id == order_id, Message.seq > after_seq)
                                .order_by(Message.seq).limit(limit)))


def last_seq(session: Session, order_id: str) -> int:
    return session.scalar(select(func.max(Message.seq)).where(Message.order_id == order_id)) or 0


def to_mark(messages: list[Message], reader: str | None) -> list[int]:
    """The seqs in a page that the reader has just read for the first time."""
    if reader is None:
        return []
    return [m.seq for m in messages if m.sender_type == OTHER[reader] and m.read_at is None]


def unread_count(session: Session, order_id: str, reader: str | None) -> int:
    if reader is None:
        return 0
    thread = session.get(Thread, order_id)
    return max(0, getattr(thread, f"{reader}_unread")) if thread is not None else 0


def mark_read(session: Session, order_id: str, reader: str, seqs: list[int], messages: list[Message]) -> int:
    """Mark these messages read by `reader`, update the page in place, and return the reader's
    unread count after it. Only rows still unread are counted, so two readers of one page (two
    tabs) take it off the count once."""
    now = utcnow()
    marked = set(session.scalars(
        update(Message).where(Message.seq.in_(seqs), Message.order_id == order_id, Message.read_at.is_(None))
        .values(read_at=now).returning(Message.seq).execution_options(synchronize_session=False)).all())
    column = getattr(Thread, f"{reader}_unread")
    unread = session.scalar(update(Thread).where(Thread.order_id == order_id)
                            .values({column: column - len(marked)}).returning(column)
                            .execution_options(synchronize_session=False))
    raced = [s for s in seqs if s not in marked]  # marked read by a concurrent page meanwhile
    read_at = dict(session.execute(select(Message.seq, Message.read_at).where(Message.seq.in_(raced))).all()) \
        if raced else {}
    for message in messages:
        if message.seq in marked:
            message.read_at = now
        elif message.seq in read_at:
            message.read_at = read_at[message.seq]
    return max(0, unread or 0)

