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

from shared.db import insert_or_skip, row_params, utcnow

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


_COLUMNS = ("key", "order_id", "kind", "created_at")
_RECORD = {1: insert_or_skip(LedgerTransaction.__table__, _COLUMNS, "key", ("id", "key"))}


def exists(session: Session, key: str) -> bool:
    return session.scalar(select(LedgerTransaction.id).where(LedgerTransaction.key == key)) is not None


def post(session: Session, key: str, order_id: str, kind: str, entries: dict[str, int]) -> bool:
    """Record a balanced transaction once: False if `key` is already recorded (by anyone; a
    concurrent recording of the same key is waited for, and then stands)."""
    return key in post_many(session, [(key, order_id, kind, entries)])


def post_many(session: Session, postings: list[tuple[str, str, str, dict[str, int]]]) -> set[str]:
    """post() for several transactions (key, order_id, kind, entries) in two statements; returns
    the keys recorded now (those already recorded are left as they are)."""
    rows, entries_of, now = [], {}, utcnow()
    for key, order_id, kind, entries in postings:
        entries = checked(key, entries)
        rows.append({"key": key, "order_id": order_id, "kind": kind, "created_at": now})
        entries_of[key] = entries
    if len(rows) not in _RECORD:
        _RECORD[len(rows)] = insert_or_skip(LedgerTransaction.__table__, _COLUMNS, "key", ("id", "key"), len(rows))
    params = rows[0] if len(rows) == 1 else row_params(rows)
    recorded = {key: transaction_id for transaction_id, key in session.execute(_RECORD[len(rows)], params)}
    lines = [{"transaction_id": transaction_id, "account": account, "amount_cents": cents}
             for key, transaction_id in recorded.items() for account, cents in entries_of[key].items()]
    if lines:
        session.execute(LedgerEntry.__table__.insert(), lines)
    return set(recorded)


def checked(key: str, entries: dict[str, int]) -> dict[str, int]:
    """A transaction's entries without the empty ones; ValueError unless they sum to zero."""
    entries = {account: cents for account, cents in entries.items() if cents}
    if sum(entries.values()) != 0:
        raise ValueError(f"ledger transaction {key} does not balance: {entries}")
    return entries


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
