"""What the payouts worker does, without Celery: record settlements, send payouts, report back.

Exactly once comes from three keys, not from the queue: a settlement is recorded once per order
(the ledger key `settle:<order>` and one payout row per order and kind), a payout moves money
once (every rail call carries the payout's key, and an unclear outcome is asked about, never
paid again), and the ledger records a sent payout once (`sent:<payout>`). Messages may be lost,
duplicated or redelivered after a kill; the sweep re-reads what the database says is unfinished.
"""
from __future__ import annotations

import datetime as dt
import logging
import random
from dataclasses import dataclass

from sqlalchemy import delete, select, text, update
from sqlalchemy.orm import Session

from shared.db import Database, insert_or_skip, isoformat, utcnow
from shared.internal import InternalClient, InternalError, Unavailable
from shared.money import parse_usd
from shared.settings import Settings

from . import ledger, oneshot
from .models import Payout, ProcessedEvent, RailCall, SyncState, rail_key
from .rails import PayoutRail, RailAmbiguous, RailError, RailRejected, RailUnavailable, Transfer

log = logging.getLogger(__name__)

# a claimed payout is not picked up again before this: the attempt is still running (or died)
def lease_seconds(settings: Settings) -> float:
    return 2 * settings.rail_timeout_seconds + 5


@dataclass(frozen=True)
class Attempt:
    """A claimed attempt at a payout: what the rail call needs, and the rail call's row."""
    payout_id: str
    call_id: int
    key: str
    destination: str
    amount_cents: int
    chain: str | None


@dataclass(frozen=True)
class Call:
    """A rail call made before anything about it was recorded (a settlement paid first)."""
    key: str
    outcome: str  # as RailCall.outcome
    transfer: Transfer | None
    error: str | None
    started_at: dt.datetime
    finished_at: dt.datetime


@dataclass
class Engine:
    settings: Settings
    db: Database
    orders: InternalClient
    rail: PayoutRail

    # --- settlements ---------------------------------------------------------------------

    def take_event(self, message: dict) -> list[str]:
        """Take one order event (idempotent by event id); returns the payouts now due to send."""
        return self._take(message, claim=False)

    def take_and_claim(self, message: dict) -> list[Attempt | str]:
        """take_event, with the first attempt of each new payout whose destination the event
        names (a refund's buyer wallet; the agent's payout wallet as of the completion) claimed in
        the same transaction, so it goes to the rail with no wallet lookup and no second
        transaction first. A payout without one (the agent had no wallet) comes back by id, for
        send() to look the wallet up."""
        return self._take(message, claim=True)

    def _take(self, message: dict, claim: bool) -> list[Attempt | str]:
        # Plain statements, not ORM objects: this transaction is on every payout's way to the rail.
        data = message.get("data") or {}
        with self.db.transaction() as session:
            if not _first_taking(session, message["id"]):  # taken before, or by another worker now
                return []
            if message["event"] == "order.paid":
                fund(session, data["order_id"], data["client_wallet"], parse_usd(data["held_usd"]))
                return []
            now = utcnow()
            leased_until = now + dt.timedelta(seconds=lease_seconds(self.settings)) if claim else None
            return [_attempt(session, row, now) if row["attempts"] else row["id"]
                    for row in settle(session, data, now, leased_until)]

    def pay_first(self, message: dict, first_sight: bool = False) -> dict[str, Call] | None:
        """The rail calls of a settling event, made before anything is written: one per payout
        whose destination the event names. None when the event takes the recorded way instead
        (a payment, no destination named, the event or its payouts seen before). Safe because
        every call carries the payout's key: a call made twice, or made by a worker that died
        before recording it, is still one transfer, recorded by whoever records it next.
        `first_sight` (shared.outbox.first_sight): the message is its event's hand-off, delivered
        for the first time, so nothing can have been recorded of it yet and the read that asks is
        skipped; a copy delivered at the same time pays under the same keys, as twins do."""
        if message["event"] == "order.paid":
            return None
        due = [p for p in _dues(message.get("data") or {}) if p["destination"]]
        if not due or (not first_sight and self._seen(message["id"], [p["id"] for p in due])):
            return None
        calls = {}
        for payout in due:
            key, started = rail_key(payout["id"]), utcnow()
            outcome, transfer, error = self._call_rail(key, payout["destination"], payout["amount_cents"],
                                                       payout["chain"])
            calls[payout["id"]] = Call(key, outcome, transfer, error, started, utcnow())
        return calls

    def record_paid(self, message: dict, calls: dict[str, Call]) -> list[tuple[str, str | None]]:
        """Record a settling event and the calls pay_first made for it, in one transaction: the
        settlement, each payout (sent already if its transfer was made), each call, and the `sent:`
        postings. A call that did not pay goes on as a claimed attempt that ended so (retried
        later, or failed). Returns each payout with its status now, or None for one still to send
        (its wallet is looked up then). Had the order been settled by another worker meanwhile, the
        transfers are recorded against its payouts."""
        if self.db.is_postgres and all(call.transfer is not None for call in calls.values()):
            # the usual case, in one statement; if it finds the event taken or the order settled
            # it writes nothing of the settlement, and the transfers are recorded as below
            now = utcnow()
            payouts, postings = settlement(message["data"], now, paid=calls)
            finished = [_call_row(payout_id, call, finished=True) for payout_id, call in calls.items()]
            if oneshot.record(self.db, message["id"], now, payouts, postings, finished)[1]:
                return [(p["id"], "sent" if p["id"] in calls else None) for p in payouts]
        return self._record_paid(message, calls)

    def _record_paid(self, message: dict, calls: dict[str, Call]) -> list[tuple[str, str | None]]:
        now = utcnow()
        leased_until = now + dt.timedelta(seconds=lease_seconds(self.settings))
        unfinished, results, finished = [], [], []
        with self.db.transaction() as session:
            created = {}
            if _first_taking(session, message["id"]):
                rows = settle(session, message["data"], now, leased_until, paid=calls)
                created = {row["id"]: row for row in rows}
            for row in created.values():
                if row["id"] not in calls:
                    results.append((row["id"], None if row["attempts"] == 0 else row["status"]))
            for payout_id, call in calls.items():
                row = created.get(payout_id)
                if row is None:  # another worker settled it: its payout takes this call's transfer
                    finished.append(_call_row(payout_id, call, finished=True))
                    if call.transfer is not None and record_sent(session, payout_id, call.transfer.tx_ref, now):
                        results.append((payout_id, "sent"))
                elif call.transfer is not None:
                    finished.append(_call_row(payout_id, call, finished=True))
                    results.append((payout_id, "sent"))
                else:  # finished below, as any claimed attempt is
                    call_id = session.scalar(RailCall.__table__.insert().values(
                        **_call_row(payout_id, call, finished=False)).returning(RailCall.__table__.c.id))
                    unfinished.append((payout_id, call_id, call))
            if finished:
                session.execute(RailCall.__table__.insert(), finished)
        for payout_id, call_id, call in unfinished:
            results.append((payout_id, self._finish(payout_id, call_id, call.outcome, None, call.error)))
        return results

    def _seen(self, event_id: str, payout_ids: list[str]) -> bool:
        """Whether the event was taken, or any of its payouts recorded, already."""
        first, second = (payout_ids + [None])[:2]  # an event names a payout, a refund, or both
        params = {"event_id": event_id, "first": first, "second": second}
        if self.db.is_postgres:  # straight through the driver: this read is on every payout's way
            return self.db.row_of(_SEEN, params) is not None
        with self.db.read_sessionmaker() as session:  # a read: no write lock on SQLite
            return session.execute(_SEEN, params).first() is not None

    def catch_up(self, grace_seconds: float = 30.0, overlap_seconds: float = 120.0, page: int = 500,
                 now: dt.datetime | None = None) -> int:
        """Read the orders service's feed of settled orders and record whatever a lost message
        left out. Settlements younger than the grace are left to their own event; each order is
        recorded in its own transaction, so the sweep never holds locks across orders. Re-reads a
        short overlap each time: a slow transaction may commit out of order."""
        cutoff = (now or utcnow()) - dt.timedelta(seconds=grace_seconds)
        with self.db.transaction() as session:
            state = session.get(SyncState, "settlements")
            since = (state.at - dt.timedelta(seconds=overlap_seconds)) if state else dt.datetime(
                2000, 1, 1, tzinfo=dt.timezone.utc)
        recorded, newest = 0, None
        for items in settled_pages(self.orders, since, page):
            fresh = len(items)
            items = [i for i in items if _parse_time(i["settled_at"]) <= cutoff]
            if not items:
                break
            with self.db.transaction() as session:
                known = set(session.scalars(select(Payout.order_id).where(
                    Payout.order_id.in_([i["order_id"] for i in items]))))
            for item in items:
                if item["order_id"] not in known and ("payout_due" in item or "refund_due" in item):
                    with self.db.transaction() as session:
                        recorded += bool(settle(session, item))
            newest = _parse_time(items[-1]["settled_at"])
            if len(items) < fresh:  # the rest is younger than the grace
                break
        if newest is not None:
            with self.db.transaction() as session:
                state = session.get(SyncState, "settlements")
                if state is None:
                    session.add(SyncState(name="settlements", at=newest))
                elif newest > state.at:
                    state.at = newest
        return recorded

    # --- sending -------------------------------------------------------------------------

    def send(self, payout_id: str, now: dt.datetime | None = None) -> str:
        """One attempt at a payout, if it is due. Returns its status afterwards."""
        now = now or utcnow()
        with self.db.transaction() as session:
            payout = session.get(Payout, payout_id)
            if payout is None:
                return "unknown"
            if payout.status in ("sent", "failed") or not _due(payout, now):
                return payout.status
            kind, agent_id = payout.kind, payout.agent_id
            destination, chain = payout.destination, payout.chain
        if kind == "payout":
            try:  # the agent's wallet as it is now: it may have been set or changed since
                agent = self.orders.get(f"/internal/agents/{agent_id}")
                destination, chain = agent["payout_wallet"], agent["payout_chain"]
            except (Unavailable, InternalError) as exc:
                log.warning("payout %s: cannot read the agent's wallet (%s); retrying later", payout_id, exc)
                self._postpone(payout_id, now, str(exc))
                return "pending"

        with self.db.transaction() as session:  # claim the attempt
            payout = _locked(session, self.db, payout_id)
            if payout.status in ("sent", "failed") or not _due(payout, now):
                return payout.status
            if not destination:
                if payout.status != "blocked":
                    _change(payout, now, status="blocked", last_error="The agent has no payout wallet yet.")
                return "blocked"
            attempt = self._claim(session, payout, destination, chain, now)
        return self.transfer(attempt)

    def _claim(self, session: Session, payout: Payout, destination: str, chain: str | None,
               now: dt.datetime) -> Attempt:
        """Take the next attempt of a locked payout: it is leased to this worker, and its rail call
        is on record before it is made."""
        payout.destination, payout.chain = destination, chain
        payout.attempts += 1
        payout.status = "pending"
        payout.next_attempt_at = now + dt.timedelta(seconds=lease_seconds(self.settings))
        return _attempt(session, {"id": payout.id, "attempts": payout.attempts, "destination": destination,
                                  "chain": chain, "amount_cents": payout.amount_cents}, now)

    def transfer(self, attempt: Attempt) -> str:
        """Make a claimed attempt's rail call (outside any transaction) and record how it went."""
        outcome, transfer, error = self._call_rail(attempt.key, attempt.destination, attempt.amount_cents,
                                                   attempt.chain)
        return self._finish(attempt.payout_id, attempt.call_id, outcome, transfer, error)

    def _call_rail(self, key: str, destination: str, amount_cents: int,
                   chain: str | None) -> tuple[str, Transfer | None, str | None]:
        """One rail call: its outcome (as RailCall.outcome), the transfer if one was made, the error.
        An unclear answer is settled by asking the rail about the key."""
        try:
            return "sent", self.rail.send(key, destination, amount_cents, chain), None
        except RailAmbiguous as exc:
            try:
                transfer = self.rail.lookup(key)
            except RailError as lookup_exc:
                return "ambiguous", None, f"{exc}; asking the rail failed: {lookup_exc}"
            return ("found" if transfer else "ambiguous"), transfer, str(exc)
        except RailRejected as exc:
            return "rejected", None, str(exc)
        except RailUnavailable as exc:
            return "failed", None, str(exc)

    def _finish(self, payout_id: str, call_id: int, outcome: str, transfer, error: str | None) -> str:
        now = utcnow()
        calls = RailCall.__table__
        with self.db.transaction() as session:
            session.execute(update(calls).where(calls.c.id == call_id).values(
                outcome=outcome, error=error, finished_at=now, tx_ref=transfer.tx_ref if transfer else None))
            if transfer is not None:
                record_sent(session, payout_id, transfer.tx_ref, now)  # unless an earlier attempt did
                return "sent"
            payout = _locked(session, self.db, payout_id)
            if payout.status == "sent":
                return "sent"
            if outcome == "rejected" or payout.attempts >= self.settings.payout_max_attempts:
                _change(payout, now, status="failed", last_error=error, next_attempt_at=None)
                log.error("payout %s failed after %d attempts: %s", payout.id, payout.attempts, error)
                return "failed"
            delay = backoff(payout.attempts, self.settings)
            _change(payout, now, status="pending", last_error=error,
                    next_attempt_at=now + dt.timedelta(seconds=delay))
            log.warning("payout %s attempt %d: %s; next in %.1f s", payout.id, payout.attempts, error, delay)
            return "pending"

    def _postpone(self, payout_id: str, now: dt.datetime, error: str) -> None:
        with self.db.transaction() as session:
            payout = _locked(session, self.db, payout_id)
            if payout.status in ("pending", "blocked"):
                payout.next_attempt_at = now + dt.timedelta(seconds=backoff(1, self.settings))
                payout.last_error = error

    def retry(self, payout_id: str) -> bool:
        """An admin's retry of a failed payout: a fresh round of attempts."""
        with self.db.transaction() as session:
            payout = _locked(session, self.db, payout_id)
            if payout is None or payout.status != "failed":
                return False
            _change(payout, utcnow(), status="pending", attempts=0, next_attempt_at=None, last_error=None)
            return True

    # --- reporting to the orders service --------------------------------------------------

    def report(self, payout_id: str) -> bool:
        with self.db.transaction() as session:
            payout = session.get(Payout, payout_id)
            if payout is None or payout.reported_version >= payout.version:
                return True
            body = {"id": payout.id, "status": payout.status, "version": payout.version, "tx_ref": payout.tx_ref,
                    "error": payout.last_error if payout.status != "sent" else None,
                    "updated_at": isoformat(payout.updated_at)}
            order_id, version = payout.order_id, payout.version
        try:
            self.orders.post(f"/internal/orders/{order_id}/settlements", body)
        except (Unavailable, InternalError) as exc:
            log.warning("payout %s: report to orders failed (%s); the sweep sends it again", payout_id, exc)
            return False
        with self.db.transaction() as session:
            session.execute(update(Payout).where(Payout.id == payout_id, Payout.reported_version < version)
                            .values(reported_version=version))
        return True

    # --- the sweep's queries ----------------------------------------------------------------

    def due_ids(self, now: dt.datetime, grace_seconds: float = 0.0, limit: int = 500) -> list[str]:
        """Pending payouts whose attempt is due; a new one (never tried) only once it is older than
        the grace, since the task that created it sends it."""
        with self.db.transaction() as session:
            return list(session.scalars(select(Payout.id).where(
                Payout.status == "pending",
                (Payout.next_attempt_at <= now)
                | (Payout.next_attempt_at.is_(None) & (Payout.updated_at <= now - dt.timedelta(seconds=grace_seconds)))
            ).order_by(Payout.created_at).limit(limit)))

    def unreported_ids(self, now: dt.datetime, grace_seconds: float = 0.0, limit: int = 500) -> list[str]:
        """Changes the orders service has not acknowledged, older than the grace (the task that
        made a change reports it itself)."""
        with self.db.transaction() as session:
            return list(session.scalars(select(Payout.id).where(
                Payout.reported_version < Payout.version,
                Payout.updated_at <= now - dt.timedelta(seconds=grace_seconds))
                .order_by(Payout.updated_at).limit(limit)))

    def blocked_ids(self, agent_id: str | None = None) -> list[str]:
        with self.db.transaction() as session:
            query = select(Payout.id).where(Payout.status == "blocked")
            if agent_id:
                query = query.where(Payout.agent_id == agent_id)
            return list(session.scalars(query.order_by(Payout.created_at)))

    def prune(self, now: dt.datetime) -> int:
        """Forget processed event ids older than RETENTION_DAYS: the orders service prunes the
        events themselves then, so none of them can be delivered again."""
        kept_since = now - dt.timedelta(days=self.settings.retention_days)
        with self.db.transaction() as session:
            return session.execute(delete(ProcessedEvent).where(ProcessedEvent.processed_at < kept_since)).rowcount

    def blocked_agents(self) -> list[str]:
        with self.db.transaction() as session:
            return list(session.scalars(select(Payout.agent_id).where(Payout.status == "blocked").distinct()))

    def unblock(self, payout_ids: list[str]) -> list[str]:
        """Make blocked payouts due now (their agent may have a wallet); returns those changed."""
        changed = []
        with self.db.transaction() as session:
            for payout in session.scalars(select(Payout).where(Payout.id.in_(payout_ids), Payout.status == "blocked")):
                payout.next_attempt_at = None
                changed.append(payout.id)
        return changed


def settled_pages(orders: InternalClient, since: dt.datetime, page: int = 500):
    """The orders service's feed of settled orders from `since` on, in settlement order, a page at
    a time (keyset on settled_at and order id)."""
    after_id = None
    while True:
        params = {"since": isoformat(since), "limit": page}
        if after_id:
            params["after_id"] = after_id
        items = orders.get("/internal/settlements", params)["items"]
        if items:
            yield items
        if len(items) < page:
            return
        since, after_id = _parse_time(items[-1]["settled_at"]), items[-1]["order_id"]


# --- recording (inside a transaction) ----------------------------------------------------------

_SEEN = text("SELECT 1 AS seen FROM payouts_processed_events WHERE id = :event_id "
             "UNION ALL SELECT 1 FROM payouts WHERE id IN (:first, :second) LIMIT 1")
_TAKE = insert_or_skip(ProcessedEvent.__table__, ("id", "processed_at"), "id", ("id",))


def _first_taking(session: Session, event_id: str) -> bool:
    """Note an event as taken: False if it already was (a concurrent taker is waited for)."""
    return session.scalar(_TAKE, {"id": event_id, "processed_at": utcnow()}) is not None


def _attempt(session: Session, payout: dict, now: dt.datetime) -> Attempt:
    """Put a claimed attempt's rail call on record before it is made."""
    calls, key = RailCall.__table__, rail_key(payout["id"])
    call_id = session.scalar(calls.insert().values(
        payout_id=payout["id"], idempotency_key=key, attempt=payout["attempts"], outcome="started",
        started_at=now).returning(calls.c.id))
    return Attempt(payout["id"], call_id, key, payout["destination"], payout["amount_cents"], payout["chain"])


def fund(session: Session, order_id: str, wallet: str, held_cents: int) -> None:
    """The buyer's payment now sits in the order's escrow."""
    ledger.post(session, *_fund_posting(order_id, wallet, held_cents))


def _fund_posting(order_id: str, wallet: str, held_cents: int) -> tuple:
    return (f"fund:{order_id}", order_id, "fund",
            {ledger.buyer_wallet(wallet): -held_cents, ledger.escrow(order_id): held_cents})


def settle(session: Session, data: dict, now: dt.datetime | None = None,
           leased_until: dt.datetime | None = None, paid: dict[str, Call] | None = None) -> list[dict]:
    """Empty the order's escrow into what is owed (agent, platform fee, buyer) and create the
    payout rows, once per order. Returns the payouts created now (their rows' values). With
    `leased_until`, a payout whose destination the event names (a refund's buyer wallet; the
    agent's payout wallet as of the completion) is created with its first attempt claimed; with
    `paid`, the calls made for it already: a payout whose transfer was made is created sent, its
    `sent:` transaction posted with the settlement's. (Had the order been settled before, that
    posting is the very one record_sent makes when it marks the existing payout sent.)"""
    payouts, postings = settlement(data, now or utcnow(), leased_until, paid)
    if postings[1][0] not in ledger.post_many(session, postings):  # the `settle:` key
        return []  # settled before, or by a duplicate message just now
    if payouts:
        session.execute(Payout.__table__.insert(), payouts)
    return payouts


def settlement(data: dict, now: dt.datetime, leased_until: dt.datetime | None = None,
               paid: dict[str, Call] | None = None) -> tuple[list[dict], list[tuple]]:
    """What settle() writes, decided: the payout rows, and the ledger postings (the payment's,
    which may be there already, the settlement's, then one `sent:` per payout created sent)."""
    order_id, wallet = data["order_id"], data["client_wallet"]
    held = parse_usd(data["held_usd"])
    entries = {ledger.escrow(order_id): -held}
    payouts = _dues(data)
    for payout in payouts:
        if payout["kind"] == "payout":
            entries[ledger.agent_payable(payout["agent_id"])] = payout["amount_cents"]
            entries[ledger.PLATFORM_FEES] = payout["fee_cents"]
        else:
            entries[ledger.buyer_refunds(wallet)] = payout["amount_cents"]
        payout.update(created_at=now, updated_at=now)
        call = paid.get(payout["id"]) if paid else None
        if call is not None and call.transfer is not None:  # a change the orders service has yet to hear
            payout.update(attempts=1, status="sent", tx_ref=call.transfer.tx_ref, sent_at=now, version=2)
        elif (call is not None or leased_until is not None) and payout["destination"]:
            payout.update(attempts=1, next_attempt_at=leased_until)
        elif payout["kind"] == "payout":  # the wallet is looked up when the payout is sent
            payout.update(destination=None, chain=None)
    # the paid event may still be on its way: its posting is made here if it is not there yet
    postings = [_fund_posting(order_id, wallet, held), (f"settle:{order_id}", order_id, "settle", entries)]
    postings += [_sent_posting(payout) for payout in payouts if payout["status"] == "sent"]
    return payouts, postings


def _dues(data: dict) -> list[dict]:
    """The payout rows a settlement event asks for (the orders service created them pending, so
    that much it knows already), each with the destination the event names, if any."""
    new = {"order_id": data["order_id"], "status": "pending", "attempts": 0, "version": 1, "reported_version": 1,
           "next_attempt_at": None, "agent_id": None, "tx_ref": None, "sent_at": None}
    payouts = []
    if due := data.get("payout_due"):
        payouts.append({**new, "id": due["id"], "kind": "payout", "agent_id": due["agent_id"],
                        "amount_cents": parse_usd(due["amount_usd"]), "fee_cents": parse_usd(due["fee_usd"]),
                        "destination": due.get("wallet"), "chain": due.get("chain")})
    if due := data.get("refund_due"):
        payouts.append({**new, "id": due["id"], "kind": "refund", "amount_cents": parse_usd(due["amount_usd"]),
                        "fee_cents": 0, "destination": due["wallet"], "chain": due["chain"]})
    return payouts


def _call_row(payout_id: str, call: Call, finished: bool) -> dict:
    """A call pay_first made, as its rail_calls row: finished, or as a claimed attempt's call
    that _finish will close."""
    row = {"payout_id": payout_id, "idempotency_key": call.key, "attempt": 1, "started_at": call.started_at,
           "outcome": "started", "error": None, "finished_at": None, "tx_ref": None}
    if finished:
        row.update(outcome=call.outcome, error=call.error, finished_at=call.finished_at,
                   tx_ref=call.transfer.tx_ref if call.transfer else None)
    return row


def record_sent(session: Session, payout_id: str, tx_ref: str, now: dt.datetime) -> bool:
    """Mark a payout sent and post its `sent:` transaction, unless it already is (False). The
    conditional update holds the payout's row, so the posting is made once."""
    table = Payout.__table__
    payout = session.execute(update(table).where(table.c.id == payout_id, table.c.status != "sent").values(
        status="sent", tx_ref=tx_ref, sent_at=now, next_attempt_at=None, last_error=None, updated_at=now,
        version=table.c.version + 1).returning(table.c.id, table.c.kind, table.c.agent_id, table.c.destination,
                                               table.c.amount_cents, table.c.order_id)).first()
    if payout is None:
        return False
    ledger.post(session, *_sent_posting(payout._mapping))
    return True


def _sent_posting(payout) -> tuple:
    """The `sent:` transaction of a payout marked sent: what was owed is paid out."""
    if payout["kind"] == "payout":
        owed, paid = ledger.agent_payable(payout["agent_id"]), ledger.agent_wallet(payout["agent_id"])
    else:
        owed, paid = ledger.buyer_refunds(payout["destination"]), ledger.buyer_wallet(payout["destination"])
    return (f"sent:{payout['id']}", payout["order_id"], "sent", {owed: -payout["amount_cents"], paid: payout["amount_cents"]})


def backoff(attempt: int, settings: Settings) -> float:
    """Exponential backoff with full jitter, capped."""
    ceiling = min(settings.payout_retry_max_seconds, settings.payout_retry_base_seconds * 2 ** max(attempt - 1, 0))
    return random.uniform(ceiling / 2, ceiling)


def _change(payout: Payout, now: dt.datetime, **values) -> None:
    for key, value in values.items():
        setattr(payout, key, value)
    payout.updated_at = now
    payout.version += 1


def _due(payout: Payout, now: dt.datetime) -> bool:
    # a little early is fine: a retry's countdown and the clock it was computed with may differ
    return payout.next_attempt_at is None or payout.next_attempt_at <= now + dt.timedelta(seconds=0.5)


def _locked(session: Session, db: Database, payout_id: str) -> Payout | None:
    query = select(Payout).where(Payout.id == payout_id)
    if db.is_postgres:
        query = query.with_for_update()
    return session.scalar(query)


def _parse_time(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
