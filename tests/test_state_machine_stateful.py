"""Random walks through the order state machine (hypothesis.stateful), against one app.

Random actors — the buyer, the agent, an admin, and the system timer sweep on a clock that only
moves forward — take random actions on a few orders. Each call's answer is checked against the
DESIGN.md table written out in tests/test_state_machine.py, and after every step the invariants
hold: statuses are states of the design, every timeline entry is a transition the design allows,
the timeline replays to the current status, `completed` happens at most once and nothing follows a
terminal state, and the agent's `completed_orders` counts its completed orders.

The app is built once per test; every hypothesis example makes its own agent, buyer and orders
instead of wiping the database, so the timer sweep also meets earlier examples' orders and is
checked against every order in the database.
"""
from __future__ import annotations

import datetime as dt
import os

from hypothesis import HealthCheck, Phase, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition, rule,
                                 run_state_machine_as_test)
from sqlalchemy import select

from services.orders import cache
from services.orders.models import Order
from services.orders.statemachine import STATES
from services.orders.models import Workspace
from services.orders.tasks import sweep_timers
from services.orders.workspace_tasks import sweep_workspaces
from shared.db import utcnow
from tests.support.api import ADMIN, ApiClient
from tests.test_state_machine import (ALLOWED, DESIGN_STATES, DESIGN_TERMINAL, HTTP_ACTIONS, PEOPLE,
                                      call_action, expected)

# Default: modest, and no shrinking (every step is several HTTP calls, so shrinking can outlast the
# test timeout); a failure still prints its whole step sequence. ORDERS_STATEFUL_PROFILE picks
# another profile: orders-stateful-shrink (same, minimized on failure), orders-stateful-deep.
settings.register_profile("orders-stateful", max_examples=10, stateful_step_count=30, deadline=None,
                          database=None,  # write no example database into the repo
                          phases=(Phase.explicit, Phase.generate),
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
settings.register_profile("orders-stateful-shrink", parent=settings.get_profile("orders-stateful"),
                          phases=(Phase.explicit, Phase.generate, Phase.shrink))
settings.register_profile("orders-stateful-deep", parent=settings.get_profile("orders-stateful-shrink"),
                          max_examples=200, stateful_step_count=60)
PROFILE = settings.get_profile(os.environ.get("ORDERS_STATEFUL_PROFILE", "orders-stateful"))

MAX_LIVE_ORDERS = 3  # orders not yet completed or cancelled, per example
MAX_ORDERS = 8
PRICE_TYPES = ("fixed", "quote", "weekly")
WORKSPACE_TYPES = ("weekly", "monthly")
QUOTE_STAGE = ("pending_quote", "quoted", "accepted")


def _at(value: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


def test_random_walks_keep_the_invariants(make_app):
    app = make_app()
    api = ApiClient(app)
    db, rt = app.extensions["db"], app.extensions["orders_runtime"]
    review_window = dt.timedelta(seconds=rt.settings.review_window_seconds)
    quote_expiry = dt.timedelta(seconds=rt.settings.quote_expiry_seconds)

    class OrderDesk(RuleBasedStateMachine):
        def __init__(self):
            super().__init__()
            self.agent, self.buyer = api.agent(), api.buyer()
            # turnaround 1 h: due_at never passes by itself during the test;
            # `turnaround_time_runs_out` moves it into the past
            self.services = {pt: api.service(self.agent, pt, turnaround_hours=1) for pt in PRICE_TYPES}
            self.model: dict[str, str] = {}  # order id → the status the design says it has
            self.price_type: dict[str, str] = {}
            self.clock = utcnow()  # the sweeps' clock; only moves forward
            self.moved_since_sweep = True
            self.overdue: set[str] = set()  # orders whose due_at was moved into the past

        # --- actions ---------------------------------------------------------------------------

        def _place(self, price_type):
            order = api.order(self.buyer, self.services[price_type])
            assert order["status"] == ("pending_quote" if price_type == "quote" else "quoted")
            self.model[order["id"]] = order["status"]
            self.price_type[order["id"]] = price_type

        @initialize(price_type=st.sampled_from(PRICE_TYPES))
        def first_order(self, price_type):
            self._place(price_type)

        def live(self) -> list[str]:
            return [oid for oid, status in self.model.items() if status not in DESIGN_TERMINAL]

        @precondition(lambda self: len(self.live()) < MAX_LIVE_ORDERS and len(self.model) < MAX_ORDERS)
        @rule(price_type=st.sampled_from(PRICE_TYPES))
        def place_order(self, price_type):
            self._place(price_type)

        # Two identical rules, so that people act twice as often as the other steps happen.
        @rule(data=st.data())
        def a_person_acts(self, data):
            self._person_acts(data)

        @rule(data=st.data())
        def another_person_acts(self, data):
            self._person_acts(data)

        def _person_acts(self, data):
            """Mostly a move the design lets its owner make from a live order's status (guards
            aside; moves that keep the order going three times as likely as cancel/decline), so
            the walks get past the first states; else any action by anyone on any order, which
            is mostly refused."""
            outcome = data.draw(st.sampled_from(("release", "split", "refund")), label="resolve outcome")
            live = self.live()
            if live and data.draw(st.sampled_from(("move", "move", "move", "anything")), label="kind") == "move":
                oid = data.draw(st.sampled_from(live), label="order")
                moves = sorted({(action, who) for (source, action, who) in ALLOWED
                                if source == self.model[oid] and action in HTTP_ACTIONS})
                weighted = [m for m in moves for _ in range(1 if m[0] in ("cancel", "decline") else 3)]
                action, actor = data.draw(st.sampled_from(weighted), label="move")
            else:
                oid = data.draw(st.sampled_from(list(self.model)), label="order")  # creation order:
                # ids are random, so sorting them would make a replay pick other orders
                action = data.draw(st.sampled_from(HTTP_ACTIONS), label="action")
                actor = data.draw(st.sampled_from(PEOPLE), label="actor")
            self._act(oid, action, actor, outcome)

        def _act(self, oid, action, actor, outcome):
            self.moved_since_sweep = True
            before = api.ok("GET", f"/api/orders/{oid}", ADMIN)
            state = before["status"]
            assert state == self.model[oid]
            due_at = _at(before["due_at"])
            overdue = due_at is not None and due_at <= utcnow() and not before["deliveries"]
            variant = "default"
            if action == "resolve":
                variant = outcome
            elif action == "pay" and self.price_type[oid] in WORKSPACE_TYPES:
                variant = "workspace"
            workspace = before["workspace"]
            want = expected(state, action, actor, overdue=overdue, variant=variant,
                            workspace_open=bool(workspace) and workspace["closed_at"] is None)

            who = {"buyer": self.buyer, "agent": self.agent, "admin": ADMIN}[actor]
            status, body, _ = call_action(api, action, who, before, self.buyer, outcome=outcome)
            if want[0] == "ok":
                assert status == 200, (state, action, actor, body)
                assert body["data"]["status"] == want[1]
                self.model[oid] = want[1]
                event(f"{action} by {actor}: {state} -> {want[1]}")  # --hypothesis-show-statistics
            else:
                code = {"forbidden": (403, "forbidden"), "invalid": (409, "invalid_transition")}[want[0]]
                assert (status, body["code"]) == code, (state, action, actor, body)

        def waiting_on_the_agent(self) -> list[str]:
            return [oid for oid in self.live() if self.model[oid] in ("paid", "in_progress")
                    and oid not in self.overdue]

        @precondition(lambda self: self.waiting_on_the_agent())
        @rule(data=st.data())
        def turnaround_time_runs_out(self, data):
            """A paid order's due_at moves into the past: the agent is late."""
            oid = data.draw(st.sampled_from(self.waiting_on_the_agent()), label="order")
            self.moved_since_sweep = True
            self.overdue.add(oid)
            with db.transaction() as session:  # as the app would: through the ORM, so the cached view follows
                order = session.get(Order, oid)
                order.due_at = utcnow() - dt.timedelta(minutes=1)
                cache.changed(session, order)

        @precondition(lambda self: self.moved_since_sweep)
        @rule(hours=st.one_of(st.sampled_from((0, 1, 47, 49, 24 * 7 + 1)), st.integers(0, 24)))
        def sweep(self, hours):
            """The system: the timer and workspace sweeps run at a later time."""
            self.moved_since_sweep = False  # no sweep right after a sweep: the steps go to people
            now = self.clock = self.clock + dt.timedelta(hours=hours, seconds=1)
            # what the design says is due, over every order in the database (earlier examples' too)
            with db.transaction() as session:
                due = {}
                for order in session.scalars(select(Order).where(Order.status.in_(("delivered",) + QUOTE_STAGE))):
                    if order.status == "delivered" and order.review_deadline_at <= now:
                        due[order.id] = ("auto_complete", order.status, "completed")
                    elif order.status in QUOTE_STAGE and order.created_at + quote_expiry <= now:
                        due[order.id] = ("expire_quote", order.status, "cancelled")
                closing = session.scalars(select(Workspace.order_id).join(Order, Order.id == Workspace.order_id)
                                          .where(Order.status == "in_progress", Workspace.expires_at <= now))
                due.update({oid: ("close_workspace", "in_progress", "delivered") for oid in closing})
            # the workspace sweep first: its deliveries' review windows start now, so no timer is due
            assert sweep_workspaces(db, rt, now=now)["closed"] == sum(d[0] == "close_workspace" for d in due.values())
            assert sweep_timers(db, rt, now=now) == sum(d[0] != "close_workspace" for d in due.values())
            with db.transaction() as session:
                for order_id, (_action, _source, target) in due.items():
                    assert session.get(Order, order_id).status == target
            for oid in self.model:
                if oid in due:
                    action, source, target = due[oid]
                    last = api.ok("GET", f"/api/orders/{oid}", ADMIN)["timeline"][-1]
                    assert (last["action"], last["from"], last["to"], last["actor_type"]) == \
                        (action, source, target, "system")
                    self.model[oid] = target
                    event(f"{action} by system: {source} -> {target}")

        # --- invariants ------------------------------------------------------------------------

        @invariant()
        def orders_follow_the_design(self):
            completed = 0
            for oid, status in self.model.items():
                order = api.ok("GET", f"/api/orders/{oid}", ADMIN)
                assert order["status"] in STATES and order["status"] in DESIGN_STATES
                assert order["status"] == status
                timeline = order["timeline"]
                first = timeline[0]
                assert (first["action"], first["from"], first["actor_type"]) == ("create", None, "buyer")
                assert first["to"] == ("pending_quote" if self.price_type[oid] == "quote" else "quoted")
                for prev, entry in zip(timeline, timeline[1:]):
                    assert (entry["from"], entry["action"], entry["actor_type"]) in ALLOWED, entry
                    assert entry["from"] == prev["to"], (prev, entry)
                    assert prev["to"] not in DESIGN_TERMINAL, ("a transition after a terminal state", timeline)
                assert timeline[-1]["to"] == order["status"]
                assert [e["to"] for e in timeline].count("completed") <= 1
                if order["deliveries"]:  # the review window restarts at every delivery (a workspace's close too)
                    deliveries = [e for e in timeline if e["action"] in ("deliver", "close_workspace")]
                    assert _at(order["review_deadline_at"]) == _at(deliveries[-1]["at"]) + review_window
                    assert len(order["deliveries"]) == len(deliveries)
                completed += order["status"] == "completed"

            profile = api.ok("GET", f"/api/agents/{self.agent.id}")
            assert profile["completed_orders"] == completed
            assert profile["total_orders"] == len(self.model)
            listed = api.ok("GET", f"/api/agents/{self.agent.id}/orders?status=completed&limit=100", self.agent)
            assert len(listed["items"]) == completed

    run_state_machine_as_test(OrderDesk, settings=PROFILE)
