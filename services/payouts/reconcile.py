"""`make reconcile`: check the ledger against the orders and the rail; print every mismatch.

Exit status 0 when everything agrees, 1 when anything does not, 2 when a source is unreachable.
Run it when the queues are quiet: a payout in flight shows as a mismatch until it lands."""
from __future__ import annotations

import argparse
import datetime as dt
import sys

import redis
from sqlalchemy import select

from shared.db import Database
from shared.internal import InternalClient, InternalError, Unavailable
from shared.money import format_usd, parse_usd
from shared.settings import Settings, load

from . import ledger
from .engine import settled_pages
from .models import Payout
from .rails import PayoutRail, RailError, make_rail

EPOCH = dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc)


def reconcile(db: Database, orders: InternalClient, rail: PayoutRail) -> tuple[list[str], dict]:
    problems: list[str] = []
    with db.transaction() as session:
        for key, total in ledger.unbalanced(session):
            problems.append(f"ledger transaction {key} sums to {format_usd(total)}, not 0.00")
        payouts = {p.id: p for p in session.scalars(select(Payout))}
        seen = set()
        orders_count = 0
        for item in (item for items in settled_pages(orders, EPOCH, 1000) for item in items):
            orders_count += 1
            order_id = item["order_id"]
            for kind, key in (("payout", "payout_due"), ("refund", "refund_due")):
                due = item.get(key)
                if due is None:
                    continue
                payout = payouts.get(due["id"])
                seen.add(due["id"])
                if payout is None:
                    problems.append(f"order {order_id}: {kind} {due['id']} of {due['amount_usd']} was never recorded")
                    continue
                if payout.amount_cents != parse_usd(due["amount_usd"]) or payout.kind != kind:
                    problems.append(f"order {order_id}: {kind} {payout.id} is {format_usd(payout.amount_cents)}, "
                                    f"the order says {due['amount_usd']}")
                if payout.status != "sent":
                    problems.append(f"order {order_id}: {kind} {payout.id} is {payout.status}, not sent")
                reported = (item.get("reported") or {}).get(kind)
                if reported is not None and reported != payout.status:
                    problems.append(f"order {order_id}: the order shows its {kind} {reported}, the payouts "
                                    f"worker has it {payout.status}")
            balance = ledger.balance(session, ledger.escrow(order_id))
            if balance != 0 and ledger.exists(session, f"settle:{order_id}"):
                problems.append(f"order {order_id}: escrow holds {format_usd(balance)} after settlement")
        for payout_id in payouts.keys() - seen:
            problems.append(f"payout {payout_id} (order {payouts[payout_id].order_id}) matches no settled order")
        for payout in payouts.values():
            if payout.status == "sent" and not ledger.exists(session, f"sent:{payout.id}"):
                problems.append(f"payout {payout.id} is sent but the ledger has no sent:{payout.id}")

    transfers = {}
    for transfer in rail.transfers():
        if not transfer.key.startswith("payout:"):
            continue
        transfers[transfer.key] = transfer
        payout = payouts.get(transfer.key.removeprefix("payout:"))
        if payout is None:
            problems.append(f"rail transfer {transfer.tx_ref} ({transfer.key}) matches no payout")
            continue
        if payout.status != "sent":
            problems.append(f"rail transfer {transfer.tx_ref} paid {payout.kind} {payout.id}, which is {payout.status}")
        if transfer.amount_cents != payout.amount_cents or transfer.destination != payout.destination:
            problems.append(f"rail transfer {transfer.tx_ref} moved {format_usd(transfer.amount_cents)} to "
                            f"{transfer.destination}; {payout.kind} {payout.id} is {format_usd(payout.amount_cents)} "
                            f"to {payout.destination}")
        if payout.tx_ref and payout.tx_ref != transfer.tx_ref:
            problems.append(f"{payout.kind} {payout.id} records {payout.tx_ref}, the rail made {transfer.tx_ref}")
    for payout in payouts.values():
        if payout.status == "sent" and payout.rail_key not in transfers:
            problems.append(f"{payout.kind} {payout.id} is sent but the rail has no transfer for {payout.rail_key}")
    summary = {"orders": orders_count, "payouts": len(payouts),
               "sent": sum(p.status == "sent" for p in payouts.values()), "rail_transfers": len(transfers)}
    return problems, summary


def main(argv: list[str] | None = None, settings: Settings | None = None) -> int:
    argparse.ArgumentParser(prog="make reconcile", description=__doc__).parse_args(argv)
    settings = settings or load()
    orders = InternalClient(settings.orders_url, settings.service_token, timeout=30)
    rail = make_rail(settings.replace(sandbox_rail_faults=""), orders,
                     redis.Redis.from_url(settings.redis_url))
    try:
        problems, summary = reconcile(Database(settings.payouts_db), orders, rail)
    except (Unavailable, InternalError, RailError) as exc:
        print(f"reconcile: cannot read the orders service or the rail: {exc}", file=sys.stderr)
        return 2
    for problem in problems:
        print(problem)
    print(f"{len(problems)} mismatches; {summary['orders']} settled orders, {summary['payouts']} payouts "
          f"({summary['sent']} sent), {summary['rail_transfers']} rail transfers")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
