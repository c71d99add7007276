"""The double-entry ledger: every movement is a transaction of entries that sum to zero.

Accounts:
  `external:buyer:<wallet>`   money from and back to a buyer's wallet (outside the platform)
  `escrow:<order>`            held for one order from payment until it is settled (then 0)
  `agent_payable:<agent>`     owed to an agent, until its payout is sent
  `buyer_refunds:<wallet>`    owed back to a buyer, until the refund is sent
  `platform_fees`             the platform's fee
  `external:agent:<agent>`    money paid out to an agent's wallet
"""
from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from shared.db import insert_or_skip, utcnow

from .models import LedgerEntry, LedgerTransaction

PLATFORM_FEES = "platform_fees"


def escrow(order_id: str) -> str:
    return f"escrow:{order_id}"


def buyer_wallet(wallet: str) -> str:
    return f"external:buyer:{wallet}"


def buyer_refunds(wallet: str) -> str:
    return f"buyer_refunds:{wallet}"


def agent_payable(agent_id: str) -> str:
    return f"agent_payable:{agent_id}"


def agent_wallet(agent_id: str) -> str:
    return f"external:agent:{agent_id}"


_RECORD = insert_or_skip(LedgerTransaction.__table__, ("key", "order_id", "kind", "created_at"), "key", ("id",))


def exists(session: Session, key: str) -> bool:
    return session.scalar(select(LedgerTransaction.id).where(LedgerTransaction.key == key)) is not None


def post(session: Session, key: str, order_id: str, kind: str, entries: dict[str, int]) -> bool:
    """Record a balanced transaction once: False if `key` is already recorded (by anyone; a
    concurrent recording of the same key is waited for, and then stands)."""
    entries = {account: cents for account, cents in entries.items() if cents}
    if sum(entries.values()) != 0:
        raise ValueError(f"ledger transaction {key} does not balance: {entries}")
    transaction_id = session.scalar(_RECORD, {"key": key, "order_id": order_id, "kind": kind, "created_at": utcnow()})
    if transaction_id is None:
        return False
    session.execute(LedgerEntry.__table__.insert(), [
        {"transaction_id": transaction_id, "account": account, "amount_cents": cents}
        for account, cents in entries.items()])
    return True


def balance(session: Session, account: str) -> int:
    return session.scalar(select(func.coalesce(func.sum(LedgerEntry.amount_cents), 0))
                          .where(LedgerEntry.account == account))


def unbalanced(session: Session) -> list[tuple[str, int]]:
    """Transactions whose entries do not sum to zero (there should be none)."""
    rows = session.execute(select(LedgerTransaction.key, func.sum(LedgerEntry.amount_cents))
                           .join(LedgerEntry, LedgerEntry.transaction_id == LedgerTransaction.id)
                           .group_by(LedgerTransaction.key)
                           .having(func.sum(LedgerEntry.amount_cents) != 0))
    return [(key, total) for key, total in rows]
