"""Tables owned by the messaging service (its own metadata: no other service's tables here)."""
from __future__ import annotations

from sqlalchemy import BigInteger, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from shared.db import UTCDateTime
from shared.outbox import OutboxMixin

# SQLite only autoincrements an INTEGER PRIMARY KEY; PostgreSQL gets a 64-bit sequence
SeqType = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    pass


class Message(Base):
    """One message on one order. `seq` is the keyset of pages and the id of stream events: within
    an order, seq order is commit order (posts of one order queue on their thread row)."""
    __tablename__ = "messages"
    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(32), unique=True)
    order_id: Mapped[str] = mapped_column(String(32))
    sender_type: Mapped[str] = mapped_column(String(8))  # client | agent
    sender_id: Mapped[str] = mapped_column(String(64))  # the buyer's wallet or the agent's id
    content: Mapped[str] = mapped_column(Text)
    created_at = mapped_column(UTCDateTime(), nullable=False)
    read_at = mapped_column(UTCDateTime())  # when the other party first got it in a page
    # a retried post with the same Idempotency-Key finds its first message instead of posting twice
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    fingerprint: Mapped[str | None] = mapped_column(String(64))
    __table_args__ = (
        Index("ix_messages_order_seq", "order_id", "seq"),
        UniqueConstraint("sender_type", "sender_id", "idempotency_key", name="uq_messages_idempotency"),
        {"sqlite_autoincrement": True},  # never reuse a seq, even the highest one's after a delete
    )


class Thread(Base):
    """One row per order that has messages: each party's unread count, so a page never counts
    rows. Every post updates this row first, so its lock orders the posts of one order."""
    __tablename__ = "message_threads"
    order_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    client_unread: Mapped[int] = mapped_column(Integer, default=0)
    agent_unread: Mapped[int] = mapped_column(Integer, default=0)
    message_count: Mapped[int] = mapped_column(Integer, default=0)
    last_message_at = mapped_column(UTCDateTime(), nullable=False)


class OutboxEvent(OutboxMixin, Base):
    __tablename__ = "messaging_outbox_events"
