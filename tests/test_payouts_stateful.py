"""Random interleavings of the payouts worker's steps (hypothesis.stateful): money moves at most
once at every step, and exactly once when the dust settles.

A few settled orders (an approval, a paid order cancelled, a dispute split between the parties)
give their events to an engine step by step, the way workers would: an event is taken (and taken
again: the broker may deliver twice), the attempts it claimed go to the rail, or their worker dies
first; or the event is paid first (its rail calls made before anything is written) and then
recorded, or its worker dies in between; the rail fails, times out before paying, or pays and loses the answer; beat's sweep comes
round on a clock that only moves forward and sends whatever is due, including what a dead worker
held. After every step: no payout has more than one rail transfer, a `sent` payout has exactly
one and its ledger record, and every ledger transaction balances. At the end, with the faults
gone and failed payouts retried by an admin, every payout is sent once and every escrow is empty.
tests/test_payouts_faults.py does the same with real processes, SIGKILL and a Redis restart.
"""
from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test
from sqlalchemy import select

from services.payouts import ledger
from services.payouts.engine import Attempt, lease_seconds
from services.payouts.models import LedgerTransaction, Payout
from shared.db import utcnow
from tests.support.api import ADMIN
from tests.support.wallets import SolanaWallet
from tests.test_payouts import Desk

PROFILE = settings(max_examples=12, stateful_step_count=30, deadline=None, database=None,
                   phases=(Phase.explicit, Phase.generate),
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
# the rail's behaviour on a call: each fault engine's counter is far above any example's calls
FAULTS = {"answers": "", "fails": "fail=1000000", "times out": "timeout=1000000",
          "pays and loses the answer": "ambiguous=1000000"}
SETTLING = ("order.paid", "order.completed", "order.cancelled")


@pytest.fixture
def desk(app, redis_url):
    d = Desk(app, redis_url)
    yield d
    d.close()


def test_any_interleaving_moves_each_payouts_money_exactly_once(desk):
    engines = {name: desk.engine(faults=spec) for name, spec in FAULTS.items()}
    lease = dt.timedelta(seconds=lease_seconds(desk.settings) + 1)
    api = desk.api

    class PayoutsWorkers(RuleBasedStateMachine):
        @initialize(agent_has_wallet=st.booleans())
        def settle_some_orders(self, agent_has_wallet):
            self.agent, _ = desk.paid_agent(wallet=agent_has_wallet)
            self.agent_has_wallet = agent_has_wallet
            service = api.service(self.agent, "fixed", price_usd="45.00")
            self.buyer = api.buyer()
            self.orders = []
            for ending in ("approve", "cancel", "split"):
                state = {"approve": "completed", "cancel": "paid", "split": "disputed"}[ending]
                order = api.walk(self.agent, self.buyer, api.order(self.buyer, service), state)
                if ending == "cancel":
                    api.ok("PATCH", f"/api/orders/{order['id']}", self.buyer, json={"action": "cancel"})
                elif ending == "split":
                    api.ok("POST", f"/api/admin/orders/{order['id']}/resolve", ADMIN, json={
                        "outcome": "split", "agent_amount_usd": "20.00", "note": "Half of it."})
                self.orders.append(order["id"])
            self.messages = [m for oid in self.orders for m in desk.messages(oid) if m["event"] in SETTLING]
            self.in_flight: list[Attempt] = []  # claimed attempts whose worker has not called the rail yet
            self.by_id: list[str] = []  # payouts a settle task handed to send() by id
            self.paid_first: list[tuple[dict, dict]] = []  # (event, rail calls) paid but not yet recorded
            self.clock = utcnow()

        # --- what workers do ---------------------------------------------------------------------

        @rule(data=st.data())
        def a_worker_takes_an_event(self, data):
            message = data.draw(st.sampled_from(self.messages))  # again, sometimes: duplicates
            for item in engines["answers"].take_and_claim(message):
                (self.in_flight if isinstance(item, Attempt) else self.by_id).append(item)

        @rule(data=st.data(), rail=st.sampled_from(sorted(FAULTS)))
        def a_worker_pays_an_event_first(self, data, rail):
            message = data.draw(st.sampled_from(self.messages))  # again, sometimes: duplicates
            calls = engines[rail].pay_first(message)
            if calls is not None:
                self.paid_first.append((message, calls))

        @rule(data=st.data())
        def a_worker_records_what_it_paid_first(self, data):
            if self.paid_first:
                message, calls = self.paid_first.pop(data.draw(st.integers(0, len(self.paid_first) - 1)))
                for payout_id, status in engines["answers"].record_paid(message, calls):
                    if status is None:
                        self.by_id.append(payout_id)

        @rule(data=st.data())
        def a_worker_dies_after_paying_first(self, data):
            if self.paid_first:
                self.paid_first.pop(data.draw(st.integers(0, len(self.paid_first) - 1)))

        @rule(data=st.data(), rail=st.sampled_from(sorted(FAULTS)))
        def a_worker_calls_the_rail(self, data, rail):
            if self.in_flight:
                attempt = self.in_flight.pop(data.draw(st.integers(0, len(self.in_flight) - 1)))
                engines[rail].transfer(attempt)

        @rule(data=st.data())
        def a_worker_dies_before_calling_the_rail(self, data):
            if self.in_flight:
                self.in_flight.pop(data.draw(st.integers(0, len(self.in_flight) - 1)))

        @rule(rail=st.sampled_from(sorted(FAULTS)))
        def a_worker_sends_a_payout_handed_over_by_id(self, rail):
            if self.by_id:
                engines[rail].send(self.by_id.pop(0), now=self.clock)

        @rule(seconds=st.sampled_from([0, 1, 30, lease.total_seconds(), 700]), rail=st.sampled_from(sorted(FAULTS)))
        def beat_sweeps(self, seconds, rail):
            self.clock += dt.timedelta(seconds=seconds)
            for payout_id in engines[rail].due_ids(self.clock, grace_seconds=30):
                engines[rail].send(payout_id, now=self.clock)

        # --- what must hold after every step ----------------------------------------------------------

        def payouts(self) -> list[Payout]:
            with desk.db.transaction() as session:
                return list(session.scalars(select(Payout).where(Payout.order_id.in_(self.orders))))

        @invariant()
        def money_moves_at_most_once(self):
            for payout in self.payouts():
                transfers = desk.rail_transfers(payout.id)
                assert len(transfers) <= 1, (payout.id, payout.kind, [t.tx_hash for t in transfers])
                if payout.status == "sent":
                    assert len(transfers) == 1 and transfers[0].tx_hash == payout.tx_ref
                    assert transfers[0].amount_cents == payout.amount_cents
                    with desk.db.transaction() as session:
                        assert ledger.exists(session, f"sent:{payout.id}")
            with desk.db.transaction() as session:
                assert ledger.unbalanced(session) == []

        def teardown(self):
            """The faults are gone: take every event once more, give the agent a wallet, retry what
            failed, sweep until nothing is due; every payout is then sent exactly once."""
            good = engines["answers"]
            for message in self.messages:
                good.take_event(message)
            if not self.agent_has_wallet:
                api.ok("PATCH", "/api/agents/me", self.agent, json={
                    "payout_wallet": SolanaWallet.generate().address, "payout_chain": "solana"})
            for _ in range(good.settings.payout_max_attempts + 2):
                for payout_id in good.unblock(good.blocked_ids(self.agent.id)):  # as resume_agent does
                    good.send(payout_id, now=self.clock)
                for payout in self.payouts():
                    if payout.status == "failed":
                        good.retry(payout.id)
                self.clock += dt.timedelta(seconds=good.settings.payout_retry_max_seconds + lease.total_seconds())
                for payout_id in good.due_ids(self.clock):
                    good.send(payout_id, now=self.clock)
                if all(p.status == "sent" for p in self.payouts()):
                    break
            payouts = self.payouts()
            # approve: the agent's payout; cancel: the buyer's refund; split: one of each
            assert sorted(p.kind for p in payouts) == ["payout", "payout", "refund", "refund"]
            assert [p.status for p in payouts] == ["sent"] * 4, [(p.kind, p.status, p.last_error) for p in payouts]
            assert all(len(desk.rail_transfers(p.id)) == 1 for p in payouts)
            assert all(desk.balance(ledger.escrow(oid)) == 0 for oid in self.orders)
            with desk.db.transaction() as session:
                settled = session.scalars(select(LedgerTransaction.key).where(
                    LedgerTransaction.order_id.in_(self.orders), LedgerTransaction.kind == "settle")).all()
            assert len(settled) == len(self.orders)

    run_state_machine_as_test(PayoutsWorkers, settings=PROFILE)
