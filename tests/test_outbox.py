"""Events commit with the state change, reach their consumers' queues, and never escape a rollback."""
import base64
import json

import pytest
import redis
from sqlalchemy import select

from services.orders.models import OutboxEvent
from shared.celery_app import make_celery
from shared.outbox import Outbox
from shared.redisconn import Commands


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


def _mark_handed_off(app):
    """What the relay's beat sweep does first: mark published the events the hand-offs listed."""
    return app.extensions["orders_runtime"].outbox.mark_handed()


def test_completion_event_reaches_the_payouts_queue_with_the_payout_due(api, app, db, redis_url):
    agent, buyer, order = api.order_in("delivered")
    api.ok("PATCH", f"/api/orders/{order['id']}", buyer, json={"action": "approve"})
    events = _events(db, order["id"])
    assert [e.event for e in events] == ["order.created", "order.paid", "order.delivered", "order.completed"]
    assert [e.sequence for e in events] == [1, 2, 3, 4]
    assert all(e.published_at is None for e in events)  # published, but not yet marked
    assert _mark_handed_off(app) == 4  # each commit listed its events for the sweep
    assert all(e.published_at is not None and e.attempts == 1 for e in _events(db, order["id"]))
    assert _mark_handed_off(app) == 0

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


def _age(db, event_id, seconds):
    import datetime as dt
    with db.transaction() as session:
        row = session.get(OutboxEvent, event_id)
        row.created_at = row.created_at - dt.timedelta(seconds=seconds)


def _published_copies(redis_url, event_id):
    return sum(1 for m in _queued(redis_url, "payouts") if _body(m)[0][0]["id"] == event_id)


def test_the_sweep_marks_what_was_handed_off_and_publishes_only_what_was_lost(app, db, redis_url, settings):
    outbox = app.extensions["orders_runtime"].outbox
    with db.transaction() as session:  # handed off after its commit, as every transition's events are
        outbox.record(session, "order.completed", {"payout_due": {"amount_usd": "1.00"}}, order_id=None)
    with db.transaction() as session:
        handed = session.scalars(select(OutboxEvent)).one()
    dead = make_celery("dead", settings.replace(redis_url="redis://127.0.0.1:1/0"))
    offline = Outbox(OutboxEvent, dead, db, relay_task="orders.relay_outbox")
    with db.transaction() as session:  # its hand-off is lost: the broker is out of reach
        offline.record(session, "order.completed", {"payout_due": {"amount_usd": "2.00"}}, order_id=None)
    with db.transaction() as session:
        lost = session.scalars(select(OutboxEvent).where(OutboxEvent.id != handed.id)).one()
    assert _published_copies(redis_url, handed.id) == 1 and _published_copies(redis_url, lost.id) == 0

    # a young unpublished event may be a hand-off still on its way: the sweep leaves it
    assert outbox.sweep() == 0
    assert _published_copies(redis_url, handed.id) == 1 and _published_copies(redis_url, lost.id) == 0
    with db.transaction() as session:
        assert session.get(OutboxEvent, handed.id).published_at is not None  # marked, from the list
        assert session.get(OutboxEvent, lost.id).published_at is None

    # past the grace period the lost one is published, once; the handed-off one never again
    _age(db, handed.id, outbox.GRACE_SECONDS + 1)
    _age(db, lost.id, outbox.GRACE_SECONDS + 1)
    assert outbox.sweep() == 1
    assert outbox.sweep() == 0
    assert _published_copies(redis_url, handed.id) == 1 and _published_copies(redis_url, lost.id) == 1
    with db.transaction() as session:
        assert session.get(OutboxEvent, lost.id).published_at is not None


def test_an_event_is_listed_for_marking_only_after_its_messages(app, db, redis_url, monkeypatch):
    """The hand-off's one round trip ends with the list, so a listed (marked) event was published."""
    outbox = app.extensions["orders_runtime"].outbox
    rounds = []
    run = Commands.run

    def recording(commands, batch):
        rounds.append([(command[0], command[1]) for command in batch])
        return run(commands, batch)

    monkeypatch.setattr(Commands, "run", recording)
    with db.transaction() as session:
        outbox.record(session, "order.completed", {"x": 1}, order_id=None)
        outbox.record(session, "order.cancelled", {"x": 2}, order_id=None)
    assert len(rounds) == 1
    *messages, last = rounds[0]
    assert last == ("RPUSH", outbox.handed_key)
    assert sorted(messages) == [("LPUSH", "payouts"), ("LPUSH", "payouts"), ("LPUSH", "webhooks"), ("LPUSH", "webhooks")]
    assert redis.Redis.from_url(redis_url).llen(outbox.handed_key) == 2


def test_only_the_hand_off_after_its_commit_is_an_events_first_sight(app, db, redis_url, settings):
    """What a consumer's request says of a message: the hand-off's, delivered for the first time,
    is the first anyone sees of its event; the sweep's copy, or one the broker restored after a
    worker died, may not be."""
    from celery.app.task import Context
    from celery.worker.request import Request

    from services.payouts.tasks import app as payouts
    from shared.outbox import first_sight

    client = redis.Redis.from_url(redis_url)
    client.delete("payouts")
    outbox = app.extensions["orders_runtime"].outbox
    with db.transaction() as session:
        outbox.record(session, "order.completed", {"x": 1}, order_id=None)
    with db.transaction() as session:
        event_id = session.scalars(select(OutboxEvent.id)).one()
    assert outbox.relay([event_id]) == 1  # as the sweep publishes an event it finds unpublished
    [swept, handed] = client.lrange("payouts", 0, -1)  # kombu pops from the right: handed comes first
    restored = json.loads(handed)  # what kombu's Redis transport writes when it restores a message
    restored["headers"]["redelivered"] = True
    restored["properties"]["delivery_info"]["redelivered"] = True
    client.lpush("payouts", json.dumps(restored))

    reader = make_celery("reader", settings.replace(redis_url=redis_url))
    seen = []
    with reader.connection_for_read() as conn:
        queue = conn.SimpleQueue("payouts", no_ack=True)
        for _ in range(3):
            message = queue.get(timeout=2)
            request = Request(message, app=payouts, task=payouts.tasks["payouts.settle_order"])
            assert request.id == f"{event_id}:payouts.settle_order"
            seen.append(first_sight(Context(request.request_dict)))
        queue.close()
    assert seen == [True, False, False]  # the hand-off's, the sweep's, the restored hand-off's
