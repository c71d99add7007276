"""Events commit with the state change, reach their consumers' queues, and never escape a rollback."""
import base64
import json

import pytest
import redis
from sqlalchemy import select

from services.orders.models import OutboxEvent
from shared.celery_app import make_celery
from shared.outbox import Outbox


def _queued(redis_url, queue):
    """Messages waiting in a Celery queue on Redis (kombu keeps each queue as a list)."""
    client = redis.Redis.from_url(redis_url)
    return [json.loads(raw) for raw in client.lrange(queue, 0, -1)]


def _events(db, order_id):
    with db.transaction() as session:
        return session.scalars(select(OutboxEvent).where(OutboxEvent.order_id == order_id)
                               .order_by(OutboxEvent.sequence)).all()


def _body(message):
    return json.loads(base64.b64decode(message["body"]))


def _relay_handed_off(app, redis_url):
    """Run the relay tasks the requests handed to the default queue, as the default worker would."""
    outbox = app.extensions["orders_runtime"].outbox
    client = redis.Redis.from_url(redis_url)
    handed = 0
    while (raw := client.rpop("default")) is not None:
        message = json.loads(raw)
        if message["headers"]["task"] == "orders.notify_buyer":  # the default worker's other consumer
            continue
        assert message["headers"]["task"] == "orders.relay_outbox"
        args, kwargs, _ = _body(message)
        handed += outbox.relay(*args, **kwargs)
    return handed


def test_completion_event_reaches_the_payouts_queue_with_the_payout_due(api, app, db, redis_url):
    agent, buyer, order = api.order_in("delivered")
    api.ok("PATCH", f"/api/orders/{order['id']}", buyer, json={"action": "approve"})
    events = _events(db, order["id"])
    assert [e.event for e in events] == ["order.created", "order.paid", "order.delivered", "order.completed"]
    assert [e.sequence for e in events] == [1, 2, 3, 4]
    assert _relay_handed_off(app, redis_url) == 4  # each commit handed its events to the relay
    assert all(e.published_at is not None for e in _events(db, order["id"]))

    payouts = sorted((_body(m)[0][0] for m in _queued(redis_url, "payouts")
                      if m["headers"]["task"] == "payouts.settle_order"), key=lambda e: e["sequence"])
    # the payment funds the escrow; the completion pays the agent
    assert [e["event"] for e in payouts] == ["order.paid", "order.completed"]
    assert payouts[0]["data"]["held_usd"] == "45.00"
    event = payouts[1]
    assert event["order_id"] == order["id"]
    payout_id = api.ok("GET", f"/api/orders/{order['id']}", agent)["payout"]["id"]
    # with the agent's payout wallet as of the completion (this agent has not set one)
    assert event["data"]["payout_due"] == {"id": payout_id, "agent_id": agent.id, "gross_usd": "45.00",
                                           "fee_usd": "4.50", "amount_usd": "40.50", "wallet": None, "chain": None}
    # every order event is also queued for the agent's webhooks
    assert len([m for m in _queued(redis_url, "webhooks")]) == 4


def test_cancelling_a_paid_order_asks_for_the_refund(api, db):
    agent, buyer, order = api.order_in("paid")
    api.ok("PATCH", f"/api/orders/{order['id']}", buyer, json={"action": "cancel"})
    cancelled = _events(db, order["id"])[-1]
    assert cancelled.event == "order.cancelled"
    refund_id = api.ok("GET", f"/api/orders/{order['id']}", buyer)["refund"]["id"]
    assert cancelled.data["refund_due"] == {"id": refund_id, "wallet": buyer.id, "chain": "solana",
                                            "amount_usd": "45.00"}
    assert "payout_due" not in cancelled.data


def test_cancelling_an_unpaid_order_moves_no_money(api, db):
    agent, buyer, order = api.order_in("quoted")
    api.ok("PATCH", f"/api/orders/{order['id']}", buyer, json={"action": "cancel"})
    cancelled = _events(db, order["id"])[-1]
    assert "refund_due" not in cancelled.data and "payout_due" not in cancelled.data


def test_a_refused_request_writes_no_event(api, db, redis_url):
    agent, buyer, order = api.order_in("quoted")
    before = len(_events(db, order["id"]))
    status, body = api.patch(f"/api/orders/{order['id']}", buyer, json={"action": "approve"})
    assert status == 409
    assert len(_events(db, order["id"])) == before


def test_a_rolled_back_transaction_publishes_nothing(app, db, redis_url):
    outbox = app.extensions["orders_runtime"].outbox
    queued_before = len(_queued(redis_url, "payouts"))
    with pytest.raises(RuntimeError):
        with db.transaction() as session:
            outbox.record(session, "order.completed", {"x": 1}, order_id=None)
            raise RuntimeError("the change fails after the event was written")
    with db.transaction() as session:
        assert session.scalars(select(OutboxEvent)).all() == []
    assert len(_queued(redis_url, "payouts")) == queued_before


def test_events_survive_a_broker_outage_and_the_sweep_publishes_them(app, db, redis_url, settings):
    dead = make_celery("dead", settings.replace(redis_url="redis://127.0.0.1:1/0"))
    offline = Outbox(OutboxEvent, dead, db, relay_task="orders.relay_outbox")
    with db.transaction() as session:
        offline.record(session, "order.completed", {"payout_due": {"amount_usd": "1.00"}}, order_id=None)
    with db.transaction() as session:
        row = session.scalars(select(OutboxEvent)).one()
    assert row.published_at is None  # the hand-off after commit failed; nothing lost

    assert app.extensions["orders_runtime"].outbox.relay() == 1  # what the beat sweep runs
    with db.transaction() as session:
        assert session.get(OutboxEvent, row.id).published_at is not None
    assert any(_body(m)[0][0]["id"] == row.id for m in _queued(redis_url, "payouts"))


def test_the_request_id_follows_the_request_into_the_queued_tasks(api, app, redis_url):
    agent, service, buyer = api.setup()
    api.call("POST", "/api/orders", buyer, json={"service_id": service["id"], "brief": "A drawing of a fox."},
             headers={"X-Request-ID": "req-fox-42"})
    assert api.last.headers["X-Request-ID"] == "req-fox-42"
    hand_off = _queued(redis_url, "default")
    assert hand_off and hand_off[-1]["headers"]["request_id"] == "req-fox-42"
    _relay_handed_off(app, redis_url)
    created = [m for m in _queued(redis_url, "webhooks") if _body(m)[0][0]["event"] == "order.created"]
    assert created and created[0]["headers"]["request_id"] == "req-fox-42"


def test_each_consumer_is_sent_only_the_events_it_uses():
    from shared import events

    def tasks(event, **data):
        return {s.task for s in events.consumers(event, data)}
    assert tasks("order.completed", action="approve") == {"payouts.settle_order", "webhooks.deliver_event"}
    assert "orders.notify_buyer" in tasks("order.completed", action="resolve")  # the buyer's dispute, settled
    assert "orders.notify_buyer" in tasks("order.cancelled", action="resolve")
    assert tasks("order.message", sender_type="client") == {"webhooks.deliver_event"}
    assert tasks("order.message", sender_type="agent") == {"orders.notify_buyer"}
    assert tasks("order.quoted") == {"webhooks.deliver_event", "orders.notify_buyer"}
    assert tasks("generation.created") == {"workspaces.dispatch"}
