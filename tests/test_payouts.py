"""The payouts worker's rules, in process against a real orders service over HTTP (DESIGN.md §3-§6):
payout on completion, refund on cancellation, both on a split; exactly once under duplicated
events, repeated sends and an ambiguous rail; blocked without a wallet until the agent sets one;
failed after capped retries, then an admin's retry; the ledger balancing to the cent; reconcile.
The same tasks under real processes, kills and a Redis restart: test_payouts_faults.py."""
from __future__ import annotations

import datetime as dt

import pytest
import redis as redis_lib
from sqlalchemy import select

from services.orders.models import OutboxEvent, SandboxTransfer
from services.payouts import ledger, reconcile
from services.payouts.engine import Engine, backoff
from services.payouts.models import LedgerTransaction, Payout, RailCall
from services.payouts.rails import make_rail
from shared.db import Database, utcnow
from shared.internal import InternalClient
from shared.money import fee_cents
from tests.support.api import ADMIN, ApiClient
from tests.support.net import ServedApp
from tests.support.wallets import SolanaWallet


class Desk:
    """An orders service served over HTTP, its test client, and payouts engines pointed at it."""

    def __init__(self, app, redis_url):
        self.app = app
        self.api = ApiClient(app)
        self.settings = app.config["SETTINGS"]
        self.served = ServedApp(app)
        self.orders_db = app.extensions["db"]
        self.db = Database(self.settings.payouts_db)
        self.redis = redis_lib.Redis.from_url(redis_url)

    def engine(self, faults: str = "", orders_url: str | None = None, **changes) -> Engine:
        settings = self.settings.replace(sandbox_rail_faults=faults, **changes)
        orders = InternalClient(orders_url or self.served.url, settings.service_token, timeout=5)
        return Engine(settings, self.db, orders, make_rail(settings, orders, self.redis))

    def messages(self, order_id: str, event: str | None = None) -> list[dict]:
        with self.orders_db.transaction() as session:
            rows = session.scalars(select(OutboxEvent).where(OutboxEvent.order_id == order_id)
                                   .order_by(OutboxEvent.sequence))
            return [r.message() for r in rows if event is None or r.event == event]

    def take_all(self, engine: Engine, order_id: str) -> list[str]:
        """Hand the worker every event of the order that concerns it, as the queue would."""
        due = []
        for message in self.messages(order_id):
            if message["event"] in ("order.paid", "order.completed", "order.cancelled"):
                due += engine.take_event(message)
        return due

    def payouts(self, order_id: str) -> list[Payout]:
        with self.db.transaction() as session:
            return list(session.scalars(select(Payout).where(Payout.order_id == order_id).order_by(Payout.kind)))

    def rail_transfers(self, payout_id: str) -> list[SandboxTransfer]:
        with self.orders_db.transaction() as session:
            return list(session.scalars(select(SandboxTransfer)
                                        .where(SandboxTransfer.idempotency_key == f"payout:{payout_id}")))

    def balance(self, account: str) -> int:
        with self.db.transaction() as session:
            return ledger.balance(session, account)

    def paid_agent(self, name="Payee", wallet=True):
        extra = {"payout_wallet": SolanaWallet.generate().address, "payout_chain": "solana"} if wallet else {}
        agent = self.api.agent(name, **extra)
        return agent, extra.get("payout_wallet")

    def completed(self, price="45.00", wallet=True):
        agent, agent_wallet = self.paid_agent(wallet=wallet)
        service = self.api.service(agent, "fixed", price_usd=price)
        buyer = self.api.buyer()
        order = self.api.walk(agent, buyer, self.api.order(buyer, service), "completed")
        return agent, buyer, order, agent_wallet

    def close(self):
        self.served.close()
        self.db.engine.dispose()


@pytest.fixture
def desk(app, redis_url):
    d = Desk(app, redis_url)
    yield d
    d.close()


# --- fee rounding ----------------------------------------------------------------------------------

@pytest.mark.parametrize("price_cents,fee", [
    (1, 0),               # 0.01: 10% is a tenth of a cent, rounds to 0.00
    (5, 1),               # 0.05: half a cent rounds up to 0.01
    (15, 2),              # 0.15: 1.5 cents rounds up
    (14, 1),              # 0.14: 1.4 cents rounds down
    (99999999, 10000000),  # 999999.99: 99999.999 rounds up to 100000.00
    (100000000, 10000000),  # 1000000.00: exactly 100000.00
])
def test_platform_fee_rounds_half_up_to_the_cent(price_cents, fee):
    assert fee_cents(price_cents, 1000) == fee


@pytest.mark.parametrize("price,fee,net", [("0.01", "0.00", "0.01"), ("0.05", "0.01", "0.04"),
                                           ("999999.99", "100000.00", "899999.99"),
                                           ("1000000.00", "100000.00", "900000.00")])
def test_the_agent_is_paid_the_price_minus_the_fee_at_the_edges(desk, price, fee, net):
    agent, buyer, order, wallet = desk.completed(price)
    engine = desk.engine()
    [payout_id] = desk.take_all(engine, order["id"])
    assert engine.send(payout_id) == "sent"
    [transfer] = desk.rail_transfers(payout_id)
    assert (transfer.to_address, transfer.amount_cents, transfer.asset) == (wallet, int(net.replace(".", "")), "USDC")
    assert desk.balance(ledger.PLATFORM_FEES) == int(fee.replace(".", ""))
    assert desk.balance(ledger.escrow(order["id"])) == 0


# --- the happy paths -------------------------------------------------------------------------------

def test_approval_pays_the_agent_once_and_the_order_shows_it(desk):
    agent, buyer, order, wallet = desk.completed("45.00")
    engine = desk.engine()
    before = desk.api.ok("GET", f"/api/orders/{order['id']}", agent)["payout"]
    assert before["status"] == "pending" and before["amount_usd"] == "40.50" and before["fee_usd"] == "4.50"

    [payout_id] = desk.take_all(engine, order["id"])
    assert engine.send(payout_id) == "sent"
    assert engine.report(payout_id)

    seen = desk.api.ok("GET", f"/api/orders/{order['id']}", agent)["payout"]
    [transfer] = desk.rail_transfers(payout_id)
    assert seen["status"] == "sent" and seen["tx_ref"] == transfer.tx_hash and seen["id"] == payout_id
    assert (seen["amount_usd"], seen["fee_usd"]) == ("40.50", "4.50")
    assert desk.api.ok("GET", f"/api/orders/{order['id']}", ADMIN)["payout"]["status"] == "sent"
    buyer_view = desk.api.ok("GET", f"/api/orders/{order['id']}", buyer)
    assert buyer_view["payout"] is None and buyer_view["refund"] is None
    # the money: escrow funded and emptied, fee kept, agent paid
    assert desk.balance(ledger.escrow(order["id"])) == 0
    assert desk.balance(ledger.agent_payable(agent.id)) == 0
    assert desk.balance(ledger.agent_wallet(agent.id)) == 4050
    assert desk.balance(ledger.PLATFORM_FEES) == 450
    assert desk.balance(ledger.buyer_wallet(buyer.id)) == -4500
    # the event for webhooks
    [sent] = desk.messages(order["id"], "order.payout_sent")
    assert sent["data"]["payout_id"] == payout_id and sent["data"]["amount_usd"] == "40.50"


def test_cancelling_a_paid_order_refunds_the_buyer(desk):
    agent, _ = desk.paid_agent()
    buyer = desk.api.buyer()
    order = desk.api.walk(agent, buyer, desk.api.order(buyer, desk.api.service(agent, "fixed")), "paid")
    order = desk.api.ok("PATCH", f"/api/orders/{order['id']}", buyer, json={"action": "cancel"})
    assert order["refund"]["status"] == "pending" and order["refund"]["amount_usd"] == "45.00"
    engine = desk.engine()
    [refund_id] = desk.take_all(engine, order["id"])
    assert engine.send(refund_id) == "sent" and engine.report(refund_id)

    [transfer] = desk.rail_transfers(refund_id)
    assert (transfer.to_address, transfer.amount_cents) == (buyer.id, 4500)
    assert desk.api.ok("GET", f"/api/orders/{order['id']}", buyer)["refund"]["status"] == "sent"
    agent_view = desk.api.ok("GET", f"/api/orders/{order['id']}", agent)
    assert agent_view["refund"] is None and agent_view["payout"] is None
    assert desk.balance(ledger.escrow(order["id"])) == 0
    assert desk.balance(ledger.buyer_wallet(buyer.id)) == 0  # paid 45.00, got 45.00 back
    assert desk.balance(ledger.PLATFORM_FEES) == 0
    assert desk.messages(order["id"], "order.refund_sent")


def test_a_split_pays_both_parts_summing_to_the_amount_held(desk):
    agent, wallet = desk.paid_agent()
    buyer = desk.api.buyer()
    order = desk.api.walk(agent, buyer, desk.api.order(buyer, desk.api.service(agent, "fixed")), "disputed")
    desk.api.ok("POST", f"/api/admin/orders/{order['id']}/resolve", ADMIN,
                json={"outcome": "split", "agent_amount_usd": "30.01", "note": "Half done."})
    engine = desk.engine()
    due = desk.take_all(engine, order["id"])
    assert len(due) == 2 and all(engine.send(p) == "sent" for p in due)
    payout, refund = desk.payouts(order["id"])
    assert (payout.kind, payout.amount_cents, payout.fee_cents) == ("payout", 2701, 300)  # 3.001 rounds to 3.00
    assert (refund.kind, refund.amount_cents) == ("refund", 1499)
    assert payout.amount_cents + payout.fee_cents + refund.amount_cents == 4500
    assert [t.amount_cents for t in desk.rail_transfers(payout.id)] == [2701]
    assert [t.to_address for t in desk.rail_transfers(refund.id)] == [buyer.id]
    assert desk.balance(ledger.escrow(order["id"])) == 0


# --- exactly once ------------------------------------------------------------------------------------

def test_duplicated_events_and_repeated_sends_move_money_once(desk):
    agent, buyer, order, wallet = desk.completed()
    engine = desk.engine()
    first = desk.take_all(engine, order["id"])
    assert desk.take_all(engine, order["id"]) == []  # the same messages again: nothing new
    payout_id = first[0]
    for _ in range(3):
        engine.send(payout_id)
    assert len(desk.rail_transfers(payout_id)) == 1
    with desk.db.transaction() as session:
        keys = list(session.scalars(select(LedgerTransaction.key).where(LedgerTransaction.order_id == order["id"])))
    assert sorted(keys) == sorted([f"fund:{order['id']}", f"settle:{order['id']}", f"sent:{payout_id}"])


def test_an_ambiguous_answer_is_settled_by_asking_the_rail_not_by_paying_again(desk):
    agent, buyer, order, wallet = desk.completed()
    engine = desk.engine(faults="ambiguous=1")
    [payout_id] = desk.take_all(engine, order["id"])
    assert engine.send(payout_id) == "sent"  # the transfer was made; its answer was lost; lookup found it
    assert len(desk.rail_transfers(payout_id)) == 1
    with desk.db.transaction() as session:
        [call] = session.scalars(select(RailCall).where(RailCall.payout_id == payout_id)).all()
        assert (call.outcome, call.idempotency_key) == ("found", f"payout:{payout_id}")


def test_a_timeout_before_the_transfer_is_retried_under_the_same_key(desk):
    agent, buyer, order, wallet = desk.completed()
    engine = desk.engine(faults="timeout=1", payout_retry_base_seconds=0.01, payout_retry_max_seconds=0.01)
    [payout_id] = desk.take_all(engine, order["id"])
    assert engine.send(payout_id) == "pending"
    assert desk.rail_transfers(payout_id) == []
    assert engine.send(payout_id, now=utcnow() + dt.timedelta(seconds=1)) == "sent"
    assert len(desk.rail_transfers(payout_id)) == 1
    with desk.db.transaction() as session:
        calls = session.scalars(select(RailCall).where(RailCall.payout_id == payout_id).order_by(RailCall.attempt)).all()
        assert [c.outcome for c in calls] == ["ambiguous", "sent"]
        assert {c.idempotency_key for c in calls} == {f"payout:{payout_id}"}


def test_a_retry_is_not_taken_before_it_is_due(desk):
    agent, buyer, order, wallet = desk.completed()
    engine = desk.engine(faults="fail=1", payout_retry_base_seconds=60, payout_retry_max_seconds=60)
    [payout_id] = desk.take_all(engine, order["id"])
    assert engine.send(payout_id) == "pending"
    assert engine.send(payout_id) == "pending"  # a duplicate message now: not due, nothing happens
    assert desk.payouts(order["id"])[0].attempts == 1
    assert engine.send(payout_id, now=utcnow() + dt.timedelta(seconds=61)) == "sent"



def test_a_retry_due_later_than_the_broker_holds_a_message_is_left_to_the_sweep(desk, monkeypatch):
    """A scheduled message is held unacknowledged until it runs; one held past the broker's
    visibility timeout would be handed out twice. Such a retry is not scheduled: the sweep sends
    the payout once it is due."""
    from services.payouts import tasks
    queued = []
    monkeypatch.setattr(tasks.send, "apply_async", lambda args, queue, countdown: queued.append(countdown))
    tasks._send_later("pay_x", countdown=tasks.settings.broker_visibility_timeout_seconds / 2 + 1)
    assert queued == []
    tasks._send_later("pay_x", countdown=5)
    assert queued == [5]
    agent, buyer, order, wallet = desk.completed()
    engine = desk.engine(faults="fail=1", payout_retry_base_seconds=600, payout_retry_max_seconds=600)
    [payout_id] = desk.take_all(engine, order["id"])
    assert engine.send(payout_id) == "pending"
    assert engine.due_ids(utcnow() + dt.timedelta(seconds=601)) == [payout_id]


# --- the first attempt, claimed with the settlement ---------------------------------------------------

def _take_and_claim(desk, engine, order_id):
    """What the settle task does with the order's events: settle, and claim what it can."""
    due = []
    for message in desk.messages(order_id):
        if message["event"] in ("order.paid", "order.completed", "order.cancelled"):
            due += engine.take_and_claim(message)
    return due


def test_the_completion_carries_the_agents_wallet_so_the_first_attempt_needs_no_lookup(desk, monkeypatch):
    agent, buyer, order, wallet = desk.completed("45.00")
    engine = desk.engine()
    looked_up = []
    monkeypatch.setattr(engine.orders, "get", lambda path, params=None: looked_up.append(path))
    [attempt] = _take_and_claim(desk, engine, order["id"])
    assert (attempt.destination, attempt.amount_cents) == (wallet, 4050)
    [payout] = desk.payouts(order["id"])
    assert (payout.status, payout.attempts, payout.destination) == ("pending", 1, wallet)  # claimed: leased
    assert engine.send(payout.id) == "pending"  # a duplicate wake-up now: taken, nothing happens
    assert engine.transfer(attempt) == "sent"
    assert looked_up == []
    [transfer] = desk.rail_transfers(payout.id)
    assert (transfer.to_address, transfer.amount_cents) == (wallet, 4050)
    assert desk.balance(ledger.agent_wallet(agent.id)) == 4050 and desk.balance(ledger.escrow(order["id"])) == 0
    assert _take_and_claim(desk, engine, order["id"]) == []  # the same messages again: nothing new


def test_a_refund_is_claimed_with_the_settlement_to_the_buyers_wallet(desk):
    agent, wallet = desk.paid_agent()
    service = desk.api.service(agent, "fixed", price_usd="30.00")
    buyer = desk.api.buyer()
    order = desk.api.walk(agent, buyer, desk.api.order(buyer, service), "paid")
    desk.api.ok("PATCH", f"/api/orders/{order['id']}", buyer, json={"action": "cancel"})
    engine = desk.engine()
    [attempt] = _take_and_claim(desk, engine, order["id"])
    assert (attempt.destination, attempt.amount_cents) == (buyer.id, 3000)
    assert engine.transfer(attempt) == "sent"
    assert [t.to_address for t in desk.rail_transfers(attempt.payout_id)] == [buyer.id]


def test_without_a_wallet_at_completion_the_payout_waits_for_one_as_before(desk):
    agent, buyer, order, _ = desk.completed(wallet=False)
    engine = desk.engine()
    [payout_id] = _take_and_claim(desk, engine, order["id"])  # nothing to claim: by id
    assert engine.send(payout_id) == "blocked"
    assert desk.rail_transfers(payout_id) == []


def test_a_worker_killed_between_the_claim_and_the_rail_call_pays_once_after_the_lease(desk):
    agent, buyer, order, wallet = desk.completed()
    engine = desk.engine()
    [attempt] = _take_and_claim(desk, engine, order["id"])  # claimed, then the worker died
    after_lease = utcnow() + dt.timedelta(seconds=2 * desk.settings.rail_timeout_seconds + 6)
    assert engine.due_ids(utcnow()) == [] and engine.due_ids(after_lease) == [attempt.payout_id]
    assert engine.send(attempt.payout_id, now=after_lease) == "sent"
    assert engine.transfer(attempt) == "sent"  # the dead worker's attempt, had it run after all
    assert len(desk.rail_transfers(attempt.payout_id)) == 1
    assert desk.balance(ledger.agent_wallet(agent.id)) == desk.payouts(order["id"])[0].amount_cents

def test_posting_several_transactions_at_once_records_each_new_key_once(desk):
    with desk.db.transaction() as session:
        assert ledger.post(session, "fund:ord_x", "ord_x", "fund", {"buyer": -500, "escrow": 500})
    with desk.db.transaction() as session:
        assert ledger.post_many(session, [
            ("fund:ord_x", "ord_x", "fund", {"buyer": -500, "escrow": 500}),  # recorded before: left alone
            ("settle:ord_x", "ord_x", "settle", {"escrow": -500, "owed": 450, "fees": 50}),
            ("sent:pay_x", "ord_x", "sent", {"owed": -450, "paid": 450})]) == {"settle:ord_x", "sent:pay_x"}
    assert [desk.balance(a) for a in ("buyer", "escrow", "owed", "fees", "paid")] == [-500, 0, 0, 50, 450]
    with pytest.raises(ValueError), desk.db.transaction() as session:
        ledger.post_many(session, [("settle:ord_y", "ord_y", "settle", {"escrow": -500, "owed": 450})])
    with desk.db.transaction() as session:
        assert not ledger.exists(session, "settle:ord_y") and ledger.unbalanced(session) == []


# --- paid first, recorded after -----------------------------------------------------------------------

def _pay_first(desk, engine, order_id):
    """What the settle task does with an order's events when it pays first: the paid event the
    recorded way, the settling one paid and then recorded. Returns the calls and what recording said."""
    calls, settled = {}, []
    for message in desk.messages(order_id):
        if message["event"] == "order.paid":
            assert engine.pay_first(message) is None  # no money leaves on a payment
            engine.take_event(message)
        elif message["event"] in ("order.completed", "order.cancelled"):
            calls = engine.pay_first(message)
            settled = engine.record_paid(message, calls)
    return calls, settled


def _ledger_keys(desk, order_id):
    with desk.db.transaction() as session:
        return sorted(session.scalars(select(LedgerTransaction.key).where(LedgerTransaction.order_id == order_id)))


def _calls(desk, payout_id):
    with desk.db.transaction() as session:
        return [(c.outcome, c.attempt, c.tx_ref, c.idempotency_key) for c in session.scalars(
            select(RailCall).where(RailCall.payout_id == payout_id).order_by(RailCall.id))]


def test_a_completion_paid_first_is_recorded_sent_in_one_transaction_with_its_settlement(desk):
    agent, buyer, order, wallet = desk.completed("45.00")
    engine = desk.engine()
    calls, settled = _pay_first(desk, engine, order["id"])
    [payout] = desk.payouts(order["id"])
    assert settled == [(payout.id, "sent")] and list(calls) == [payout.id]
    [transfer] = desk.rail_transfers(payout.id)
    assert (transfer.to_address, transfer.amount_cents) == (wallet, 4050)
    assert (payout.status, payout.tx_ref, payout.attempts, payout.destination) == ("sent", transfer.tx_hash, 1, wallet)
    assert payout.sent_at is not None and payout.next_attempt_at is None
    assert _calls(desk, payout.id) == [("sent", 1, transfer.tx_hash, f"payout:{payout.id}")]
    assert _ledger_keys(desk, order["id"]) == sorted([f"fund:{order['id']}", f"settle:{order['id']}",
                                                       f"sent:{payout.id}"])
    assert desk.balance(ledger.escrow(order["id"])) == 0 and desk.balance(ledger.agent_payable(agent.id)) == 0
    assert desk.balance(ledger.agent_wallet(agent.id)) == 4050 and desk.balance(ledger.PLATFORM_FEES) == 450
    assert engine.unreported_ids(utcnow(), grace_seconds=0) == [payout.id]  # the orders service hears of it
    assert engine.report(payout.id)
    seen = desk.api.ok("GET", f"/api/orders/{order['id']}", agent)["payout"]
    assert (seen["status"], seen["tx_ref"]) == ("sent", transfer.tx_hash)
    # the same message again, by either way: seen, nothing paid or recorded twice
    [completed] = desk.messages(order["id"], "order.completed")
    assert engine.pay_first(completed) is None and engine.take_and_claim(completed) == []
    assert len(desk.rail_transfers(payout.id)) == 1 and len(_calls(desk, payout.id)) == 1
    problems, _ = reconcile.reconcile(desk.db, engine.orders, engine.rail)
    assert problems == []


def test_a_worker_that_died_after_paying_first_leaves_one_transfer_that_the_next_taker_records(desk):
    agent, buyer, order, wallet = desk.completed()
    engine = desk.engine()
    [completed] = desk.messages(order["id"], "order.completed")
    [payout_id] = engine.pay_first(completed)  # paid, then the worker died: nothing recorded
    assert desk.payouts(order["id"]) == [] and len(desk.rail_transfers(payout_id)) == 1
    calls = engine.pay_first(completed)  # the message, redelivered: pays again under the same key
    assert engine.record_paid(completed, calls) == [(payout_id, "sent")]
    [transfer] = desk.rail_transfers(payout_id)
    [payout] = desk.payouts(order["id"])
    assert (payout.status, payout.tx_ref) == ("sent", transfer.tx_hash)
    assert desk.balance(ledger.agent_wallet(agent.id)) == payout.amount_cents


def test_a_payout_paid_first_by_a_dead_worker_is_recorded_once_by_the_sweeps_send(desk):
    agent, buyer, order, wallet = desk.completed()
    engine = desk.engine()
    [completed] = desk.messages(order["id"], "order.completed")
    [payout_id] = engine.pay_first(completed)  # paid, then the worker died and the message was lost
    later = utcnow() + dt.timedelta(seconds=31)
    assert engine.catch_up(now=later) == 1  # the sweep finds the settlement
    assert engine.send(payout_id, now=later) == "sent"  # asks the rail under the same key: no second transfer
    assert engine.pay_first(completed) is None  # the message after all: its payout is known, nothing is paid
    [transfer] = desk.rail_transfers(payout_id)
    assert desk.payouts(order["id"])[0].tx_ref == transfer.tx_hash
    assert desk.balance(ledger.agent_wallet(agent.id)) == transfer.amount_cents


def test_twin_workers_paying_first_make_one_transfer_and_one_posting(desk):
    agent, buyer, order, wallet = desk.completed()
    engine = desk.engine()
    [completed] = desk.messages(order["id"], "order.completed")
    first, second = engine.pay_first(completed), engine.pay_first(completed)  # both before either records
    [payout_id] = first
    assert first[payout_id].transfer.tx_ref == second[payout_id].transfer.tx_ref
    assert engine.record_paid(completed, first) == [(payout_id, "sent")]
    assert engine.record_paid(completed, second) == []  # its transfer is the one already recorded
    assert [c[0] for c in _calls(desk, payout_id)] == ["sent", "sent"]  # both calls are on record
    assert _ledger_keys(desk, order["id"]).count(f"sent:{payout_id}") == 1
    assert desk.balance(ledger.agent_wallet(agent.id)) == desk.payouts(order["id"])[0].amount_cents


def test_a_payout_settled_by_the_sweep_meanwhile_takes_the_transfer_paid_first(desk):
    agent, buyer, order, wallet = desk.completed()
    engine = desk.engine()
    [completed] = desk.messages(order["id"], "order.completed")
    calls = engine.pay_first(completed)
    assert engine.catch_up(now=utcnow() + dt.timedelta(seconds=31)) == 1  # settled meanwhile, pending
    [payout_id] = calls
    assert engine.record_paid(completed, calls) == [(payout_id, "sent")]
    [payout] = desk.payouts(order["id"])
    assert (payout.status, payout.tx_ref) == ("sent", calls[payout_id].transfer.tx_ref)
    assert len(desk.rail_transfers(payout_id)) == 1
    assert _ledger_keys(desk, order["id"]).count(f"sent:{payout_id}") == 1


def test_a_failed_first_call_is_recorded_as_a_claimed_attempt_and_retried_under_the_same_key(desk):
    agent, buyer, order, wallet = desk.completed()
    engine = desk.engine(faults="fail=1", payout_retry_base_seconds=0.01, payout_retry_max_seconds=0.01)
    calls, settled = _pay_first(desk, engine, order["id"])
    [payout] = desk.payouts(order["id"])
    assert settled == [(payout.id, "pending")] and desk.rail_transfers(payout.id) == []
    assert (payout.attempts, payout.destination) == (1, wallet) and "refused" in payout.last_error
    assert [c[0] for c in _calls(desk, payout.id)] == ["failed"]
    assert engine.send(payout.id, now=utcnow() + dt.timedelta(seconds=1)) == "sent"
    assert [c[0] for c in _calls(desk, payout.id)] == ["failed", "sent"]
    assert len(desk.rail_transfers(payout.id)) == 1


def test_a_first_call_refused_for_good_fails_the_payout_at_once(desk, monkeypatch):
    agent, buyer, order, wallet = desk.completed()
    engine = desk.engine()
    from services.payouts.rails import RailRejected

    def refuse(*args):
        raise RailRejected("malformed destination")
    monkeypatch.setattr(engine.rail, "send", refuse)
    calls, settled = _pay_first(desk, engine, order["id"])
    [payout] = desk.payouts(order["id"])
    assert settled == [(payout.id, "failed")] and payout.status == "failed"
    assert payout.last_error == "malformed destination" and desk.rail_transfers(payout.id) == []
    assert desk.balance(ledger.agent_payable(agent.id)) == payout.amount_cents  # still owed


def test_an_unclear_first_call_is_settled_by_asking_the_rail(desk):
    agent, buyer, order, wallet = desk.completed()
    engine = desk.engine(faults="ambiguous=1")
    calls, settled = _pay_first(desk, engine, order["id"])
    [payout] = desk.payouts(order["id"])
    assert settled == [(payout.id, "sent")] and payout.status == "sent"
    [transfer] = desk.rail_transfers(payout.id)
    assert _calls(desk, payout.id) == [("found", 1, transfer.tx_hash, f"payout:{payout.id}")]


def test_a_split_without_an_agent_wallet_pays_the_refund_first_and_leaves_the_payout_to_send(desk):
    agent, _ = desk.paid_agent(wallet=False)
    buyer = desk.api.buyer()
    order = desk.api.walk(agent, buyer, desk.api.order(buyer, desk.api.service(agent, "fixed", price_usd="45.00")),
                          "disputed")
    desk.api.ok("POST", f"/api/admin/orders/{order['id']}/resolve", ADMIN,
                json={"outcome": "split", "agent_amount_usd": "30.00", "note": "Two thirds."})
    engine = desk.engine()
    calls, settled = _pay_first(desk, engine, order["id"])
    payout, refund = desk.payouts(order["id"])
    assert list(calls) == [refund.id]
    assert sorted(settled) == sorted([(payout.id, None), (refund.id, "sent")])  # None: send() looks the wallet up
    assert (refund.status, refund.amount_cents) == ("sent", 1500) and payout.status == "pending"
    assert engine.send(payout.id) == "blocked" and desk.rail_transfers(payout.id) == []
    assert desk.balance(ledger.escrow(order["id"])) == 0 and desk.balance(ledger.buyer_wallet(buyer.id)) == -3000


def _recorded(desk, order_id):
    """What recording a settlement wrote for an order, with its own ids and times left out."""
    with desk.db.transaction() as session:
        payouts = session.scalars(select(Payout).where(Payout.order_id == order_id).order_by(Payout.kind)).all()
        names = {order_id: "<order>", **{p.id: f"<{p.kind}>" for p in payouts}}

        def named(text):
            for real, name in names.items():
                text = text.replace(real, name)
            return text
        rows = [(p.kind, p.agent_id, p.destination, p.chain, p.amount_cents, p.fee_cents, p.status, p.attempts,
                 p.version, p.reported_version, p.tx_ref is not None, p.sent_at is not None,
                 p.next_attempt_at is not None) for p in payouts]
        postings = sorted((named(t.key), t.kind, sorted((named(e.account), e.amount_cents) for e in t.entries))
                          for t in session.scalars(select(LedgerTransaction)
                                                   .where(LedgerTransaction.order_id == order_id)))
        calls = sorted((named(c.payout_id), named(c.idempotency_key), c.attempt, c.outcome, c.tx_ref is not None)
                       for c in session.scalars(select(RailCall).where(RailCall.payout_id.in_([p.id for p in payouts]))))
    return rows, postings, calls


def test_one_statement_and_the_session_record_a_paid_settlement_alike(desk, monkeypatch):
    from services.payouts import oneshot
    statements = []
    real = oneshot.record
    monkeypatch.setattr(oneshot, "record", lambda *args: statements.append(real(*args)) or statements[-1])
    agent, _ = desk.paid_agent()
    buyer = desk.api.buyer()
    service = desk.api.service(agent, "fixed", price_usd="45.00")
    orders = [desk.api.walk(agent, buyer, desk.api.order(buyer, service), "disputed")["id"] for _ in range(2)]
    for oid in orders:
        desk.api.ok("POST", f"/api/admin/orders/{oid}/resolve", ADMIN,
                    json={"outcome": "split", "agent_amount_usd": "30.00", "note": "Two thirds."})
    engine = desk.engine()
    # the first through record_paid (one statement on PostgreSQL), the second the Session's way
    for oid, record in zip(orders, (engine.record_paid, engine._record_paid)):
        for message in desk.messages(oid):
            if message["event"] == "order.paid":
                engine.take_event(message)
            elif message["event"] == "order.completed":
                assert sorted(s for _, s in record(message, engine.pay_first(message))) == ["sent", "sent"]
    assert statements == ([(True, True)] if desk.db.is_postgres else [])
    one, other = (_recorded(desk, oid) for oid in orders)
    assert one == other
    rows, postings, calls = one
    assert [r[:8] for r in rows] == [("payout", agent.id, desk.payouts(orders[0])[0].destination, "solana",
                                      2700, 300, "sent", 1), ("refund", None, buyer.id, "solana", 1500, 0, "sent", 1)]
    assert [p[0] for p in postings] == ["fund:<order>", "sent:<payout>", "sent:<refund>", "settle:<order>"]
    assert calls == [("<payout>", "payout:<payout>", 1, "sent", True), ("<refund>", "payout:<refund>", 1, "sent", True)]
    with desk.db.transaction() as session:
        assert ledger.unbalanced(session) == []
    assert all(desk.balance(ledger.escrow(oid)) == 0 for oid in orders)


# --- failures, blocked, admin retry -------------------------------------------------------------------

def test_capped_retries_end_in_failed_visible_to_agent_and_admin_then_an_admin_retry_pays(desk):
    agent, buyer, order, wallet = desk.completed()
    engine = desk.engine(faults="fail=3", payout_max_attempts=3, payout_retry_base_seconds=0.01,
                         payout_retry_max_seconds=0.01)
    [payout_id] = desk.take_all(engine, order["id"])
    later = utcnow()
    statuses = []
    for _ in range(3):
        later += dt.timedelta(seconds=1)
        statuses.append(engine.send(payout_id, now=later))
    assert statuses == ["pending", "pending", "failed"]
    engine.report(payout_id)
    seen = desk.api.ok("GET", f"/api/orders/{order['id']}", agent)["payout"]
    assert seen["status"] == "failed" and "refused" in seen["error"]
    assert desk.api.ok("GET", f"/api/orders/{order['id']}", ADMIN)["payout"]["status"] == "failed"
    assert desk.messages(order["id"], "order.payout_failed")
    assert engine.send(payout_id, now=later + dt.timedelta(hours=1)) == "failed"  # no more attempts by itself

    retried = desk.api.ok("POST", f"/api/admin/payouts/{payout_id}/retry", ADMIN, expect=202)
    assert retried["status"] == "pending"
    status, body = desk.api.post(f"/api/admin/payouts/{payout_id}/retry", ADMIN)
    assert status == 409 and body["code"] == "invalid_transition"  # not failed any more
    [request] = desk.messages(order["id"], "payout.retry_requested")
    assert engine.retry(request["data"]["payout_id"])
    assert engine.send(payout_id) == "sent" and engine.report(payout_id)
    assert desk.api.ok("GET", f"/api/orders/{order['id']}", agent)["payout"]["status"] == "sent"
    assert len(desk.rail_transfers(payout_id)) == 1


def test_without_a_payout_wallet_the_payout_is_blocked_and_resumes_when_one_is_set(desk):
    agent, buyer, order, _ = desk.completed(wallet=False)
    engine = desk.engine()
    [payout_id] = desk.take_all(engine, order["id"])
    assert engine.send(payout_id) == "blocked"
    engine.report(payout_id)
    assert desk.api.ok("GET", f"/api/orders/{order['id']}", agent)["payout"]["status"] == "blocked"
    assert engine.send(payout_id) == "blocked"  # asked again: still nowhere to send it

    wallet = SolanaWallet.generate().address
    desk.api.ok("PATCH", "/api/agents/me", agent, json={"payout_wallet": wallet, "payout_chain": "solana"})
    with desk.orders_db.transaction() as session:
        [event] = session.scalars(select(OutboxEvent).where(OutboxEvent.event == "agent.payout_wallet_set")).all()
        assert event.data == {"agent_id": agent.id}
    assert engine.unblock(engine.blocked_ids(agent.id)) == [payout_id]
    assert engine.send(payout_id) == "sent" and engine.report(payout_id)
    [transfer] = desk.rail_transfers(payout_id)
    assert transfer.to_address == wallet
    assert desk.api.ok("GET", f"/api/orders/{order['id']}", agent)["payout"]["status"] == "sent"


def test_the_orders_service_down_postpones_without_spending_an_attempt(desk):
    agent, buyer, order, wallet = desk.completed()
    [payout_id] = desk.take_all(desk.engine(), order["id"])
    down = desk.engine(orders_url="http://127.0.0.1:9")
    assert down.send(payout_id) == "pending"
    [payout] = desk.payouts(order["id"])
    assert payout.attempts == 0 and payout.next_attempt_at is not None and payout.last_error
    up = desk.engine()
    assert up.send(payout_id, now=utcnow() + dt.timedelta(hours=1)) == "sent"
    assert not down.report(payout_id)  # the news waits for the sweep
    assert up.unreported_ids(utcnow() + dt.timedelta(hours=1), grace_seconds=30) == [payout_id]
    assert up.report(payout_id)
    assert up.unreported_ids(utcnow() + dt.timedelta(hours=1)) == []
    assert desk.api.ok("GET", f"/api/orders/{order['id']}", agent)["payout"]["status"] == "sent"


# --- lost messages, reports out of order ----------------------------------------------------------------

def test_a_settlement_whose_message_was_lost_is_found_by_the_catch_up_sweep(desk):
    _, _, first, _ = desk.completed()
    _, buyer, second, _ = desk.completed()
    engine = desk.engine()
    assert engine.catch_up() == 0  # just settled: left to their own events for now
    later = utcnow() + dt.timedelta(seconds=31)
    assert engine.catch_up(now=later) == 2  # no event was ever handed over
    assert engine.catch_up(now=later) == 0  # read again: nothing new
    assert {p.order_id for p in engine_payouts(desk)} == {first["id"], second["id"]}
    assert desk.take_all(engine, second["id"]) == []  # the late message changes nothing
    assert desk.balance(ledger.escrow(first["id"])) == 0


def engine_payouts(desk) -> list[Payout]:
    with desk.db.transaction() as session:
        return list(session.scalars(select(Payout)))


def test_an_older_report_never_overwrites_a_newer_one(desk):
    agent, buyer, order, _ = desk.completed()
    assert desk.api.report_payout(order["id"], "payout", "sent", 3, tx_ref="sbx_abc")["applied"] is True
    assert desk.api.report_payout(order["id"], "payout", "pending", 2)["applied"] is False
    assert desk.api.report_payout(order["id"], "payout", "sent", 3, tx_ref="sbx_abc")["applied"] is False
    seen = desk.api.ok("GET", f"/api/orders/{order['id']}", agent)["payout"]
    assert (seen["status"], seen["tx_ref"]) == ("sent", "sbx_abc")
    assert len(desk.messages(order["id"], "order.payout_sent")) == 1


def test_backoff_grows_and_is_capped(desk):
    settings = desk.settings.replace(payout_retry_base_seconds=5, payout_retry_max_seconds=600)
    for attempt, ceiling in ((1, 5), (2, 10), (3, 20), (10, 600), (30, 600)):
        delays = [backoff(attempt, settings) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays), (attempt, min(delays), max(delays))
        assert len(set(delays)) > 1  # jittered


# --- internal API of the orders service -----------------------------------------------------------------

def test_the_sandbox_rail_makes_one_transfer_per_key(desk):
    body = {"idempotency_key": "payout:pay_x", "to": SolanaWallet.generate().address, "amount_usd": "12.34",
            "asset": "USDC", "chain": "solana"}
    first = desk.api.internal("POST", "/internal/sandbox/rail", json=body)
    again = desk.api.internal("POST", "/internal/sandbox/rail", json=body)
    assert first == again and first["amount_usd"] == "12.34"
    assert desk.api.internal("GET", "/internal/sandbox/rail/payout:pay_x")["tx_ref"] == first["tx_ref"]
    status, envelope = desk.api.call("GET", "/internal/sandbox/rail/payout:nothing",
                                     headers={"X-Service-Token": desk.settings.service_token})
    assert status == 404 and envelope["code"] == "not_found"


@pytest.mark.parametrize("path,body", [
    ("/internal/sandbox/rail", {"idempotency_key": "", "to": "x", "amount_usd": "1.00", "asset": "USDC",
                                "chain": "solana"}),
    ("/internal/sandbox/rail", {"idempotency_key": "k", "to": "x", "amount_usd": "1.001", "asset": "USDC",
                                "chain": "solana"}),
    ("/internal/sandbox/rail", ["not", "an", "object"]),
    ("/internal/orders/ord_nothing/settlements", {"id": "pay_x", "status": "sent", "version": "3",
                                                  "updated_at": "2026-11-29T10:00:00Z"}),
    ("/internal/orders/ord_nothing/settlements", {"id": "pay_x", "status": "paid", "version": 3,
                                                  "updated_at": "2026-11-29T10:00:00Z"}),
    ("/internal/orders/ord_nothing/settlements", {"id": "pay_x", "status": "sent", "version": 3,
                                                  "updated_at": "yesterday"}),
])
def test_internal_bad_input_is_a_400_in_the_envelope(desk, path, body):
    status, envelope = desk.api.call("POST", path, json=body, headers={"X-Service-Token": desk.settings.service_token})
    assert status == 400 and envelope["code"] == "validation_error", envelope


def test_internal_payout_routes_need_the_service_credential(desk):
    for method, path in (("GET", "/internal/agents/agt_x"), ("GET", "/internal/settlements?since=2026-01-01T00:00:00Z"),
                         ("POST", "/internal/sandbox/rail"), ("GET", "/internal/sandbox/rail"),
                         ("POST", "/internal/orders/ord_x/settlements")):
        status, envelope = desk.api.call(method, path, json={} if method == "POST" else None,
                                         headers={"X-Service-Token": "wrong"})
        assert status == 404 and envelope["code"] == "not_found", (method, path)


# --- reconcile ----------------------------------------------------------------------------------------

def test_reconcile_is_quiet_when_everything_agrees_and_names_each_mismatch(desk, capsys):
    engine = desk.engine()
    orders = [desk.completed()[2] for _ in range(2)]
    for order in orders:
        for payout_id in desk.take_all(engine, order["id"]):
            engine.send(payout_id)
            engine.report(payout_id)
    settings = desk.settings.replace(orders_url=desk.served.url)
    assert reconcile.main([], settings=settings) == 0
    assert "0 mismatches" in capsys.readouterr().out

    # money the ledger does not know about: a second transfer for an unknown key, a changed amount
    desk.api.internal("POST", "/internal/sandbox/rail", json={
        "idempotency_key": "payout:pay_ghost", "to": SolanaWallet.generate().address, "amount_usd": "5.00",
        "asset": "USDC", "chain": "solana"})
    with desk.db.transaction() as session:
        payout = session.scalar(select(Payout).where(Payout.order_id == orders[0]["id"]))
        payout.amount_cents += 1
    assert reconcile.main([], settings=settings) == 1
    out = capsys.readouterr().out
    assert "payout:pay_ghost" in out and "matches no payout" in out
    assert "the order says" in out and orders[0]["id"] in out


def test_reconcile_names_an_unsettled_order(desk, capsys):
    agent, buyer, order, _ = desk.completed()
    settings = desk.settings.replace(orders_url=desk.served.url)
    assert reconcile.main([], settings=settings) == 1
    assert f"order {order['id']}: payout" in capsys.readouterr().out


def test_a_payout_transfer_cannot_be_used_to_pay_an_order(desk):
    """The rail's transfers share the sandbox ledger with buyers' payments; they pay no order."""
    agent, wallet = desk.paid_agent()
    buyer = desk.api.buyer()
    order = desk.api.walk(agent, buyer, desk.api.order(buyer, desk.api.service(agent, "fixed")), "quoted")
    treasury = desk.settings.treasury_solana
    rail = desk.api.internal("POST", "/internal/sandbox/rail", json={
        "idempotency_key": "payout:pay_lookalike", "to": treasury, "amount_usd": "45.00", "asset": "USDC",
        "chain": "solana"})
    status, body = desk.api.patch(f"/api/orders/{order['id']}", buyer,
                                  json={"action": "pay", "escrow_tx_hash": rail["tx_ref"]})
    assert status == 402 and body["code"] == "payment_unverified"
    assert desk.api.ok("GET", f"/api/orders/{order['id']}", buyer)["status"] == "quoted"


def test_the_sweep_leaves_a_fresh_payout_to_the_task_that_created_it(desk):
    agent, buyer, order, _ = desk.completed()
    engine = desk.engine()
    [payout_id] = desk.take_all(engine, order["id"])
    now = utcnow()
    assert engine.due_ids(now, grace_seconds=30) == []
    assert engine.unreported_ids(now, grace_seconds=30) == []  # orders already shows it pending
    assert engine.due_ids(now + dt.timedelta(seconds=31), grace_seconds=30) == [payout_id]  # its message was lost


def test_processed_event_ids_are_forgotten_after_the_retention_period(desk):
    from services.payouts.models import ProcessedEvent
    agent, buyer, order, _ = desk.completed()
    engine = desk.engine()
    desk.take_all(engine, order["id"])
    with desk.db.transaction() as session:
        kept = session.scalars(select(ProcessedEvent.id)).all()
    assert len(kept) == 2  # order.paid and order.completed
    assert engine.prune(utcnow()) == 0
    assert engine.prune(utcnow() + dt.timedelta(days=desk.settings.retention_days, seconds=1)) == 2


def test_an_event_at_first_sight_is_paid_without_the_read_and_a_copy_of_it_still_pays_once(desk, monkeypatch):
    agent, buyer, order, wallet = desk.completed()
    engine = desk.engine()
    [completed] = desk.messages(order["id"], "order.completed")
    reads = []
    seen = engine._seen
    monkeypatch.setattr(engine, "_seen", lambda *args: reads.append(args) or seen(*args))
    first = engine.pay_first(completed, first_sight=True)
    copy = engine.pay_first(completed, first_sight=True)  # a broker's duplicate, delivered alongside
    assert reads == []  # nothing can be on record of an event at its first sight: not read
    [payout_id] = first
    assert copy[payout_id].transfer.tx_ref == first[payout_id].transfer.tx_ref  # the rail's key: one transfer
    assert engine.record_paid(completed, first) == [(payout_id, "sent")]
    assert engine.record_paid(completed, copy) == []
    assert len(desk.rail_transfers(payout_id)) == 1
    assert _ledger_keys(desk, order["id"]).count(f"sent:{payout_id}") == 1
    assert desk.balance(ledger.agent_wallet(agent.id)) == desk.payouts(order["id"])[0].amount_cents
    # the same event seen again otherwise (the sweep's copy, a restored message) is read and left alone
    assert engine.pay_first(completed) is None and len(reads) == 1
    assert len(desk.rail_transfers(payout_id)) == 1 and len(_calls(desk, payout_id)) == 2


def test_a_first_sight_that_meets_the_sweeps_settlement_pays_that_payout_once(desk):
    """The one way a first-sight message meets a record of its event: the worker was down past the
    sweep's grace and the sweep settled the order before the queued message ran."""
    agent, buyer, order, wallet = desk.completed()
    engine = desk.engine()
    [completed] = desk.messages(order["id"], "order.completed")
    assert engine.catch_up(now=utcnow() + dt.timedelta(seconds=31)) == 1  # settled by the sweep, pending
    [payout] = desk.payouts(order["id"])
    calls = engine.pay_first(completed, first_sight=True)  # the queued message, not read first
    assert list(calls) == [payout.id]
    assert engine.record_paid(completed, calls) == [(payout.id, "sent")]  # recorded against the sweep's payout
    assert engine.send(payout.id) == "sent"  # the sweep's own attempt finds it sent: no second transfer
    [transfer] = desk.rail_transfers(payout.id)
    [payout] = desk.payouts(order["id"])
    assert (payout.status, payout.tx_ref) == ("sent", transfer.tx_hash)
    assert _ledger_keys(desk, order["id"]).count(f"sent:{payout.id}") == 1
    assert desk.balance(ledger.agent_wallet(agent.id)) == payout.amount_cents
    with desk.db.transaction() as session:
        assert ledger.unbalanced(session) == []
