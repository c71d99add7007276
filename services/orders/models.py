"""Tables owned by the orders service."""
from __future__ import annotations

from sqlalchemy import JSON, Boolean, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from shared.db import Base, UTCDateTime, utcnow
from shared.outbox import OutboxMixin


class Agent(Base):
    __tablename__ = "agents"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    api_key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    payout_wallet: Mapped[str | None] = mapped_column(String(64))
    payout_chain: Mapped[str | None] = mapped_column(String(16))
    endpoint_url: Mapped[str | None] = mapped_column(String(2048))
    webhook_secret: Mapped[str | None] = mapped_column(String(128))
    # after a rotation the old secret signs too, until it expires
    previous_webhook_secret: Mapped[str | None] = mapped_column(String(128))
    previous_secret_expires_at = mapped_column(UTCDateTime())
    event_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # the feed's last position
    # reputation, updated in the transaction of the review or completion that changes it
    review_count: Mapped[int] = mapped_column(Integer, default=0)
    rating_sum: Mapped[int] = mapped_column(Integer, default=0)
    rating_1: Mapped[int] = mapped_column(Integer, default=0)
    rating_2: Mapped[int] = mapped_column(Integer, default=0)
    rating_3: Mapped[int] = mapped_column(Integer, default=0)
    rating_4: Mapped[int] = mapped_column(Integer, default=0)
    rating_5: Mapped[int] = mapped_column(Integer, default=0)
    completed_orders: Mapped[int] = mapped_column(Integer, default=0)
    total_orders: Mapped[int] = mapped_column(Integer, default=0)
    created_at = mapped_column(UTCDateTime(), nullable=False, default=utcnow)
    updated_at = mapped_column(UTCDateTime(), nullable=False, default=utcnow, onupdate=utcnow)


class Service(Base):
    __tablename__ = "services"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    agent_id: Mapped[str] = mapped_column(ForeignKey("agents.id"), index=True)
    title: Mapped[str] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(Text)
    price_type: Mapped[str] = mapped_column(String(16))
    price_cents: Mapped[int | None] = mapped_column(Integer)
    turnaround_hours: Mapped[int] = mapped_column(Integer)
    max_revisions: Mapped[int] = mapped_column(Integer)
    quota_limit: Mapped[int] = mapped_column(Integer, default=0)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at = mapped_column(UTCDateTime(), nullable=False, default=utcnow)


class Order(Base):
    __tablename__ = "orders"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    status: Mapped[str] = mapped_column(String(32))
    service_id: Mapped[str] = mapped_column(ForeignKey("services.id"))
    agent_id: Mapped[str] = mapped_column(ForeignKey("agents.id"))
    client_wallet: Mapped[str] = mapped_column(String(64))
    client_chain: Mapped[str] = mapped_column(String(16))
    price_type: Mapped[str] = mapped_column(String(16))
    brief: Mapped[str] = mapped_column(Text)
    reference_urls: Mapped[list] = mapped_column(JSON, default=list)
    quoted_price_cents: Mapped[int | None] = mapped_column(Integer)
    escrow_tx_hash: Mapped[str | None] = mapped_column(String(128), unique=True)
    revision_count: Mapped[int] = mapped_column(Integer, default=0)
    max_revisions: Mapped[int] = mapped_column(Integer)
    turnaround_hours: Mapped[int] = mapped_column(Integer)
    delivery_count: Mapped[int] = mapped_column(Integer, default=0)
    event_sequence: Mapped[int] = mapped_column(Integer, default=0)
    paid_at = mapped_column(UTCDateTime())
    due_at = mapped_column(UTCDateTime())
    review_deadline_at = mapped_column(UTCDateTime())
    completed_at = mapped_column(UTCDateTime())
    cancelled_at = mapped_column(UTCDateTime())
    # how the held money was settled: agent part and buyer part, in cents
    settled_agent_cents: Mapped[int | None] = mapped_column(Integer)
    settled_buyer_cents: Mapped[int | None] = mapped_column(Integer)
    settled_at = mapped_column(UTCDateTime(), index=True)  # when a paid order reached its end
    # a weekly or monthly order renewed from the previous period's order, and the one renewing it
    previous_order_id: Mapped[str | None] = mapped_column(String(32))
    next_order_id: Mapped[str | None] = mapped_column(String(32))
    created_at = mapped_column(UTCDateTime(), nullable=False, default=utcnow)
    updated_at = mapped_column(UTCDateTime(), nullable=False, default=utcnow)
    version: Mapped[int] = mapped_column(Integer, nullable=False)

    # two writers on one order: the second's UPDATE matches no row and fails
    __mapper_args__ = {"version_id_col": version}
    __table_args__ = (
        Index("ix_orders_client_created", "client_wallet", "created_at", "id"),
        Index("ix_orders_agent_status", "agent_id", "status", "created_at"),
    )

    # every view shows the timeline and review; deliveries and revisions are loaded only when the
    # order has some (delivery_count, revision_count say so without a query)
    timeline: Mapped[list["TimelineEntry"]] = relationship(
        order_by="TimelineEntry.number", lazy="selectin", cascade="all, delete-orphan")
    deliveries: Mapped[list["Delivery"]] = relationship(
        order_by="Delivery.number", lazy="select", cascade="all, delete-orphan")
    revisions: Mapped[list["Revision"]] = relationship(
        order_by="Revision.number", lazy="select", cascade="all, delete-orphan")
    review: Mapped["Review | None"] = relationship(lazy="joined", uselist=False)
    # the payout and/or refund of a settled order, as the payouts worker reports them
    settlements: Mapped[list["Settlement"]] = relationship(
        order_by="Settlement.kind", lazy="select", cascade="all, delete-orphan")
    # weekly and monthly orders open one once paid (loaded only for those: price_type says so)
    workspace: Mapped["Workspace | None"] = relationship(lazy="select", uselist=False, cascade="all, delete-orphan")


class TimelineEntry(Base):
    __tablename__ = "order_timeline"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    order_id: Mapped[str] = mapped_column(ForeignKey("orders.id"))  # found through the unique (order_id, …) below
    number: Mapped[int] = mapped_column(Integer)
    action: Mapped[str] = mapped_column(String(32))
    from_status: Mapped[str | None] = mapped_column(String(32))
    to_status: Mapped[str] = mapped_column(String(32))
    actor_type: Mapped[str] = mapped_column(String(16))
    actor_id: Mapped[str | None] = mapped_column(String(64))
    note: Mapped[str | None] = mapped_column(Text)
    at = mapped_column(UTCDateTime(), nullable=False)
    __table_args__ = (UniqueConstraint("order_id", "number"),)


class Delivery(Base):
    __tablename__ = "deliveries"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    order_id: Mapped[str] = mapped_column(ForeignKey("orders.id"))  # found through the unique (order_id, …) below
    number: Mapped[int] = mapped_column(Integer)
    created_at = mapped_column(UTCDateTime(), nullable=False)
    items: Mapped[list["DeliveryItem"]] = relationship(
        order_by="DeliveryItem.position", lazy="joined", cascade="all, delete-orphan")
    __table_args__ = (UniqueConstraint("order_id", "number"),)


class DeliveryItem(Base):
    """A delivered file or link. A workspace generation's result is an item with no delivery
    until the workspace closes and its generations become the order's delivery."""
    __tablename__ = "delivery_items"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    delivery_id: Mapped[str | None] = mapped_column(ForeignKey("deliveries.id"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    media_type: Mapped[str] = mapped_column(String(16))
    title: Mapped[str | None] = mapped_column(String(200))
    url: Mapped[str | None] = mapped_column(String(2048))
    preview_status: Mapped[str | None] = mapped_column(String(16))
    # a file the agent uploaded, or the copy the media worker fetched of an image URL
    upload_id: Mapped[str | None] = mapped_column(String(32))
    storage_key: Mapped[str | None] = mapped_column(String(255))
    content_type: Mapped[str | None] = mapped_column(String(100))
    size: Mapped[int | None] = mapped_column(Integer)
    sha256: Mapped[str | None] = mapped_column(String(64))
    preview_key: Mapped[str | None] = mapped_column(String(255))
    preview_error: Mapped[str | None] = mapped_column(Text)


class Workspace(Base):
    """A weekly or monthly order's period of `generate` calls. The counters change only in SQL
    (conditional UPDATEs), so concurrent calls in any number of processes add up exactly."""
    __tablename__ = "workspaces"
    order_id: Mapped[str] = mapped_column(ForeignKey("orders.id"), primary_key=True)
    opened_at = mapped_column(UTCDateTime(), nullable=False)
    expires_at = mapped_column(UTCDateTime(), nullable=False)
    closed_at = mapped_column(UTCDateTime())
    quota_total: Mapped[int] = mapped_column(Integer)  # 0 = unlimited
    quota_used: Mapped[int] = mapped_column(Integer, default=0)  # pending + completed generations
    generations_pending: Mapped[int] = mapped_column(Integer, default=0)
    __table_args__ = (Index("ix_workspaces_open", "closed_at", "expires_at"),)


class Generation(Base):
    """One `generate` call: the buyer's prompt, then the agent's result (an item) or failure."""
    __tablename__ = "generations"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    order_id: Mapped[str] = mapped_column(ForeignKey("orders.id"))
    agent_id: Mapped[str] = mapped_column(String(32))
    prompt: Mapped[str] = mapped_column(Text)
    # pending → completed | failed | timed_out (no answer in time) | expired (workspace closed first)
    status: Mapped[str] = mapped_column(String(16))
    created_at = mapped_column(UTCDateTime(), nullable=False)
    dispatched_at = mapped_column(UTCDateTime())  # when the agent was told
    deadline_at = mapped_column(UTCDateTime())  # answer by then, or the unit of quota goes back
    answered_at = mapped_column(UTCDateTime())
    error: Mapped[str | None] = mapped_column(Text)
    item_id: Mapped[str | None] = mapped_column(ForeignKey("delivery_items.id"))
    item: Mapped["DeliveryItem | None"] = relationship(lazy="joined")
    __table_args__ = (
        Index("ix_generations_order", "order_id", "created_at", "id"),
        Index("ix_generations_agent", "agent_id", "status", "created_at", "id"),
        Index("ix_generations_due", "status", "deadline_at"),
    )


class Upload(Base):
    """A file an agent uploaded, typed by its bytes, waiting to go into one delivery."""
    __tablename__ = "uploads"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    agent_id: Mapped[str] = mapped_column(ForeignKey("agents.id"), index=True)
    storage_key: Mapped[str] = mapped_column(String(255))
    media_type: Mapped[str] = mapped_column(String(16))
    content_type: Mapped[str] = mapped_column(String(100))
    size: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    filename: Mapped[str | None] = mapped_column(String(255))
    item_id: Mapped[str | None] = mapped_column(String(32))  # the delivery item it went into
    created_at = mapped_column(UTCDateTime(), nullable=False)


class Revision(Base):
    __tablename__ = "revisions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    order_id: Mapped[str] = mapped_column(ForeignKey("orders.id"))  # found through the unique (order_id, …) below
    number: Mapped[int] = mapped_column(Integer)
    feedback: Mapped[str] = mapped_column(Text)
    is_extra: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at = mapped_column(UTCDateTime(), nullable=False)
    __table_args__ = (UniqueConstraint("order_id", "number"),)


class Review(Base):
    __tablename__ = "reviews"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    order_id: Mapped[str] = mapped_column(ForeignKey("orders.id"), unique=True)
    agent_id: Mapped[str] = mapped_column(ForeignKey("agents.id"), index=True)
    client_wallet: Mapped[str] = mapped_column(String(64))
    rating: Mapped[int] = mapped_column(Integer)
    comment: Mapped[str | None] = mapped_column(Text)
    created_at = mapped_column(UTCDateTime(), nullable=False)


class Timer(Base):
    """Far-future work: a due time that a beat sweep claims and fires."""
    __tablename__ = "order_timers"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    order_id: Mapped[str] = mapped_column(ForeignKey("orders.id"), index=True)
    kind: Mapped[str] = mapped_column(String(32))  # the system action it fires
    due_at = mapped_column(UTCDateTime(), nullable=False)
    fired_at = mapped_column(UTCDateTime())
    __table_args__ = (Index("ix_order_timers_due", "fired_at", "due_at"),)


class Settlement(Base):
    """The orders service's copy of a payout or refund: created pending when a paid order ends,
    then updated by the payouts worker's reports (newer `version` wins)."""
    __tablename__ = "order_settlements"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # the payout id (pay_...)
    order_id: Mapped[str] = mapped_column(ForeignKey("orders.id"))  # found through the unique (order_id, …) below
    kind: Mapped[str] = mapped_column(String(16))  # payout | refund
    status: Mapped[str] = mapped_column(String(16))
    amount_cents: Mapped[int] = mapped_column(Integer)
    fee_cents: Mapped[int] = mapped_column(Integer, default=0)
    tx_ref: Mapped[str | None] = mapped_column(String(128))
    error: Mapped[str | None] = mapped_column(Text)
    version: Mapped[int] = mapped_column(Integer, default=0)
    updated_at = mapped_column(UTCDateTime(), nullable=False)
    __table_args__ = (UniqueConstraint("order_id", "kind"),)


class WebhookDelivery(Base):
    """One order event for one agent: its catch-up feed entry and its webhook delivery."""
    __tablename__ = "webhook_deliveries"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # X-Webhook-Delivery
    agent_id: Mapped[str] = mapped_column(ForeignKey("agents.id"))
    position: Mapped[int] = mapped_column(Integer)  # in the agent's feed, in commit order
    event_id: Mapped[str] = mapped_column(String(32))
    event: Mapped[str] = mapped_column(String(64))
    order_id: Mapped[str] = mapped_column(String(32))
    sequence: Mapped[int] = mapped_column(Integer)
    body: Mapped[str] = mapped_column(Text)  # the exact JSON sent, the same on every attempt
    status: Mapped[str] = mapped_column(String(16))  # pending | delivered | failed | no_endpoint
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    next_attempt_at = mapped_column(UTCDateTime())
    retry_until = mapped_column(UTCDateTime(), nullable=False)
    created_at = mapped_column(UTCDateTime(), nullable=False)
    delivered_at = mapped_column(UTCDateTime())
    __table_args__ = (
        UniqueConstraint("agent_id", "event_id"),
        UniqueConstraint("agent_id", "position"),
        Index("ix_webhook_deliveries_log", "agent_id", "created_at", "id"),
        Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),
    )


class Notification(Base):
    """Something that happened on a buyer's order, for the buyer to read."""
    __tablename__ = "notifications"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    wallet: Mapped[str] = mapped_column(String(64))
    order_id: Mapped[str] = mapped_column(String(32))
    kind: Mapped[str] = mapped_column(String(32))
    text: Mapped[str] = mapped_column(Text)
    event_id: Mapped[str] = mapped_column(String(32))
    created_at = mapped_column(UTCDateTime(), nullable=False)
    read_at = mapped_column(UTCDateTime())
    __table_args__ = (
        UniqueConstraint("wallet", "event_id"),
        Index("ix_notifications_wallet", "wallet", "created_at", "id"),
        Index("ix_notifications_unread", "wallet", "read_at"),
    )


class SandboxTransfer(Base):
    """Play money: buyers' payments for the sandbox verifier, and the sandbox payout rail's
    transfers (those carry the rail call's idempotency key)."""
    __tablename__ = "sandbox_transfers"
    tx_hash: Mapped[str] = mapped_column(String(128), primary_key=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(128), unique=True, index=True)
    from_wallet: Mapped[str] = mapped_column(String(64))
    to_address: Mapped[str] = mapped_column(String(64))
    amount_cents: Mapped[int] = mapped_column(Integer)
    asset: Mapped[str] = mapped_column(String(16))
    chain: Mapped[str] = mapped_column(String(16))
    created_at = mapped_column(UTCDateTime(), nullable=False)


class IdempotencyRecord(Base):
    __tablename__ = "idempotency_keys"
    caller: Mapped[str] = mapped_column(String(100), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64))
    status: Mapped[int] = mapped_column(Integer)
    body: Mapped[str] = mapped_column(Text)
    created_at = mapped_column(UTCDateTime(), nullable=False, index=True)


class OutboxEvent(OutboxMixin, Base):
    __tablename__ = "outbox_events"
