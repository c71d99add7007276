"""Workspaces of weekly and monthly orders (DESIGN.md §3-§5): paying opens one; the buyer's
`generate` reserves a unit of quota; the workspaces worker dispatches it to the agent, who answers
with a result or a failure; unanswered generations time out and give their unit back; at the
period's end the workspace closes and its generations become the delivery; renewal starts the
next period's order.

The worker's steps are called here in-process (`sweep_workspaces`, `workspaces.dispatch`) with
`now` moved forward where time matters; tests/test_workspaces_live.py runs them in the real
worker process."""
from __future__ import annotations

import datetime as dt
from collections import Counter

import pytest
from sqlalchemy import func, select

from services.orders import workspaces
from services.orders.models import Generation, OutboxEvent
from services.orders.workspace_tasks import sweep_workspaces
from shared.db import utcnow
from tests.support.api import ADMIN, ApiClient
from tests.test_uploads import jpeg

WEEK, MONTH = 7 * 24 * 3600, 30 * 24 * 3600


def _at(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


class Workspace:
    """A paid weekly (or monthly) order and its parties, with the calls a test makes on it."""

    def __init__(self, api, price_type="weekly", quota=3):
        self.api = api
        self.agent, self.service, self.buyer = api.setup(price_type, price_usd="25.00", quota_limit=quota)
        self.order = api.pay(self.buyer, api.order(self.buyer, self.service)["id"])
        self.oid = self.order["id"]

    @property
    def rt(self):
        return self.api.app.extensions["orders_runtime"]

    @property
    def db(self):
        return self.api.app.extensions["db"]

    def generate(self, prompt="A fox in the snow.", who=None):
        return self.api.post(f"/api/orders/{self.oid}/generate", who or self.buyer, json={"prompt": prompt})

    def generated(self, prompt="A fox in the snow.") -> dict:
        status, body = self.generate(prompt)
        assert status == 202, body
        return body["data"]["generation"]

    def dispatch_all(self) -> int:
        with self.db.transaction() as session:
            ids = session.scalars(select(Generation.id).where(Generation.order_id == self.oid,
                                                              Generation.dispatched_at.is_(None))).all()
        done = 0
        for gid in ids:
            with self.db.transaction() as session:
                done += workspaces.dispatch(session, self.rt, gid)
        return done

    def answer(self, gid, body, who=None):
        return self.api.post(f"/api/orders/{self.oid}/generations/{gid}", who or self.agent, json=body)

    def view(self, who=ADMIN) -> dict:
        return self.api.ok("GET", f"/api/orders/{self.oid}", who)

    def generations(self, who=None, query="") -> list[dict]:
        return self.api.ok("GET", f"/api/orders/{self.oid}/generations{query}", who or self.buyer)["items"]

    def sweep(self, now) -> dict:
        return sweep_workspaces(self.db, self.rt, now=now)

    def expires_at(self) -> dt.datetime:
        """The period's end (views show milliseconds: this is the first millisecond after it)."""
        return _at(self.view()["workspace"]["expires_at"]) + dt.timedelta(milliseconds=1)


# --- opening -------------------------------------------------------------------------------------

@pytest.mark.parametrize("price_type,period", [("weekly", WEEK), ("monthly", MONTH)])
def test_paying_opens_the_workspace_for_its_period_with_the_services_quota(api, price_type, period):
    ws = Workspace(api, price_type, quota=12)
    order = ws.order
    assert order["status"] == "in_progress"
    workspace = order["workspace"]
    assert _at(workspace["expires_at"]) - _at(workspace["opened_at"]) == dt.timedelta(seconds=period)
    assert (workspace["quota_total"], workspace["quota_used"], workspace["generations_pending"],
            workspace["closed_at"]) == (12, 0, 0, None)
    assert workspace["opened_at"] == order["timeline"][-1]["at"]  # opened by the payment
    assert order["due_at"] == workspace["expires_at"]  # its delivery is due at the period's end
    for who in (ws.buyer, ws.agent, ADMIN):
        assert api.ok("GET", f"/api/orders/{ws.oid}", who)["workspace"] == workspace


def test_the_period_lengths_are_settings(make_app):
    api = ApiClient(make_app(workspace_weekly_seconds=60, workspace_monthly_seconds=120))
    for price_type, seconds in (("weekly", 60), ("monthly", 120)):
        workspace = Workspace(api, price_type).order["workspace"]
        assert _at(workspace["expires_at"]) - _at(workspace["opened_at"]) == dt.timedelta(seconds=seconds)


def test_other_orders_have_no_workspace(api):
    for state in ("quoted", "paid", "completed"):
        assert api.order_in(state)[2]["workspace"] is None
    _, service, buyer = api.setup("weekly", quota_limit=5)
    unpaid = api.order(buyer, service)
    assert (unpaid["status"], unpaid["workspace"]) == ("quoted", None)


# --- generate --------------------------------------------------------------------------------------

def test_generate_reserves_one_unit_and_returns_the_pending_generation(api):
    ws = Workspace(api, quota=3)
    status, body = ws.generate("A fox in the snow, at dusk.")
    assert status == 202, body
    data = body["data"]
    generation = data["generation"]
    assert generation["id"].startswith("gen_") and generation["prompt"] == "A fox in the snow, at dusk."
    assert generation["status"] == "pending" and generation["result"] is None
    assert (data["quota_used"], data["quota_total"]) == (1, 3)
    assert data["expires_at"] == ws.order["workspace"]["expires_at"]
    workspace = ws.view(ws.buyer)["workspace"]
    assert (workspace["quota_used"], workspace["generations_pending"]) == (1, 1)
    assert [g["id"] for g in ws.generations()] == [generation["id"]]


def test_past_the_quota_generate_is_refused_and_reserves_nothing(api):
    ws = Workspace(api, quota=2)
    ws.generated("one")
    ws.generated("two")
    before = ws.view()
    status, body = ws.generate("three")
    assert (status, body["code"]) == (409, "quota_exhausted"), body
    assert (body["details"]["quota_total"], body["details"]["quota_used"]) == (2, 2)
    assert ws.view() == before
    assert len(ws.generations()) == 2


def test_a_quota_of_zero_is_unlimited(api):
    ws = Workspace(api, quota=0)
    for n in range(30):
        ws.generated(f"prompt {n}")
    workspace = ws.view()["workspace"]
    assert (workspace["quota_total"], workspace["quota_used"]) == (0, 30)


def test_only_the_buyer_generates(api):
    ws = Workspace(api)
    stranger = api.buyer()
    other_agent = api.agent("Someone else")
    before = ws.view()
    answers = {who: ws.generate(who=party) for who, party in
               (("agent", ws.agent), ("admin", ADMIN), ("stranger", stranger), ("other agent", other_agent))}
    assert {who: (status, body["code"]) for who, (status, body) in answers.items()} == {
        "agent": (403, "forbidden"), "admin": (403, "forbidden"),
        "stranger": (404, "not_found"), "other agent": (404, "not_found")}
    status, body = api.post(f"/api/orders/{ws.oid}/generate", json={"prompt": "x"})
    assert (status, body["code"]) == (401, "unauthenticated")
    for unknown in ("ord_" + "x" * 20, "nonsense"):
        status, body = api.post(f"/api/orders/{unknown}/generate", ws.buyer, json={"prompt": "x"})
        assert (status, body["code"]) == (404, "not_found")
    assert ws.view() == before


def test_generate_on_an_order_without_an_open_workspace_is_refused(api):
    agent, buyer, fixed = api.order_in("in_progress")
    status, body = api.post(f"/api/orders/{fixed['id']}/generate", buyer, json={"prompt": "x"})
    assert (status, body["code"]) == (409, "invalid_transition")

    _, service, buyer = api.setup("weekly", quota_limit=5)
    unpaid = api.order(buyer, service)
    status, body = api.post(f"/api/orders/{unpaid['id']}/generate", buyer, json={"prompt": "x"})
    assert (status, body["code"]) == (409, "invalid_transition") and "paid" in body["error"]


@pytest.mark.parametrize("body", [{}, {"prompt": ""}, {"prompt": "   "}, {"prompt": "x" * 2001}, {"prompt": 5},
                                  {"prompt": None}, {"prompt": ["a"]}, {"prompt": "ok", "extra": 1}])
def test_a_bad_prompt_is_a_validation_error_and_reserves_nothing(api, body):
    ws = Workspace(api)
    before = ws.view()
    status, answer = api.post(f"/api/orders/{ws.oid}/generate", ws.buyer, json=body)
    assert (status, answer["code"]) == (400, "validation_error"), answer
    assert "prompt" in answer["details"]["fields"] or "extra" in answer["details"]["fields"]
    assert ws.view() == before


def test_a_prompt_of_2000_characters_is_accepted(api):
    ws = Workspace(api)
    assert ws.generated("p" * 2000)["prompt"] == "p" * 2000


def test_generate_replays_with_the_same_idempotency_key(api):
    ws = Workspace(api, quota=5)
    headers = {"Idempotency-Key": "gen-once"}
    first = api.call("POST", f"/api/orders/{ws.oid}/generate", ws.buyer, json={"prompt": "x"}, headers=headers)
    again = api.call("POST", f"/api/orders/{ws.oid}/generate", ws.buyer, json={"prompt": "x"}, headers=headers)
    assert first == again and first[0] == 202
    assert ws.view()["workspace"]["quota_used"] == 1


# --- dispatch to the agent ---------------------------------------------------------------------------

def test_the_agent_sees_a_generation_once_dispatched_with_an_event_for_webhooks(api):
    ws = Workspace(api)
    generation = ws.generated()
    pending = f"/api/agents/{ws.agent.id}/generations?status=pending"
    assert api.ok("GET", pending, ws.agent)["items"] == []  # not told yet

    assert ws.dispatch_all() == 1
    assert ws.dispatch_all() == 0  # once
    with ws.db.transaction() as session:
        assert workspaces.dispatch(session, ws.rt, generation["id"]) is False  # a repeated message
    [shown] = api.ok("GET", pending, ws.agent)["items"]
    assert (shown["id"], shown["order_id"], shown["prompt"], shown["status"]) == (
        generation["id"], ws.oid, generation["prompt"], "pending")
    assert _at(shown["deadline_at"]) - _at(shown["dispatched_at"]) == dt.timedelta(hours=1)

    with ws.db.transaction() as session:
        events = session.scalars(select(OutboxEvent).where(OutboxEvent.order_id == ws.oid)
                                 .order_by(OutboxEvent.created_at)).all()
        requested = [e for e in events if e.event == "order.generation_requested"]
        assert len(requested) == 1
        assert requested[0].data["generation_id"] == generation["id"]
        assert requested[0].data["prompt"] == generation["prompt"]
        sequences = [e.sequence for e in events if e.event.startswith("order.")]
        assert sequences == sorted(sequences) and requested[0].sequence == max(sequences)

    # another agent, and a buyer, cannot read this agent's list
    assert api.get(pending, api.agent("Other"))[0] == 404
    assert api.get(pending, ws.buyer)[0] == 403
    assert api.ok("GET", pending, ADMIN)["items"][0]["id"] == generation["id"]


def test_a_lost_dispatch_message_is_made_good_by_the_sweep(api):
    ws = Workspace(api)
    generation = ws.generated()
    now = utcnow()
    assert ws.sweep(now)["dispatched"] == 0  # give the message its time first
    assert ws.sweep(now + dt.timedelta(seconds=workspaces.DISPATCH_GRACE_SECONDS + 1))["dispatched"] == 1
    [shown] = api.ok("GET", f"/api/agents/{ws.agent.id}/generations?status=pending", ws.agent)["items"]
    assert shown["id"] == generation["id"]


# --- answers -----------------------------------------------------------------------------------------

def test_the_agent_answers_with_a_result_and_both_parties_see_it(api):
    ws = Workspace(api, quota=3)
    generation = ws.generated()
    ws.dispatch_all()
    status, body = ws.answer(generation["id"], {"url": "https://example.com/fox.txt", "media_type": "text",
                                                "title": "Fox poem"})
    assert status == 200, body
    answered = body["data"]
    assert answered["status"] == "completed" and answered["answered_at"] is not None
    assert (answered["result"]["media_type"], answered["result"]["url"], answered["result"]["title"]) == (
        "text", "https://example.com/fox.txt", "Fox poem")
    [seen] = ws.generations(ws.buyer)
    assert seen["status"] == "completed" and seen["result"]["url"] == "https://example.com/fox.txt"
    workspace = ws.view()["workspace"]
    assert (workspace["quota_used"], workspace["generations_pending"]) == (1, 0)  # a result keeps its unit
    assert api.ok("GET", f"/api/agents/{ws.agent.id}/generations?status=pending", ws.agent)["items"] == []
    assert [g["id"] for g in api.ok("GET", f"/api/agents/{ws.agent.id}/generations?status=completed",
                                    ws.agent)["items"]] == [generation["id"]]


def test_a_failed_generation_gives_its_unit_back(api):
    ws = Workspace(api, quota=1)
    generation = ws.generated()
    assert ws.generate()[1]["code"] == "quota_exhausted"
    status, body = ws.answer(generation["id"], {"status": "failed", "error": "The model is down."})
    assert status == 200, body
    assert (body["data"]["status"], body["data"]["error"]) == ("failed", "The model is down.")
    workspace = ws.view()["workspace"]
    assert (workspace["quota_used"], workspace["generations_pending"]) == (0, 0)
    assert ws.generated("again")["status"] == "pending"  # the unit is usable again


def test_a_generation_is_answered_once(api):
    ws = Workspace(api)
    generation = ws.generated()
    assert ws.answer(generation["id"], {"url": "https://example.com/a", "media_type": "link"})[0] == 200
    before = ws.view()
    for body in ({"url": "https://example.com/b", "media_type": "link"}, {"status": "failed", "error": "late"}):
        status, answer = ws.answer(generation["id"], body)
        assert (status, answer["code"], answer["details"]["status"]) == (409, "invalid_transition", "completed")
    assert ws.view() == before


def test_only_the_orders_agent_answers(api):
    ws = Workspace(api)
    generation = ws.generated()
    body = {"url": "https://example.com/a", "media_type": "link"}
    assert ws.answer(generation["id"], body, who=ws.buyer)[1]["code"] == "forbidden"
    assert ws.answer(generation["id"], body, who=ADMIN)[1]["code"] == "forbidden"
    assert ws.answer(generation["id"], body, who=api.agent("Other"))[1]["code"] == "not_found"
    assert ws.answer("gen_" + "x" * 20, body)[1]["code"] == "not_found"
    assert ws.answer("nonsense", body)[1]["code"] == "not_found"
    other = Workspace(api)
    assert ws.answer(other.generated()["id"], body)[1]["code"] == "not_found"  # another order's generation
    assert ws.generations()[0]["status"] == "pending"


@pytest.mark.parametrize("body,field", [
    ({}, "url"),
    ({"media_type": "link"}, "url"),
    ({"url": "https://example.com/a"}, "media_type"),
    ({"url": "https://example.com/a", "upload_id": "upl_x", "media_type": "link"}, "url"),
    ({"url": "ftp://example.com/a", "media_type": "link"}, "url"),
    ({"url": "https://example.com/a", "media_type": "hologram"}, "media_type"),
    ({"status": "failed"}, "error"),
    ({"status": "failed", "error": ""}, "error"),
    ({"status": "failed", "error": "x" * 2001}, "error"),
    ({"status": "failed", "error": "no", "url": "https://example.com/a"}, "url"),
    ({"status": "done"}, "status"),
    ({"error": "no status", "url": "https://example.com/a", "media_type": "link"}, "error"),
])
def test_a_bad_answer_is_a_validation_error_and_changes_nothing(api, body, field):
    ws = Workspace(api)
    generation = ws.generated()
    before = ws.view()
    status, answer = ws.answer(generation["id"], body)
    assert (status, answer["code"]) == (400, "validation_error"), answer
    assert field in answer["details"]["fields"], answer
    assert ws.view() == before and ws.generations()[0]["status"] == "pending"


def test_an_answer_with_an_upload_checks_it_like_a_delivery(api):
    ws = Workspace(api)
    generation = ws.generated()
    text_upload = api.upload(ws.agent, b"just some text\n", "notes.txt")
    status, body = ws.answer(generation["id"], {"upload_id": text_upload["upload_id"], "media_type": "image"})
    assert (status, body["code"]) == (400, "validation_error")
    someone_elses = api.upload(api.agent("Other"), b"text\n", "a.txt")
    status, body = ws.answer(generation["id"], {"upload_id": someone_elses["upload_id"], "media_type": "text"})
    assert (status, body["code"]) == (400, "validation_error")
    assert ws.answer(generation["id"], {"upload_id": text_upload["upload_id"], "media_type": "text"})[0] == 200
    second = ws.generated("again")
    status, body = ws.answer(second["id"], {"upload_id": text_upload["upload_id"], "media_type": "text"})
    assert (status, body["code"]) == (400, "validation_error")  # an upload goes into one result


def test_an_image_result_goes_through_the_watermark_gate(api):
    ws = Workspace(api)
    generation = ws.generated()
    upload = api.upload(ws.agent, jpeg(), "fox.jpg")
    answered = ws.answer(generation["id"], {"upload_id": upload["upload_id"], "media_type": "image"})[1]["data"]
    item_id = answered["result"]["id"]
    assert answered["result"]["url"]  # the agent gets its original

    [buyers] = ws.generations(ws.buyer)
    assert (buyers["result"]["url"], buyers["result"]["preview_url"], buyers["result"]["preview_status"]) == (
        None, None, "pending")
    with ws.db.transaction() as session:  # the media worker is asked for the preview
        [event] = session.scalars(select(OutboxEvent).where(OutboxEvent.event == "generation.completed",
                                                            OutboxEvent.order_id == ws.oid)).all()
        assert event.data["items"][0]["id"] == item_id and event.data["items"][0]["storage_key"]

    ws.rt.storage.put_bytes("previews/gen-preview.jpg", jpeg((32, 24)))
    api.internal("POST", f"/internal/items/{item_id}/media",
                 json={"status": "ready", "preview_key": "previews/gen-preview.jpg"})
    [buyers] = ws.generations(ws.buyer)
    assert buyers["result"]["url"] is None and buyers["result"]["preview_status"] == "ready"
    assert api.get(buyers["result"]["preview_url"], ws.buyer)[0] == 200
    agents_url = ws.generations(ws.agent)[0]["result"]["url"]
    assert api.get(agents_url.replace("role=agent", "role=buyer"), ws.buyer)[0] == 403  # tampered

    # the period ends, the buyer approves: now the original is theirs
    assert ws.sweep(ws.expires_at())["closed"] == 1, ws.view()
    assert ws.view(ws.buyer)["deliveries"][0]["items"][0]["url"] is None
    api.ok("PATCH", f"/api/orders/{ws.oid}", ws.buyer, json={"action": "approve"})
    [item] = ws.view(ws.buyer)["deliveries"][0]["items"]
    assert item["id"] == item_id and item["url"]
    assert api.get(item["url"], ws.buyer)[0] == 200
    assert ws.generations(ws.buyer)[0]["result"]["url"]


# --- timeouts --------------------------------------------------------------------------------------

def test_an_unanswered_generation_times_out_and_gives_its_unit_back(make_app):
    api = ApiClient(make_app(generation_timeout_seconds=60))
    ws = Workspace(api, quota=1)
    generation = ws.generated()
    ws.dispatch_all()
    deadline = _at(ws.generations(ws.agent)[0]["deadline_at"])
    assert ws.sweep(deadline - dt.timedelta(seconds=1))["timed_out"] == 0
    assert ws.generations()[0]["status"] == "pending"

    assert ws.sweep(deadline + dt.timedelta(seconds=1))["timed_out"] == 1
    assert ws.sweep(deadline + dt.timedelta(seconds=2))["timed_out"] == 0  # once
    [timed_out] = ws.generations()
    assert timed_out["status"] == "timed_out" and "60 seconds" in timed_out["error"]
    workspace = ws.view()["workspace"]
    assert (workspace["quota_used"], workspace["generations_pending"]) == (0, 0)
    status, body = ws.answer(generation["id"], {"url": "https://example.com/late", "media_type": "link"})
    assert (status, body["code"]) == (409, "invalid_transition")  # too late
    ws.generated("the unit is back")


# --- the period's end --------------------------------------------------------------------------------

def test_at_the_periods_end_the_generations_become_the_delivery(make_app, settings):
    api = ApiClient(make_app(generation_timeout_seconds=MONTH))  # the unanswered one is still pending at the end
    ws = Workspace(api, quota=5)
    first, failed, second, unanswered = (ws.generated(p) for p in ("first", "fails", "second", "unanswered"))
    ws.dispatch_all()
    ws.answer(first["id"], {"url": "https://example.com/1", "media_type": "link"})
    ws.answer(failed["id"], {"status": "failed", "error": "no"})
    ws.answer(second["id"], {"url": "https://example.com/2", "media_type": "text"})
    expires = ws.expires_at()

    assert ws.sweep(expires - dt.timedelta(seconds=1))["closed"] == 0
    assert ws.view()["status"] == "in_progress"
    assert ws.sweep(expires)["closed"] == 1
    assert ws.sweep(expires + dt.timedelta(seconds=1))["closed"] == 0

    order = ws.view(ws.buyer)
    assert order["status"] == "delivered"
    [delivery] = order["deliveries"]
    assert [i["url"] for i in delivery["items"]] == ["https://example.com/1", "https://example.com/2"]
    entry = order["timeline"][-1]
    assert (entry["action"], entry["from"], entry["to"], entry["actor_type"]) == (
        "close_workspace", "in_progress", "delivered", "system")
    assert _at(order["review_deadline_at"]) - _at(entry["at"]) == dt.timedelta(seconds=settings.review_window_seconds)
    workspace = order["workspace"]
    assert workspace["closed_at"] == entry["at"]
    assert (workspace["quota_used"], workspace["generations_pending"]) == (2, 0)
    statuses = {g["prompt"]: g["status"] for g in ws.generations()}
    assert statuses == {"first": "completed", "fails": "failed", "second": "completed", "unanswered": "expired"}

    # closed: no more generations, no late answers
    status, body = ws.generate()
    assert (status, body["code"]) == (409, "workspace_closed")
    status, body = ws.answer(unanswered["id"], {"url": "https://example.com/3", "media_type": "link"})
    assert (status, body["code"]) == (409, "invalid_transition")

    # the normal review window, approval and payout follow
    completed = api.ok("PATCH", f"/api/orders/{ws.oid}", ws.buyer, json={"action": "approve"})
    assert completed["status"] == "completed"
    payout = api.ok("GET", f"/api/orders/{ws.oid}", ws.agent)["payout"]
    assert (payout["status"], payout["amount_usd"], payout["fee_usd"]) == ("pending", "22.50", "2.50")
    with ws.db.transaction() as session:
        names = Counter(session.scalars(select(OutboxEvent.event).where(OutboxEvent.order_id == ws.oid)))
    assert names["order.delivered"] == 1 and names["order.completed"] == 1


def test_after_expiry_generate_is_refused_before_the_sweep_closes_it(make_app):
    import time
    api = ApiClient(make_app(workspace_weekly_seconds=1))
    ws = Workspace(api)
    time.sleep(1.1)
    status, body = ws.generate()
    assert (status, body["code"]) == (409, "workspace_closed")
    assert ws.view()["workspace"]["quota_used"] == 0


def test_an_empty_workspace_closes_with_an_empty_delivery_and_can_be_disputed(api):
    ws = Workspace(api)
    ws.sweep(ws.expires_at())
    order = ws.view(ws.buyer)
    assert order["status"] == "delivered" and order["deliveries"][0]["items"] == []
    disputed = api.ok("PATCH", f"/api/orders/{ws.oid}", ws.buyer,
                      json={"action": "dispute", "reason": "Nothing was generated."})
    assert disputed["status"] == "disputed"


def test_auto_complete_follows_the_close(api, settings):
    from services.orders.tasks import sweep_timers
    ws = Workspace(api)
    ws.sweep(ws.expires_at())
    deadline = _at(ws.view()["review_deadline_at"])
    assert sweep_timers(ws.db, ws.rt, now=deadline + dt.timedelta(seconds=1)) >= 1
    assert ws.view()["status"] == "completed"


def test_the_agent_cannot_deliver_while_the_workspace_is_open(api):
    ws = Workspace(api)
    before = ws.view()
    status, body = api.post(f"/api/orders/{ws.oid}/deliver", ws.agent,
                            json={"deliverables": [{"url": "https://example.com/x", "media_type": "link"}]})
    assert (status, body["code"]) == (409, "invalid_transition") and "workspace" in body["error"]
    assert ws.view() == before


def test_a_declined_workspace_closes_refunds_and_expires_its_pending_generations(api):
    ws = Workspace(api, quota=3)
    ws.generated()
    order = api.ok("POST", f"/api/orders/{ws.oid}/decline", ws.agent, json={"reason": "Cannot do it."})
    assert order["status"] == "cancelled"
    assert order["workspace"]["closed_at"] is not None
    assert ws.generations()[0]["status"] == "expired"
    assert api.ok("GET", f"/api/orders/{ws.oid}", ws.buyer)["refund"]["amount_usd"] == "25.00"
    assert ws.generate()[1]["code"] == "workspace_closed"
    assert ws.sweep(ws.expires_at())["closed"] == 0  # nothing left to close


# --- renewal -------------------------------------------------------------------------------------------

def test_renew_creates_the_next_periods_order_linked_to_this_one(api):
    ws = Workspace(api, price_type="monthly", quota=4)
    status, body = api.post(f"/api/orders/{ws.oid}/renew", ws.buyer)
    assert status == 201, body
    renewal = body["data"]
    assert renewal["id"] != ws.oid and renewal["status"] == "quoted"
    assert (renewal["quoted_price_usd"], renewal["price_type"], renewal["service_id"], renewal["brief"]) == (
        "25.00", "monthly", ws.service["id"], ws.order["brief"])
    assert renewal["previous_order_id"] == ws.oid and renewal["workspace"] is None
    assert renewal["timeline"][0]["note"] == f"renews {ws.oid}"
    assert ws.view(ws.buyer)["next_order_id"] == renewal["id"]

    paid = api.pay(ws.buyer, renewal["id"])
    assert paid["status"] == "in_progress" and paid["workspace"]["quota_total"] == 4
    assert api.ok("GET", "/api/orders?status=in_progress", ws.buyer)["items"][0]["id"] == renewal["id"]
    assert api.ok("GET", f"/api/agents/{ws.agent.id}", ws.buyer)["total_orders"] == 2


def test_an_order_is_renewed_once_unless_the_renewal_is_cancelled(api):
    ws = Workspace(api)
    renewal = api.ok("POST", f"/api/orders/{ws.oid}/renew", ws.buyer)
    status, body = api.post(f"/api/orders/{ws.oid}/renew", ws.buyer)
    assert (status, body["code"], body["details"]["next_order_id"]) == (409, "invalid_transition", renewal["id"])
    api.ok("PATCH", f"/api/orders/{renewal['id']}", ws.buyer, json={"action": "cancel"})
    again = api.ok("POST", f"/api/orders/{ws.oid}/renew", ws.buyer)
    assert ws.view()["next_order_id"] == again["id"]


def test_renewal_after_the_period_and_who_may_renew(api):
    ws = Workspace(api)
    ws.sweep(ws.expires_at())
    before = ws.view()
    assert api.post(f"/api/orders/{ws.oid}/renew", ws.agent)[1]["code"] == "forbidden"
    assert api.post(f"/api/orders/{ws.oid}/renew", ADMIN)[1]["code"] == "forbidden"
    assert api.post(f"/api/orders/{ws.oid}/renew", api.buyer())[1]["code"] == "not_found"
    assert ws.view() == before
    assert api.post(f"/api/orders/{ws.oid}/renew", ws.buyer)[0] == 201  # delivered: still renewable


def test_orders_that_cannot_be_renewed(api):
    agent, buyer, fixed = api.order_in("completed")
    assert api.post(f"/api/orders/{fixed['id']}/renew", buyer)[1]["code"] == "invalid_transition"
    _, service, buyer = api.setup("weekly", quota_limit=2)
    unpaid = api.order(buyer, service)
    assert api.post(f"/api/orders/{unpaid['id']}/renew", buyer)[1]["code"] == "invalid_transition"
    ws = Workspace(api)
    api.ok("POST", f"/api/orders/{ws.oid}/decline", ws.agent, json={})
    assert api.post(f"/api/orders/{ws.oid}/renew", ws.buyer)[1]["code"] == "invalid_transition"


# --- lists -------------------------------------------------------------------------------------------------

def test_generation_lists_page_newest_first_and_filter_by_status(api):
    ws = Workspace(api, quota=0)
    made = [ws.generated(f"p{n}")["id"] for n in range(5)]
    ws.answer(made[1], {"status": "failed", "error": "no"})
    page = api.ok("GET", f"/api/orders/{ws.oid}/generations?limit=2", ws.agent)
    seen = [g["id"] for g in page["items"]]
    while page["next_cursor"]:
        page = api.ok("GET", f"/api/orders/{ws.oid}/generations?limit=2&cursor={page['next_cursor']}", ws.agent)
        seen += [g["id"] for g in page["items"]]
    assert seen == made[::-1]
    assert [g["id"] for g in ws.generations(query="?status=failed")] == [made[1]]
    assert len(ws.generations(query="?status=pending,failed")) == 5
    for bad in ("?status=nope", "?limit=0", "?limit=101", "?cursor=zzz"):
        status, body = api.get(f"/api/orders/{ws.oid}/generations{bad}", ws.buyer)
        assert (status, body["code"]) == (400, "validation_error"), bad
    assert api.get(f"/api/orders/{ws.oid}/generations", api.buyer())[0] == 404


def test_the_view_cache_follows_every_quota_change(api):
    ws = Workspace(api, quota=2)
    for who in (ws.buyer, ws.agent, ADMIN):
        ws.view(who)  # fill the cache
    generation = ws.generated()
    assert ws.view(ws.buyer)["workspace"]["quota_used"] == 1
    ws.answer(generation["id"], {"status": "failed", "error": "no"})
    assert ws.view(ws.agent)["workspace"]["quota_used"] == 0
    with ws.db.transaction() as session:
        assert session.scalar(select(func.count()).select_from(Generation)) == 1
