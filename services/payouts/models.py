"""Tables owned by the payouts worker (its own metadata: no other service's tables here)."""
from __future__ import annotations

from sqlalchemy import ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from shared.db import UTCDateTime


class Base(DeclarativeBase):
    pass


def rail_key(payout_id: str) -> str:
    """The idempotency key of every rail call for a payout: one transfer, however many calls."""
    return f"payout:{payout_id}"


class Payout(Base):
    """Money owed to one party of one order: the agent's payout or the buyer's refund.

    `version` grows with every change the orders service should hear about; `reported_version`
    is the last one it acknowledged, so a lost report is sent again by the sweep."""
    __tablename__ = "payouts"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # chosen by the orders service
    order_id: Mapped[str] = mapped_column(String(32))
    kind: Mapped[str] = mapped_column(String(16))  # payout | refund
    agent_id: Mapped[str | None] = mapped_column(String(32), index=True)
    chain: Mapped[str | None] = mapped_column(String(16))
    destination: Mapped[str | None] = mapped_column(String(64))
    amount_cents: Mapped[int] = mapped_column(Integer)
    fee_cents: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str] = mapped_column(String(16))  # pending | sent | blocked | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at = mapped_column(UTCDateTime())
    last_error: Mapped[str | None] = mapped_column(Text)
    tx_ref: Mapped[str | None] = mapped_column(String(128))
    version: Mapped[int] = mapped_column(Integer, default=1)
    reported_version: Mapped[int] = mapped_column(Integer, default=0)
    created_at = mapped_column(UTCDateTime(), nullable=False)
    updated_at = mapped_column(UTCDateTime(), nullable=False)
    sent_at = mapped_column(UTCDateTime())
    __table_args__ = (
        UniqueConstraint("order_id", "kind"),
        Index("ix_payouts_status_due", "status", "next_attempt_at"),
    )

    @property
    def rail_key(self) -> str:
        return rail_key(self.id)


class LedgerTransaction(Base):
    """One balanced movement of money; `key` makes recording it twice impossible."""
    __tablename__ = "ledger_transactions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    key: Mapped[str] = mapped_column(String(100), unique=True)
    order_id: Mapped[str] = mapped_column(String(32), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # fund | settle | sent
    created_at = mapped_column(UTCDateTime(), nullable=False)
    entries: Mapped[list["LedgerEntry"]] = relationship(cascade="all, delete-orphan", lazy="selectin")


class LedgerEntry(Base):
    """A signed amount on one account: debits positive, credits negative; a transaction sums to 0."""
    __tablename__ = "ledger_entries"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    transaction_id: Mapped[int] = mapped_column(ForeignKey("ledger_transactions.id"), index=True)
    account: Mapped[str] = mapped_column(String(100), index=True)
    amount_cents: Mapped[int] = mapped_column(Integer)


class RailCall(Base):
    """Each call to the payout rail, with the idempotency key it carried and what came of it."""
    __tablename__ = "rail_calls"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    payout_id: Mapped[str] = mapped_column(ForeignKey("payouts.id"), index=True)
    idempotency_key: Mapped[str] = mapped_column(String(128))
    attempt: Mapped[int] = mapped_column(Integer)
    # started | sent | failed | rejected | ambiguous | found (an ambiguous call the rail confirmed)
    outcome: Mapped[str] = mapped_column(String(16))
    tx_ref: Mapped[str | None] = mapped_column(String(128))
    error: Mapped[str | None] = mapped_column(Text)
    started_at = mapped_column(UTCDateTime(), nullable=False)
    finished_at = mapped_column(UTCDateTime())


class ProcessedEvent(Base):
    """Order events already taken: a redelivered message is recognised by its event id."""
    __tablename__ = "payouts_processed_events"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    processed_at = mapped_column(UTCDateTime(), nullable=False, index=True)


class SyncState(Base):
    """How far the catch-up sweep has read the orders service's feed of settled orders."""
    __tablename__ = "payouts_sync_state"
    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    at = mapped_column(UTCDateTime(), nullable=False)
