"""Agent webhooks and buyer notifications (DESIGN.md §4-§5), against a real local HTTP receiver.

The worker's steps run in-process here (`deliver_event`, `attempt_now`, the sweep's due list) on
the events the orders app wrote to its outbox; tests/test_webhooks_live.py kills a real webhooks
worker mid-delivery."""
from __future__ import annotations

import dataclasses
import datetime as dt
import re
import time
from pathlib import Path

import pytest
from sqlalchemy import select, update

from services.orders import notifications, webhooks
from services.orders.models import Agent, OutboxEvent, WebhookDelivery
from services.orders.webhook_tasks import attempt_now, handle_event
from shared import netguard
from tests.support.api import ADMIN, ApiClient, Party
from tests.support.receiver import Receiver

ROOT = Path(__file__).resolve().parents[1]


def docs_verify():
    """The signature check from docs/webhooks.md, exactly as an agent would copy it."""
    text = (ROOT / "docs" / "webhooks.md").read_text()
    [code] = [block for block in re.findall(r"```python\n(.*?)```", text, re.S) if "def verify" in block]
    namespace: dict = {}
    exec(code, namespace)  # noqa: S102 (our own documentation)
    return namespace["verify"]


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def hooks_api(make_app):
    """Orders with 127.0.0.1 allowed as a webhook host and quick retries."""
    return ApiClient(make_app(webhook_allowed_hosts=("127.0.0.1",), webhook_retry_base_seconds=0.2,
                              webhook_timeout_seconds=2.0))


class Hooks:
    """An agent with an endpoint (the receiver's, unless another or none is given), its buyer,
    and the worker's steps."""

    def __init__(self, api, receiver=None, endpoint_url: str | None = None):
        self.api, self.receiver = api, receiver
        endpoint_url = endpoint_url or (receiver.url if receiver else None)
        created = api.ok("POST", "/api/agents", json={"name": "Hooked", **(
            {"endpoint_url": endpoint_url} if endpoint_url else {})})
        self.agent_data, self.secret = created["agent"], created.get("webhook_secret")
        self.agent = Party(created["api_key"], created["agent"]["id"])
        self.buyer = api.buyer()
        self.service = api.service(self.agent, "fixed")

    @property
    def app(self):
        return self.api.app

    def deliver(self, message: dict, rt=None) -> None:
        handle_event(self.app.extensions["db"], rt or self.app.extensions["orders_runtime"], message)

    def pump(self, rounds: int = 40, rt=None) -> None:
        """What the worker does: take each outbox event, then make due attempts until none is
        left (or `rounds` passes)."""
        db, rt = self.app.extensions["db"], rt or self.app.extensions["orders_runtime"]
        with db.transaction() as session:
            messages = [e.message() for e in session.scalars(select(OutboxEvent).order_by(OutboxEvent.created_at))]
        for message in messages:
            if message["event"].startswith("order."):
                handle_event(db, rt, message)
        for _ in range(rounds):
            with db.transaction() as session:
                due = webhooks.due_ids(session, dt.datetime.now(dt.timezone.utc))
                pending = session.scalar(select(WebhookDelivery.id).where(WebhookDelivery.status == "pending"))
            for delivery_id in due:
                attempt_now(db, rt, delivery_id)
            if pending is None:
                return
            time.sleep(0.1)

    def order(self, state="paid"):
        order = self.api.walk(self.agent, self.buyer, self.api.order(self.buyer, self.service), state)
        return order["id"]

    def log(self, query=""):
        return self.api.ok("GET", f"/api/agents/me/webhook-deliveries{query}", self.agent)["items"]



def test_an_outage_while_recording_is_retried_rather_than_the_event_lost(hooks_api, receiver, monkeypatch):
    """A failed task's message is acknowledged and gone, and no sweep looks for events that were
    never recorded: a database outage while recording is retried (with backoff) instead."""
    from sqlalchemy.exc import OperationalError
    from services.orders import webhook_tasks
    hooks = Hooks(hooks_api, receiver)
    hooks.order("paid")
    db, rt = hooks.app.extensions["db"], hooks.app.extensions["orders_runtime"]
    with db.transaction() as session:
        message = session.scalars(select(OutboxEvent).where(OutboxEvent.event == "order.paid")).one().message()
    tries = []

    def down_once(db_, rt_, message_):
        tries.append(message_["id"])
        if len(tries) == 1:
            raise OperationalError("INSERT INTO webhook_deliveries", {}, OSError("server closed the connection"))
        return handle_event(db_, rt_, message_)

    monkeypatch.setattr(webhook_tasks, "runtime", lambda: (db, rt))
    monkeypatch.setattr(webhook_tasks, "handle_event", down_once)
    result = webhook_tasks.deliver_event.apply(args=[message])
    assert tries == [message["id"]] * 2, result.state
    assert receiver.events() == ["order.paid"]
    assert [d["event"] for d in hooks.log()] == ["order.paid"]

# --- endpoints ------------------------------------------------------------------------------------

@pytest.mark.parametrize("url,why", [
    ("http://example.com/hooks", "https"),
    ("https://127.0.0.1/hooks", "loopback"),
    ("https://10.0.0.1/hooks", "private"),
    ("https://169.254.169.254/latest", "metadata"),
    ("https://[::1]/hooks", "loopback"),
    ("https://localhost/hooks", "loopback"),  # a name that resolves to a loopback address
    ("https://192.168.1.20:8443/hooks", "private"),
])
def test_an_endpoint_must_be_https_and_public(api, url, why):
    status, body = api.post("/api/agents", json={"name": "Bad endpoint", "endpoint_url": url})
    assert (status, body["code"]) == (400, "validation_error"), body
    assert why in body["details"]["fields"]["endpoint_url"][0]
    agent = api.agent()
    status, body = api.patch("/api/agents/me", agent, json={"endpoint_url": url})
    assert (status, body["code"]) == (400, "validation_error")
    assert api.ok("GET", "/api/agents/me", agent)["endpoint_url"] is None


def test_a_public_https_endpoint_is_accepted_with_a_secret(api):
    def public(host, port, **kw):
        return [(2, 1, 6, "", ("93.184.216.34", port))]
    webhooks.check_endpoint("https://hooks.example.com/in", api.app.config["SETTINGS"], resolve=public)
    with pytest.raises(netguard.Refused):
        webhooks.check_endpoint("https://hooks.example.com/in", api.app.config["SETTINGS"],
                                resolve=lambda host, port, **kw: [(2, 1, 6, "", ("10.1.2.3", port))])


def test_allowed_hosts_are_exempt_and_setting_an_endpoint_returns_its_secret(hooks_api, receiver):
    created = hooks_api.ok("POST", "/api/agents", json={"name": "Local", "endpoint_url": receiver.url})
    assert created["webhook_secret"].startswith("whsec_") and created["agent"]["endpoint_url"] == receiver.url
    agent = hooks_api.agent("Later")
    patched = hooks_api.ok("PATCH", "/api/agents/me", agent, json={"endpoint_url": receiver.url})
    assert patched["webhook_secret"].startswith("whsec_")
    again = hooks_api.ok("PATCH", "/api/agents/me", agent, json={"endpoint_url": receiver.url + "/v2"})
    assert "webhook_secret" not in again  # the secret stays; rotation is its own call


# --- delivery --------------------------------------------------------------------------------------

def test_every_event_is_delivered_signed_with_its_headers(hooks_api, receiver):
    hooks = Hooks(hooks_api, receiver)
    oid = hooks.order("completed")
    hooks.pump()
    # a fixed-price order is created quoted; paying accepts it (one order.paid event)
    assert receiver.events() == ["order.created", "order.paid", "order.delivered", "order.completed"]
    verify = docs_verify()
    sequences = []
    for request in receiver.received:
        body = request.json
        assert set(body) == {"id", "event", "order_id", "sequence", "created_at", "data"}
        assert body["order_id"] == oid and body["id"].startswith("evt_")
        assert request.headers["X-Webhook-Event"] == body["event"]
        assert request.headers["X-Webhook-Delivery"].startswith("whd_")
        assert request.headers["Content-Type"] == "application/json"
        header = request.headers["X-Webhook-Signature"]
        assert verify(hooks.secret, request.body, header)
        assert not verify("whsec_wrong", request.body, header)
        assert not verify(hooks.secret, request.body + b" ", header)
        assert not verify(hooks.secret, request.body, header, now=time.time() + 301)  # too old
        sequences.append(body["sequence"])
    assert sequences == sorted(sequences) and len(set(sequences)) == len(sequences)
    log = hooks.log()
    assert {(d["status"], d["attempts"], d["last_status_code"]) for d in log} == {("delivered", 1, 200)}


def test_a_receiver_answering_500_twice_then_200_gets_the_event(hooks_api):
    receiver = Receiver(script=[500, 500])
    try:
        hooks = Hooks(hooks_api, receiver)
        hooks.api.ok("PATCH", "/api/agents/me", hooks.agent, json={"name": "Renamed"})  # no event
        hooks.api.order(hooks.buyer, hooks.service)
        hooks.pump()
        assert receiver.events() == ["order.created"] * 3
        assert len({r.headers["X-Webhook-Delivery"] for r in receiver.received}) == 1
        [delivery] = hooks.log()
        assert (delivery["status"], delivery["attempts"], delivery["last_status_code"]) == ("delivered", 3, 200)
    finally:
        receiver.close()


def test_the_first_retry_comes_within_ten_seconds(api):
    settings = api.app.config["SETTINGS"]
    assert all(webhooks.backoff(1, settings) <= 10 for _ in range(200))
    assert max(webhooks.backoff(30, settings) for _ in range(50)) <= settings.webhook_retry_max_seconds
    delays = [webhooks.backoff(n, settings) for n in range(1, 8)]
    assert delays[-1] > delays[0]


@pytest.mark.parametrize("status,retried", [(400, False), (404, False), (410, False), (301, False),
                                            (429, True), (503, True)])
def test_which_answers_are_retried(hooks_api, status, retried):
    receiver = Receiver(script=[status])
    try:
        hooks = Hooks(hooks_api, receiver)
        hooks.api.order(hooks.buyer, hooks.service)
        hooks.pump()
        [delivery] = hooks.log()
        if retried:
            assert (delivery["status"], delivery["attempts"]) == ("delivered", 2)
        else:
            assert (delivery["status"], delivery["attempts"], delivery["last_status_code"]) == ("failed", 1, status)
            assert delivery["next_attempt_at"] is None and str(status) in delivery["last_error"]
            assert len(receiver.received) == 1
    finally:
        receiver.close()


def test_retries_stop_when_the_window_closes(make_app):
    receiver = Receiver(default=500)
    try:
        api = ApiClient(make_app(webhook_allowed_hosts=("127.0.0.1",), webhook_retry_base_seconds=0.2,
                                 webhook_retry_window_seconds=1))
        hooks = Hooks(api, receiver)
        api.order(hooks.buyer, hooks.service)
        hooks.pump(rounds=60)
        [delivery] = hooks.log()
        assert delivery["status"] == "failed" and delivery["last_status_code"] == 500
        assert 2 <= delivery["attempts"] == len(receiver.received)
    finally:
        receiver.close()


def test_a_receiver_down_for_a_while_gets_every_event_once_it_is_back(hooks_api):
    from tests.support.net import free_port
    port = free_port()
    hooks = Hooks(hooks_api, endpoint_url=f"http://127.0.0.1:{port}/hooks")  # nothing listens there yet
    oid = hooks.order("delivered")
    hooks.pump(rounds=3)
    log = hooks.log()
    assert {d["status"] for d in log} == {"pending"} and all(d["attempts"] >= 1 for d in log)
    assert all("refused" in d["last_error"].lower() or "connect" in d["last_error"].lower() for d in log)
    receiver = Receiver(port=port)
    try:
        hooks.pump()
        assert sorted(receiver.events()) == sorted(["order.created", "order.paid", "order.delivered"])
        assert {r.json["order_id"] for r in receiver.received} == {oid}
        assert {d["status"] for d in hooks.log()} == {"delivered"}
    finally:
        receiver.close()


def test_an_endpoint_that_now_resolves_to_a_private_address_is_refused_at_delivery(make_app, receiver):
    api = ApiClient(make_app(webhook_allowed_hosts=("127.0.0.1",)))
    hooks = Hooks(api, receiver)
    api.order(hooks.buyer, hooks.service)
    db, rt = api.app.extensions["db"], api.app.extensions["orders_runtime"]
    # the endpoint was fine when set; now the allow list no longer covers it
    hooks.pump(rt=dataclasses.replace(rt, settings=rt.settings.replace(webhook_allowed_hosts=())))
    [delivery] = hooks.log()
    assert delivery["status"] == "failed" and "https" in delivery["last_error"]
    assert receiver.received == []
    with db.transaction() as session:
        assert session.get(Agent, hooks.agent.id).endpoint_url == receiver.url


def test_an_attempt_that_outlived_its_lease_does_not_overwrite_the_next_ones_outcome(hooks_api, receiver):
    """A worker stalled past its lease; the sweep handed the delivery to another, which delivered
    it. When the stalled attempt finally fails, the delivery stays delivered."""
    hooks = Hooks(hooks_api, receiver)
    hooks.api.order(hooks.buyer, hooks.service)
    db, settings = hooks.app.extensions["db"], hooks.app.config["SETTINGS"]
    with db.transaction() as session:
        message = session.scalars(select(OutboxEvent)).one().message()
        stalled = webhooks.record(session, settings, message)  # attempt 1, leased
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=2 * settings.webhook_timeout_seconds + 6)
    with db.transaction() as session:
        assert webhooks.claim(session, settings, stalled.id, later - dt.timedelta(seconds=2)) is None  # still leased
        second = webhooks.claim(session, settings, stalled.id, later)
    assert second.attempt == 2
    delivered, lost = webhooks.Outcome(True, False, 200, None), webhooks.Outcome(False, True, None, "timed out")
    with db.transaction() as session:
        assert webhooks.finish(session, settings, second, delivered, later) == "delivered"
    with db.transaction() as session:
        assert webhooks.finish(session, settings, stalled, lost, later) == "delivered"
    [delivery] = hooks.log()
    assert (delivery["status"], delivery["attempts"], delivery["last_status_code"]) == ("delivered", 2, 200)


def test_a_repeated_message_records_and_sends_once(hooks_api, receiver):
    hooks = Hooks(hooks_api, receiver)
    hooks.api.order(hooks.buyer, hooks.service)
    hooks.pump()
    hooks.pump()  # every outbox event handed to the worker again
    assert receiver.events() == ["order.created"]
    assert len(hooks.log()) == 1


def test_an_agent_without_an_endpoint_still_has_its_feed(api):
    hooks = Hooks(api)  # no endpoint
    hooks.order("paid")
    hooks.pump()
    feed = api.ok("GET", "/api/agents/me/events", hooks.agent)["items"]
    assert [e["event"] for e in feed] == ["order.created", "order.paid"]
    assert {d["status"] for d in hooks.log()} == {"no_endpoint"}


# --- rotation ----------------------------------------------------------------------------------------

def test_rotation_keeps_the_old_secret_valid_for_the_overlap(hooks_api, receiver):
    hooks = Hooks(hooks_api, receiver)
    old = hooks.secret
    rotated = hooks.api.ok("POST", "/api/agents/me/webhook-secret/rotate", hooks.agent)
    new = rotated["webhook_secret"]
    assert new.startswith("whsec_") and new != old and rotated["previous_secret_valid_until"]
    hooks.api.order(hooks.buyer, hooks.service)
    hooks.pump()
    verify = docs_verify()
    [request] = receiver.received
    header = request.headers["X-Webhook-Signature"]
    assert header.count("v1=") == 2
    assert verify(new, request.body, header) and verify(old, request.body, header)

    db = hooks.app.extensions["db"]
    with db.transaction() as session:  # the overlap is over
        session.execute(update(Agent).where(Agent.id == hooks.agent.id).values(
            previous_secret_expires_at=dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1)))
    hooks.api.order(hooks.buyer, hooks.service)
    hooks.pump()
    header = receiver.received[-1].headers["X-Webhook-Signature"]
    assert header.count("v1=") == 1
    assert verify(new, receiver.received[-1].body, header)
    assert not verify(old, receiver.received[-1].body, header)


def test_rotation_needs_an_endpoint_and_an_agent(api):
    agent = api.agent()
    assert api.post("/api/agents/me/webhook-secret/rotate", agent)[1]["code"] == "invalid_transition"
    assert api.post("/api/agents/me/webhook-secret/rotate", api.buyer())[1]["code"] == "forbidden"
    assert api.post("/api/agents/me/webhook-secret/rotate")[1]["code"] == "unauthenticated"


# --- the log, redelivery and the feed ------------------------------------------------------------------

def test_redeliver_sends_an_event_again(hooks_api):
    receiver = Receiver(script=[400])
    try:
        hooks = Hooks(hooks_api, receiver)
        hooks.api.order(hooks.buyer, hooks.service)
        hooks.pump()
        [failed] = hooks.log()
        assert failed["status"] == "failed"
        again = hooks.api.ok("POST", f"/api/agents/me/webhook-deliveries/{failed['id']}/redeliver", hooks.agent,
                             expect=202)
        assert again["status"] == "pending"
        hooks.pump()
        [delivered] = hooks.log()
        assert (delivered["id"], delivered["status"], delivered["attempts"]) == (failed["id"], "delivered", 2)
        assert [r.headers["X-Webhook-Delivery"] for r in receiver.received] == [failed["id"]] * 2
        other = hooks_api.agent("Other")
        assert hooks_api.post(f"/api/agents/me/webhook-deliveries/{failed['id']}/redeliver", other)[0] == 404
        assert hooks_api.post("/api/agents/me/webhook-deliveries/whd_nothing/redeliver", hooks.agent)[0] == 404
    finally:
        receiver.close()


def test_the_catch_up_feed_replays_from_a_position(hooks_api, receiver):
    hooks = Hooks(hooks_api, receiver)
    first = hooks.order("paid")
    second = hooks.order("delivered")
    hooks.pump()
    feed = hooks.api.ok("GET", "/api/agents/me/events?limit=100", hooks.agent)["items"]
    positions = [e["position"] for e in feed]
    assert positions == list(range(1, len(feed) + 1))
    assert [e["order_id"] for e in feed[:2]] == [first] * 2 and feed[-1]["order_id"] == second
    assert {e["id"] for e in feed} == {r.json["id"] for r in receiver.received}

    assert len(feed) == 5  # created and paid; created, paid and delivered
    page = hooks.api.ok("GET", "/api/agents/me/events?after=2&limit=2", hooks.agent)
    assert [e["position"] for e in page["items"]] == [3, 4] and page["next_cursor"] == "4"
    rest = hooks.api.ok("GET", f"/api/agents/me/events?after={page['next_cursor']}&limit=100", hooks.agent)
    assert [e["position"] for e in rest["items"]] == [5] and rest["next_cursor"] is None
    for bad in ("?after=-1", "?after=x", "?limit=0", "?limit=1001"):
        assert hooks.api.get(f"/api/agents/me/events{bad}", hooks.agent)[1]["code"] == "validation_error", bad
    other = hooks_api.agent("Other")
    assert hooks.api.ok("GET", "/api/agents/me/events", other)["items"] == []
    assert hooks.api.get("/api/agents/me/events", hooks.buyer)[0] == 403


def test_the_log_pages_newest_first_and_filters(hooks_api):
    receiver = Receiver(script=[400])
    try:
        hooks = Hooks(hooks_api, receiver)
        hooks.order("paid")
        hooks.pump()
        log = hooks.log("?limit=2")
        assert len(log) == 2
        assert [d["event"] for d in hooks.log()] == ["order.paid", "order.created"]
        assert [d["event"] for d in hooks.log("?status=failed")] == ["order.created"]
        assert hooks.api.get("/api/agents/me/webhook-deliveries?status=nope", hooks.agent)[0] == 400
    finally:
        receiver.close()


# --- messages and workspaces -------------------------------------------------------------------------

def test_generation_requests_reach_the_agent(hooks_api, receiver):
    from services.orders import workspaces
    hooks = Hooks(hooks_api, receiver)
    service = hooks.api.service(hooks.agent, "weekly", quota_limit=3)
    oid = hooks.api.pay(hooks.buyer, hooks.api.order(hooks.buyer, service)["id"])["id"]
    generation = hooks.api.ok("POST", f"/api/orders/{oid}/generate", hooks.buyer, json={"prompt": "A fox."},
                              expect=202)["generation"]
    db, rt = hooks.app.extensions["db"], hooks.app.extensions["orders_runtime"]
    with db.transaction() as session:
        workspaces.dispatch(session, rt, generation["id"])
    hooks.pump()
    [request] = [r for r in receiver.received if r.json["event"] == "order.generation_requested"]
    assert request.json["data"]["generation_id"] == generation["id"] and request.json["data"]["prompt"] == "A fox."


def test_message_events_get_an_order_sequence_and_only_the_buyers_reach_the_agent(hooks_api, receiver):
    hooks = Hooks(hooks_api, receiver)
    oid = hooks.order("paid")
    hooks.pump()
    base = {"order_id": oid, "data": {"order_id": oid, "message_id": "msg_x", "content": "Hello"},
            "sequence": 0, "created_at": "2026-11-29T10:00:00.000Z", "event": "order.message"}
    hooks.deliver({**base, "id": "evt_" + "b" * 20, "data": {**base["data"], "sender_type": "client"}})
    hooks.deliver({**base, "id": "evt_" + "a" * 20, "data": {**base["data"], "sender_type": "agent"}})
    hooks.pump()
    messages = [r.json for r in receiver.received if r.json["event"] == "order.message"]
    assert len(messages) == 1 and messages[0]["data"]["sender_type"] == "client"
    assert messages[0]["sequence"] > max(r.json["sequence"] for r in receiver.received[:-1])


# --- buyer notifications -------------------------------------------------------------------------------

def _notify_all(app):
    db = app.extensions["db"]
    with db.transaction() as session:
        for event in session.scalars(select(OutboxEvent).order_by(OutboxEvent.created_at)):
            notifications.record(session, event.message())


def test_an_outage_while_making_a_notification_is_retried_rather_than_the_news_lost(api, monkeypatch):
    from sqlalchemy.exc import OperationalError
    from services.orders import tasks
    agent, service, buyer = api.setup("quote")
    oid = api.order(buyer, service)["id"]
    api.ok("POST", f"/api/orders/{oid}/quote", agent, json={"price_usd": "60.00"})
    db = api.app.extensions["db"]
    with db.transaction() as session:
        message = session.scalars(select(OutboxEvent).where(OutboxEvent.event == "order.quoted")).one().message()
    tries, record = [], notifications.record

    def down_once(session, message_):
        tries.append(message_["id"])
        if len(tries) == 1:
            raise OperationalError("INSERT INTO notifications", {}, OSError("server closed the connection"))
        return record(session, message_)

    monkeypatch.setattr(tasks, "runtime", lambda: (db, api.app.extensions["orders_runtime"]))
    monkeypatch.setattr(tasks.notifications, "record", down_once)
    tasks.notify_buyer.apply(args=[message])
    monkeypatch.undo()
    assert len(tries) == 2
    assert [n["kind"] for n in api.ok("GET", "/api/notifications", buyer)["items"]] == ["quoted"]


def test_buyers_are_told_what_happened_on_their_orders(api):
    agent, service, buyer = api.setup("quote")
    oid = api.order(buyer, service)["id"]
    api.ok("POST", f"/api/orders/{oid}/quote", agent, json={"price_usd": "60.00"})
    api.pay(buyer, oid)
    api.deliver(agent, oid)
    api.ok("PATCH", f"/api/orders/{oid}", buyer, json={"action": "dispute", "reason": "Not a fox."})
    api.ok("POST", f"/api/admin/orders/{oid}/resolve", ADMIN, json={"outcome": "split", "agent_amount_usd": "20.00",
                                                                     "note": "Half done."})
    api.report_payout(oid, "refund", "sent", 1, tx_ref="sbx_refund")
    _notify_all(api.app)
    _notify_all(api.app)  # once per event
    db = api.app.extensions["db"]
    with db.transaction() as session:
        notifications.record(session, {"id": "evt_" + "m" * 20, "event": "order.message", "order_id": oid,
                                       "data": {"sender_type": "agent", "content": "Here is the fox."}})
        notifications.record(session, {"id": "evt_" + "n" * 20, "event": "order.message", "order_id": oid,
                                       "data": {"sender_type": "client", "content": "Thanks."}})

    page = api.ok("GET", "/api/notifications", buyer)
    kinds = [n["kind"] for n in page["items"]]
    assert kinds == ["message", "refund_sent", "dispute_resolved", "delivered", "quoted"]
    assert page["unread_count"] == 5
    texts = {n["kind"]: n["text"] for n in page["items"]}
    assert "60.00" in texts["quoted"] and "40.00" in texts["refund_sent"] and "Here is the fox." in texts["message"]
    assert "20.00" in texts["dispute_resolved"] and "40.00" in texts["dispute_resolved"]
    assert all(n["order_id"] == oid and n["read_at"] is None for n in page["items"])

    marked = api.ok("PATCH", "/api/notifications", buyer, json={"ids": [page["items"][0]["id"]]})
    assert (marked["marked"], marked["unread_count"]) == (1, 4)
    other_buyer = api.buyer()
    assert api.ok("PATCH", "/api/notifications", other_buyer, json={"ids": [page["items"][1]["id"]]})["marked"] == 0
    assert api.ok("GET", "/api/notifications", other_buyer) == {"items": [], "next_cursor": None, "unread_count": 0}
    assert api.ok("PATCH", "/api/notifications", buyer, json={})["unread_count"] == 0
    assert all(n["read_at"] for n in api.ok("GET", "/api/notifications", buyer)["items"])
    assert api.get("/api/notifications", agent)[0] == 403
    assert api.patch("/api/notifications", buyer, json={"ids": "all"})[0] == 400
    assert api.patch("/api/notifications", buyer, json={"ids": ["x"] * 101})[0] == 400


def test_a_closed_workspace_is_news_for_the_buyer(api):
    from services.orders.workspace_tasks import sweep_workspaces
    agent, service, buyer = api.setup("weekly", quota_limit=2)
    oid = api.pay(buyer, api.order(buyer, service)["id"])["id"]
    db, rt = api.app.extensions["db"], api.app.extensions["orders_runtime"]
    sweep_workspaces(db, rt, now=dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=8))
    _notify_all(api.app)
    [closed] = api.ok("GET", "/api/notifications", buyer)["items"]
    assert closed["kind"] == "workspace_closed" and closed["order_id"] == oid
