"""The order state machine, exhaustively, through the HTTP API (DESIGN.md §3-§4).

The rules below are DESIGN.md's table written out again, independently of
`services/orders/statemachine.py`; `test_code_table_agrees_with_design` pins the two together so
neither can drift silently. Every (state × action × actor) case builds a fresh order with
`api.order_in(state)`, calls the real endpoint with valid parameters and checks either the
transition (status, timeline entry, effect) or the refusal (403/409, order unchanged).
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import pytest

from services.orders import statemachine
from services.orders import cache
from services.orders.models import Order
from services.orders.payments import destination_for
from shared.db import utcnow
from tests.support.api import ADMIN, ApiClient

# --- DESIGN.md §3, written out -------------------------------------------------------------------

DESIGN_STATES = ("pending_quote", "quoted", "accepted", "paid", "in_progress", "delivered",
                 "revision_requested", "completed", "disputed", "cancelled")
DESIGN_TERMINAL = frozenset({"completed", "cancelled"})

# guards (named rules about time), as the design states them
OVERDUE = "due_at passed with no delivery"       # dispute/cancel from paid/in_progress
REVIEW_WINDOW_OVER = "review deadline passed"     # auto_complete
QUOTE_STALE = "older than quote expiry (7 days)"  # expire_quote
PERIOD_OVER = "workspace order at period end"     # close_workspace


@dataclass(frozen=True)
class Rule:
    action: str
    actor: str
    sources: frozenset
    targets: tuple  # every state the action can lead to from these sources (variants: see below)
    guard: str | None = None


def R(action, actor, sources, *targets, guard=None) -> Rule:
    return Rule(action, actor, frozenset(sources), tuple(targets), guard)


DESIGN_RULES: tuple[Rule, ...] = (
    R("quote", "agent", {"pending_quote"}, "quoted"),
    R("accept", "buyer", {"quoted"}, "accepted"),
    # workspace services (weekly, monthly) go to in_progress with the workspace opened
    R("pay", "buyer", {"quoted", "accepted"}, "paid", "in_progress"),
    R("start", "agent", {"paid"}, "in_progress"),
    R("deliver", "agent", {"paid", "in_progress", "revision_requested", "disputed", "delivered"}, "delivered"),
    R("approve", "buyer", {"delivered"}, "completed"),
    R("revision", "buyer", {"delivered"}, "revision_requested"),
    R("dispute", "buyer", {"delivered"}, "disputed"),
    R("dispute", "buyer", {"paid", "in_progress"}, "disputed", guard=OVERDUE),
    R("cancel", "buyer", {"pending_quote", "quoted", "accepted", "paid"}, "cancelled"),
    R("cancel", "buyer", {"in_progress"}, "cancelled", guard=OVERDUE),
    R("decline", "agent", {"pending_quote", "quoted", "accepted", "paid", "in_progress"}, "cancelled"),
    # release and split complete the order, refund cancels it
    R("resolve", "admin", {"disputed"}, "completed", "cancelled"),
    R("auto_complete", "system", {"delivered"}, "completed", guard=REVIEW_WINDOW_OVER),
    R("expire_quote", "system", {"pending_quote", "quoted", "accepted"}, "cancelled", guard=QUOTE_STALE),
    R("close_workspace", "system", {"in_progress"}, "delivered", guard=PERIOD_OVER),
)

# the actions a person takes through the API, and who may take each
HTTP_ACTIONS = ("quote", "accept", "pay", "start", "deliver", "approve", "revision", "dispute", "cancel",
                "decline", "resolve")
PEOPLE = ("buyer", "agent", "admin")
RESOLVE_TARGET = {"release": "completed", "split": "completed", "refund": "cancelled"}

# every (from, action, actor_type) the design can allow, guards aside: what a timeline may contain
ALLOWED = frozenset((s, r.action, r.actor) for r in DESIGN_RULES for s in r.sources)


def owner(action: str) -> str:
    return next(r.actor for r in DESIGN_RULES if r.action == action)


def expected(state: str, action: str, actor: str, *, overdue: bool = False, variant: str = "default",
             workspace_open: bool = False):
    """What the design says a person's call does: ("ok", target) | ("forbidden",) | ("invalid",).

    `overdue`: due_at has passed with nothing delivered. `variant`: "workspace" for a weekly or
    monthly order's pay, the outcome (release/refund/split) for resolve. `workspace_open`: a
    weekly or monthly order's workspace is open, so its delivery is its generations, made when it
    closes, and the agent does not deliver (docs/decisions.md).
    """
    if actor != owner(action):
        return ("forbidden",)
    if action == "deliver" and workspace_open:
        return ("invalid",)
    for rule in DESIGN_RULES:
        if rule.action != action or state not in rule.sources:
            continue
        if rule.guard == OVERDUE and not overdue:
            continue
        if rule.guard in (REVIEW_WINDOW_OVER, QUOTE_STALE, PERIOD_OVER):
            continue  # system only
        if action == "pay":
            return ("ok", "in_progress" if variant == "workspace" else "paid")
        if action == "resolve":
            return ("ok", RESOLVE_TARGET[variant])
        return ("ok", rule.targets[0])
    return ("invalid",)


# --- calling the API -----------------------------------------------------------------------------

def sandbox_tx(api, buyer, order) -> str:
    """A real sandbox transfer that pays `order` (at 45.00 when it has no price yet)."""
    settings = api.app.extensions["orders_runtime"].settings
    return api.ok("POST", "/api/sandbox/transfers", json={
        "from_wallet": buyer.id, "to": destination_for(buyer.chain, settings),
        "amount_usd": order["quoted_price_usd"] or "45.00", "asset": "USDC", "chain": buyer.chain})["tx_hash"]


def call_action(api, action: str, who, order: dict, buyer, outcome: str = "release"):
    """Call the action's real endpoint with valid parameters; returns (status, body, params)."""
    oid = order["id"]
    if action == "quote":
        params = {"price_usd": "50.00"}
        return (*api.post(f"/api/orders/{oid}/quote", who, json=params), params)
    if action == "start":
        return (*api.post(f"/api/orders/{oid}/start", who), {})
    if action == "decline":
        params = {"reason": "Too busy this week."}
        return (*api.post(f"/api/orders/{oid}/decline", who, json=params), params)
    if action == "deliver":
        params = {"deliverables": [{"url": "https://example.com/fox-v2", "media_type": "link"}]}
        return (*api.post(f"/api/orders/{oid}/deliver", who, json=params), params)
    if action == "resolve":
        params = {"outcome": outcome, "note": "Looked at both sides."}
        if outcome == "split":
            params["agent_amount_usd"] = "10.00"
        return (*api.post(f"/api/admin/orders/{oid}/resolve", who, json=params), params)
    params = {"action": action}
    if action == "pay":
        params["escrow_tx_hash"] = sandbox_tx(api, buyer, order)
    elif action == "revision":
        params["feedback"] = "Make the fox redder."
    elif action == "dispute":
        params["reason"] = "Not what I asked for."
    return (*api.patch(f"/api/orders/{oid}", who, json=params), params)


def snapshot(api, order_id: str) -> dict:
    return api.ok("GET", f"/api/orders/{order_id}", ADMIN)


def agent_profile(api, agent) -> dict:
    return api.ok("GET", f"/api/agents/{agent.id}")


def entry(action, source, target, actor_type, actor_id) -> dict:
    return {"action": action, "from": source, "to": target, "actor_type": actor_type, "actor_id": actor_id}


def strip(timeline) -> list[dict]:
    return [{k: t[k] for k in ("action", "from", "to", "actor_type", "actor_id")} for t in timeline]


def assert_refused(api, oid, agent, before, profile_before, status, body, code, http_status):
    assert (status, body["code"]) == (http_status, code), body
    assert body["success"] is False
    after = snapshot(api, oid)
    assert after["status"] == before["status"]
    assert len(after["timeline"]) == len(before["timeline"])
    assert after["updated_at"] == before["updated_at"]
    assert after == before  # nothing else moved either (deliveries, revisions, price, ...)
    assert agent_profile(api, agent) == profile_before


# --- the code's table agrees with the design -------------------------------------------------------

GUARD_NAMES = {"_overdue_without_delivery": OVERDUE, "_review_window_over": REVIEW_WINDOW_OVER,
               "_quote_stale": QUOTE_STALE, "_workspace_period_over": PERIOD_OVER}


def _flatten_design(rules):
    return {(r.action, r.actor, s, frozenset(r.targets), r.guard)
            for r in rules for s in r.sources}


def _flatten_code(table):
    return {(t.action, t.actor, s, frozenset(t.targets.values()),
             GUARD_NAMES[t.guard.__name__] if t.guard else None)
            for t in table for s in t.sources}


def test_code_table_agrees_with_design():
    assert statemachine.STATES == DESIGN_STATES
    assert statemachine.TERMINAL == DESIGN_TERMINAL
    code, design = _flatten_code(statemachine.TABLE), _flatten_design(DESIGN_RULES)
    assert code - design == set(), "the code allows what the design does not"
    assert design - code == set(), "the design allows what the code does not"
    assert statemachine.allowed_pairs() == ALLOWED


# --- every state × action × actor, through the API ---------------------------------------------------

CASES = [(s, a, who) for s in DESIGN_STATES for a in HTTP_ACTIONS for who in PEOPLE]


@pytest.fixture(scope="module")
def matrix_api(module_app):
    """One orders app for the 330 matrix cases (building an app per case would dominate the runtime).

    Built as the `make_app` fixture builds it. Every case makes its own agent, buyer and order, so
    the cases share no data; the tables are not wiped between cases (nothing here counts rows).
    """
    return ApiClient(module_app)


@pytest.mark.parametrize("state,action,actor", CASES, ids=[f"{s}-{a}-by-{w}" for s, a, w in CASES])
def test_transition(matrix_api, state, action, actor):
    api = matrix_api
    agent, buyer, order = api.order_in(state)
    oid = order["id"]
    who = {"buyer": buyer, "agent": agent, "admin": ADMIN}[actor]
    actor_id = {"buyer": buyer.id, "agent": agent.id, "admin": "admin"}[actor]
    before, profile_before = snapshot(api, oid), agent_profile(api, agent)

    status, body, params = call_action(api, action, who, before, buyer)
    outcome = expected(state, action, actor, variant="release" if action == "resolve" else "default")

    if outcome[0] == "forbidden":
        assert_refused(api, oid, agent, before, profile_before, status, body, "forbidden", 403)
        return
    if outcome[0] == "invalid":
        assert_refused(api, oid, agent, before, profile_before, status, body, "invalid_transition", 409)
        assert body["details"]["status"] == state
        return

    target = outcome[1]
    assert status == 200, body
    assert body["success"] is True and body["data"]["status"] == target
    after = snapshot(api, oid)
    assert after["status"] == target
    new = [entry(action, state, target, actor, actor_id)]
    if action == "pay" and state == "quoted":  # paying a quote accepts it first
        new = [entry("accept", "quoted", "accepted", "buyer", buyer.id),
               entry("pay", "accepted", target, "buyer", buyer.id)]
    assert after["timeline"][:len(before["timeline"])] == before["timeline"]
    assert strip(after["timeline"][len(before["timeline"]):]) == new
    assert after["updated_at"] >= before["updated_at"] and after["updated_at"] == after["timeline"][-1]["at"]

    # the action's effect
    profile = agent_profile(api, agent)
    completed_delta = 1 if target == "completed" else 0
    assert profile["completed_orders"] == profile_before["completed_orders"] + completed_delta
    assert profile["total_orders"] == profile_before["total_orders"]
    if action == "quote":
        assert after["quoted_price_usd"] == "50.00"
    elif action == "pay":
        assert after["escrow_tx_hash"] == params["escrow_tx_hash"] and after["due_at"] is not None
    elif action == "deliver":
        assert len(after["deliveries"]) == len(before["deliveries"]) + 1
        assert after["deliveries"][-1]["number"] == len(after["deliveries"])
        assert after["review_deadline_at"] is not None
    elif action == "revision":
        assert after["revision_count"] == before["revision_count"] + 1
        assert after["revisions"][-1]["feedback"] == params["feedback"]
        assert after["timeline"][-1]["note"] == params["feedback"]
    elif action in ("dispute", "decline"):
        assert after["timeline"][-1]["note"] == params["reason"]
    elif action == "resolve":
        assert after["timeline"][-1]["note"].startswith("release")


def test_matrix_covers_every_case():
    assert len(CASES) == len(statemachine.STATES) * 11 * 3 == 330
    assert set(HTTP_ACTIONS) == {a for a in statemachine.ACTIONS if owner(a) != "system"}


# --- resolve's three outcomes ----------------------------------------------------------------------

@pytest.mark.parametrize("outcome", ["release", "split", "refund"])
def test_resolve_outcomes(api, outcome):
    agent, buyer, order = api.order_in("disputed")
    status, body, _ = call_action(api, "resolve", ADMIN, order, buyer, outcome=outcome)
    assert status == 200, body
    target = expected("disputed", "resolve", "admin", variant=outcome)[1]
    after = snapshot(api, order["id"])
    assert after["status"] == target
    last = after["timeline"][-1]
    assert (last["action"], last["from"], last["to"], last["actor_type"]) == ("resolve", "disputed", target, "admin")
    assert last["note"].startswith(f"{outcome}: ")
    assert agent_profile(api, agent)["completed_orders"] == (1 if target == "completed" else 0)


# --- guarded rules: dispute / cancel once due_at has passed with no delivery --------------------------

def _make_overdue(db, order_id):
    with db.transaction() as session:  # as the app would: through the ORM, so the cached view follows
        order = session.get(Order, order_id)
        order.due_at = utcnow() - dt.timedelta(minutes=1)
        cache.changed(session, order)


@pytest.mark.parametrize("state,action", [("paid", "dispute"), ("in_progress", "dispute"),
                                          ("in_progress", "cancel")])
def test_overdue_guard(api, db, state, action):
    agent, buyer, order = api.order_in(state, turnaround_hours=1)
    oid = order["id"]
    pay = next(t for t in order["timeline"] if t["action"] == "pay")
    paid_at = dt.datetime.fromisoformat(pay["at"].replace("Z", "+00:00"))
    due_at = dt.datetime.fromisoformat(order["due_at"].replace("Z", "+00:00"))
    assert due_at - paid_at == dt.timedelta(hours=1)  # due_at = paid_at + turnaround_hours

    # before due_at: refused, nothing changes
    assert expected(state, action, "buyer", overdue=False) == ("invalid",)
    before, profile_before = snapshot(api, oid), agent_profile(api, agent)
    status, body, _ = call_action(api, action, buyer, before, buyer)
    assert_refused(api, oid, agent, before, profile_before, status, body, "invalid_transition", 409)
    assert "due_at" in body["details"]["reason"]

    # after due_at, nothing delivered: allowed
    _make_overdue(db, oid)
    before = snapshot(api, oid)
    outcome = expected(state, action, "buyer", overdue=True)
    assert outcome[0] == "ok"
    status, body, _ = call_action(api, action, buyer, before, buyer)
    assert status == 200, body
    after = snapshot(api, oid)
    assert after["status"] == outcome[1]
    assert strip(after["timeline"][len(before["timeline"]):]) == [
        entry(action, state, outcome[1], "buyer", buyer.id)]


@pytest.mark.parametrize("state,action", [("paid", "dispute"), ("in_progress", "dispute"),
                                          ("in_progress", "cancel")])
def test_overdue_does_not_open_the_action_to_the_agent(api, db, state, action):
    agent, buyer, order = api.order_in(state, turnaround_hours=1)
    _make_overdue(db, order["id"])
    before, profile_before = snapshot(api, order["id"]), agent_profile(api, agent)
    status, body, _ = call_action(api, action, agent, before, buyer)
    assert_refused(api, order["id"], agent, before, profile_before, status, body, "forbidden", 403)


# --- revisions beyond max_revisions ------------------------------------------------------------------

@pytest.mark.parametrize("max_revisions", [0, 1])
def test_revision_beyond_max_is_allowed_and_flagged_extra(api, max_revisions):
    agent, buyer, order = api.order_in("delivered", max_revisions=max_revisions)
    oid = order["id"]
    assert order["max_revisions"] == max_revisions
    for n in range(1, max_revisions + 3):
        status, body = api.action(buyer, oid, "revision", feedback=f"Round {n}: more red.")
        assert status == 200, body
        assert body["data"]["status"] == "revision_requested"
        api.deliver(agent, oid)
    after = snapshot(api, oid)
    assert after["status"] == "delivered"
    assert after["revision_count"] == max_revisions + 2
    assert [r["number"] for r in after["revisions"]] == list(range(1, max_revisions + 3))
    assert [r["is_extra"] for r in after["revisions"]] == [n > max_revisions for n in range(1, max_revisions + 3)]


# --- pay from quoted records accept then pay ----------------------------------------------------------

@pytest.mark.parametrize("price_type", ["fixed", "quote"])
def test_pay_from_quoted_records_accept_then_pay(api, price_type):
    agent, service, buyer = api.setup(price_type, price_usd="45.00" if price_type == "quote" else None)
    order = api.order(buyer, service)
    if price_type == "quote":
        order = api.ok("POST", f"/api/orders/{order['id']}/quote", agent, json={"price_usd": "45.00"})
    assert order["status"] == "quoted"
    order = api.pay(buyer, order["id"])
    assert order["status"] == "paid"
    tail = strip(order["timeline"])[-2:]
    assert tail == [entry("accept", "quoted", "accepted", "buyer", buyer.id),
                    entry("pay", "accepted", "paid", "buyer", buyer.id)]


def test_pay_from_accepted_records_only_pay(api):
    agent, buyer, order = api.order_in("accepted")
    order = api.pay(buyer, order["id"])
    assert [(t["action"], t["from"], t["to"]) for t in order["timeline"]] == [
        ("create", None, "quoted"), ("accept", "quoted", "accepted"), ("pay", "accepted", "paid")]


@pytest.mark.parametrize("price_type", ["weekly", "monthly"])
def test_pay_for_a_workspace_service_goes_to_in_progress(api, price_type):
    agent, service, buyer = api.setup(price_type)
    order = api.order(buyer, service)
    assert order["status"] == "quoted"
    order = api.pay(buyer, order["id"])
    assert order["status"] == expected("quoted", "pay", "buyer", variant="workspace")[1] == "in_progress"
    assert strip(order["timeline"])[-1] == entry("pay", "accepted", "in_progress", "buyer", buyer.id)


# --- system actions through the timer sweep ------------------------------------------------------------

def _at(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


def _sweep(app, now):
    from services.orders.tasks import sweep_timers
    return sweep_timers(app.extensions["db"], app.extensions["orders_runtime"], now=now)


def test_people_cannot_take_system_actions(api):
    """System actions are not in PATCH's action list: a validation error (DESIGN.md §4: 400
    `validation_error` in the envelope), and the order is unchanged."""
    agent, buyer, order = api.order_in("delivered")
    before = snapshot(api, order["id"])
    answers = [api.action(who, order["id"], action) for action in ("auto_complete", "expire_quote", "close_workspace")
               for who in (buyer, agent, ADMIN)]
    assert snapshot(api, order["id"]) == before
    assert [(status, body.get("success"), body.get("code")) for status, body in answers] == \
        [(400, False, "validation_error")] * len(answers), answers[0]


def test_auto_complete_after_the_review_window(api, settings):
    agent, buyer, order = api.order_in("delivered")
    oid = order["id"]
    deadline = _at(order["review_deadline_at"])
    delivered_at = _at(order["timeline"][-1]["at"])
    assert deadline - delivered_at == dt.timedelta(seconds=settings.review_window_seconds)

    before = snapshot(api, oid)
    assert _sweep(api.app, deadline - dt.timedelta(seconds=1)) == 0  # early: nothing happens
    assert snapshot(api, oid) == before

    assert _sweep(api.app, deadline + dt.timedelta(seconds=1)) == 1
    after = snapshot(api, oid)
    assert after["status"] == "completed"
    assert strip(after["timeline"][len(before["timeline"]):]) == [
        entry("auto_complete", "delivered", "completed", "system", "timer")]
    assert agent_profile(api, agent)["completed_orders"] == 1
    # a later sweep has nothing left to do
    assert _sweep(api.app, deadline + dt.timedelta(days=30)) == 0
    assert snapshot(api, oid) == after


def test_auto_complete_does_nothing_once_the_order_moved_on(api):
    agent, buyer, order = api.order_in("revision_requested")
    before = snapshot(api, order["id"])
    assert _sweep(api.app, _at(order["review_deadline_at"]) + dt.timedelta(hours=1)) == 0
    assert snapshot(api, order["id"]) == before


@pytest.mark.parametrize("state", ["pending_quote", "quoted", "accepted"])
def test_expire_quote_after_seven_days(api, settings, state):
    agent, buyer, order = api.order_in(state)
    oid = order["id"]
    assert settings.quote_expiry_seconds == 7 * 24 * 3600
    expires = _at(order["created_at"]) + dt.timedelta(seconds=settings.quote_expiry_seconds)

    before = snapshot(api, oid)
    assert _sweep(api.app, expires - dt.timedelta(seconds=1)) == 0  # early: nothing happens
    assert snapshot(api, oid) == before

    assert _sweep(api.app, expires + dt.timedelta(seconds=1)) == 1
    after = snapshot(api, oid)
    assert after["status"] == "cancelled"
    assert strip(after["timeline"][len(before["timeline"]):]) == [
        entry("expire_quote", state, "cancelled", "system", "timer")]


@pytest.mark.parametrize("state", ["paid", "in_progress", "revision_requested", "completed", "disputed",
                                   "cancelled"])
def test_expire_quote_leaves_orders_past_the_quote_alone(api, settings, state):
    agent, buyer, order = api.order_in(state)
    before = snapshot(api, order["id"])
    expires = _at(order["created_at"]) + dt.timedelta(seconds=settings.quote_expiry_seconds)
    # every timer of these orders is due by then (expire_quote, auto_complete), and none applies
    assert _sweep(api.app, expires + dt.timedelta(seconds=1)) == 0
    assert snapshot(api, order["id"]) == before
