"""Payment verifiers: did this transaction pay this order? One interface, chosen by setting."""
from __future__ import annotations

import secrets
from dataclasses import dataclass
from types import SimpleNamespace

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared import errors
from shared.db import Database, insert_or_skip, utcnow
from shared.settings import Settings

from .chains import WRONG_PAYER, BaseVerifier, SolanaVerifier
from .models import SandboxTransfer

ASSET = "USDC"


@dataclass(frozen=True)
class Expected:
    amount_cents: int
    destination: str
    asset: str
    chain: str
    payer: str  # the buyer's wallet: a transfer from anyone else pays no order of theirs


def destination_for(chain: str, settings: Settings) -> str:
    return settings.treasury_solana if chain == "solana" else settings.treasury_base


class SandboxVerifier:
    """Checks a transfer made through /api/sandbox/transfers with the same rules as a chain."""

    name = "sandbox"

    def __init__(self, settings: Settings | None = None):
        self.settings = settings

    def verify(self, session: Session, tx_hash: str, expected: Expected) -> None:
        transfer = session.get(SandboxTransfer, tx_hash)
        if transfer is None or transfer.idempotency_key is not None:  # a payout rail transfer pays no order
            raise errors.PaymentUnverified("No such transaction.", {"reason": "unknown_transaction"})
        problems = []
        if transfer.chain != expected.chain:
            problems.append(f"chain is {transfer.chain}, expected {expected.chain}")
        if transfer.asset != expected.asset:
            problems.append(f"asset is {transfer.asset}, expected {expected.asset}")
        if transfer.to_address != expected.destination:
            problems.append("destination is not the escrow treasury")
        if transfer.amount_cents != expected.amount_cents:
            problems.append("amount does not match the quoted price")
        if transfer.from_wallet != expected.payer:
            problems.append(WRONG_PAYER)
        if problems:
            raise errors.PaymentUnverified("The transaction does not pay this order: " + "; ".join(problems) + ".",
                                           {"reason": "mismatch", "problems": problems})


VERIFIERS = {"sandbox": SandboxVerifier, "solana": SolanaVerifier, "base": BaseVerifier}


def make_verifier(settings: Settings):
    try:
        verifier = VERIFIERS[settings.payment_verifier]
    except KeyError:
        raise ValueError(f"PAYMENT_VERIFIER={settings.payment_verifier!r} is not one of {sorted(VERIFIERS)}") from None
    return verifier(settings)


def _tx_hash() -> str:
    return "sbx_" + secrets.token_hex(32)


def record_sandbox_transfer(session: Session, from_wallet: str, to: str, amount_cents: int, asset: str,
                            chain: str) -> SandboxTransfer:
    transfer = SandboxTransfer(tx_hash=_tx_hash(), from_wallet=from_wallet, to_address=to, amount_cents=amount_cents,
                               asset=asset, chain=chain, created_at=utcnow())
    session.add(transfer)
    return transfer


_TRANSFER_COLUMNS = ("tx_hash", "idempotency_key", "from_wallet", "to_address", "amount_cents", "asset", "chain",
                     "created_at")
_RAIL_TRANSFER = insert_or_skip(SandboxTransfer.__table__, _TRANSFER_COLUMNS, "idempotency_key", _TRANSFER_COLUMNS)


def rail_transfer(db: Database, key: str, from_wallet: str, to: str, amount_cents: int, asset: str, chain: str):
    """The sandbox payout rail's one transfer for `key`: made now, or the one an earlier call made
    (a concurrent call with the same key is waited for, and its transfer stands). One INSERT … ON
    CONFLICT, atomic by itself (Database.row_of); a repeated key is then read back."""
    params = {"tx_hash": _tx_hash(), "idempotency_key": key, "from_wallet": from_wallet, "to_address": to,
              "amount_cents": amount_cents, "asset": asset, "chain": chain, "created_at": utcnow()}
    made = db.row_of(_RAIL_TRANSFER, params)
    if made is not None:
        return SimpleNamespace(**made)
    with db.read_sessionmaker() as session:
        return rail_transfer_by_key(session, key)


def rail_transfer_by_key(session: Session, key: str) -> SandboxTransfer | None:
    return session.scalar(select(SandboxTransfer).where(SandboxTransfer.idempotency_key == key))
