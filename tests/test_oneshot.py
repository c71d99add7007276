"""The buyer's approval in one statement (services/orders/oneshot.py, PostgreSQL) writes, publishes
and answers exactly what the general way (services.act) does, and steps aside, having written
nothing, whenever it does not apply. On SQLite every approval takes the general way, and these
tests hold it to the same answers."""
import base64
import json
import re
import threading

import pytest
import redis
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError, OperationalError

from services.orders import oneshot, present
from services.orders.cache import OrderViews
from services.orders.models import Order, OutboxEvent, Settlement, TimelineEntry
from shared.auth import Caller
from shared.db import utcnow
from shared.money import fee_cents
from tests.support.wallets import SolanaWallet

PAYOUT_WALLET = SolanaWallet.generate().address
ID = re.compile(r"^[a-z]{2,8}_[A-Za-z0-9]{20}$")
TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$")


@pytest.fixture
def taken(monkeypatch):
    """Spy on the one-statement way: what each call of it returned (None: it did not apply)."""
    results = []
    real = oneshot.approve

    def spy(*args):
        results.append(real(*args))
        return results[-1]
    monkeypatch.setattr(oneshot, "approve", spy)
    return results


def _normal(value, names: dict):
    """Ids and times replaced by what they stand for, so two orders' records can be compared."""
    if isinstance(value, dict):
        return {k: _normal(v, names) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_normal(v, names) for v in value]
    if isinstance(value, str):
        if value in names:
            return names[value]
        if TIME.match(value):
            return "<time>"
        if ID.match(value):  # deliveries', items', events' own ids
            return f"<{value.split('_')[0]}>"
        for real, name in names.items():
            value = value.replace(real, name)
    if hasattr(value, "isoformat"):
        return "<time>"
    return value


def _differences(a, b, path="") -> list:
    """Where two records differ, by path (an empty list when they are equal)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str) for d in _differences(a.get(k), b.get(k), f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [(path, a, b)]


def _records(db, order_id: str) -> dict:
    """Everything an approval writes for one order, as rows."""
    with db.transaction() as session:
        order = session.get(Order, order_id)
        columns = {c.name: getattr(order, c.name) for c in Order.__table__.columns}
        timeline = [{c.name: getattr(t, c.name) for c in TimelineEntry.__table__.columns if c.name != "id"}
                    for t in session.scalars(select(TimelineEntry).where(TimelineEntry.order_id == order_id)
                                             .order_by(TimelineEntry.number))]
        settlements = [{c.name: getattr(s, c.name) for c in Settlement.__table__.columns}
                       for s in session.scalars(select(Settlement).where(Settlement.order_id == order_id))]
        events = [{"event": e.event, "sequence": e.sequence, "data": e.data, "request_id": e.request_id is not None,
                   "published": e.published_at is not None, "attempts": e.attempts}
                  for e in session.scalars(select(OutboxEvent).where(OutboxEvent.order_id == order_id)
                                           .order_by(OutboxEvent.sequence))]
    return {"order": columns, "timeline": timeline, "settlements": settlements, "events": events}


def _twins(api, n=2, price="45.00"):
    """Orders of one buyer from one agent (who has a payout wallet), delivered the same way: two
    deliveries (an image and a link), a revision in between."""
    agent = api.agent("Twin", payout_wallet=PAYOUT_WALLET, payout_chain="solana")
    service = api.service(agent, "fixed", price_usd=price)
    buyer = api.buyer()
    orders = []
    for _ in range(n):
        order = api.walk(agent, buyer, api.order(buyer, service), "delivered")
        api.ok("PATCH", f"/api/orders/{order['id']}", buyer, json={"action": "revision", "feedback": "Bluer."})
        api.deliver(agent, order["id"], media_type="image", url="https://example.com/fox.png")
        orders.append(order["id"])
    return agent, buyer, orders


def test_one_statement_writes_publishes_and_answers_what_the_general_way_does(api, app, db, taken):
    agent, buyer, (fast, general) = _twins(api)
    answer = {}
    answer[fast] = api.ok("PATCH", f"/api/orders/{fast}", buyer, json={"action": "approve"})
    # an Idempotency-Key's record needs the general way's transaction: this one takes it
    status, body = api.call("PATCH", f"/api/orders/{general}", buyer, json={"action": "approve"},
                            headers={"Idempotency-Key": "approve-the-twin"})
    assert status == 200
    answer[general] = body["data"]
    if db.is_postgres:
        assert len(taken) == 1 and taken[0] is not None  # the first twin went the one-statement way
    else:
        assert taken == [None]  # no such way on SQLite

    def named(oid):
        seen = api.ok("GET", f"/api/orders/{oid}", agent)
        return {oid: "<order>", seen["payout"]["id"]: "<payout>", seen["escrow_tx_hash"]: "<payment>"}

    records = {oid: _normal(_records(db, oid), named(oid)) for oid in (fast, general)}
    assert _differences(records[fast], records[general]) == []
    assert records[fast]["order"]["status"] == "completed" and records[fast]["order"]["version"] > 1
    completed = records[fast]["events"][-1]
    assert completed["event"] == "order.completed" and completed["data"]["payout_due"] == {
        "id": "<payout>", "agent_id": "<agt>", "gross_usd": "45.00", "fee_usd": "4.50", "amount_usd": "40.50",
        "wallet": PAYOUT_WALLET, "chain": "solana"}
    assert _differences(_normal(answer[fast], named(fast)), _normal(answer[general], named(general))) == []
    # what every party reads afterwards (rendered from the database after the one-statement way
    # dropped the cached views) is the same for both, and the buyer's is what the approval answered
    for who in (buyer, agent):
        views = {oid: _normal(api.ok("GET", f"/api/orders/{oid}", who), named(oid)) for oid in (fast, general)}
        assert _differences(views[fast], views[general]) == []
    assert api.ok("GET", f"/api/orders/{fast}", buyer) == answer[fast]
    assert api.ok("GET", f"/api/agents/{agent.id}")["completed_orders"] == 2


def test_the_completion_event_reaches_its_consumers_with_the_fee_rounded_half_up(api, app, db, redis_url):
    client = redis.Redis.from_url(redis_url)
    for price in ("0.05", "0.15", "999999.99"):
        client.delete("payouts")
        agent, buyer, (oid,) = _twins(api, 1, price)
        api.ok("PATCH", f"/api/orders/{oid}", buyer, json={"action": "approve"})
        queued = [json.loads(base64.b64decode(json.loads(raw)["body"]))[0][0] for raw in client.lrange("payouts", 0, -1)]
        [completed] = [m for m in queued if m["event"] == "order.completed"]
        cents = int(price.replace(".", ""))
        fee = fee_cents(cents, app.config["SETTINGS"].platform_fee_bps)
        due = completed["data"]["payout_due"]
        assert (due["gross_usd"], due["fee_usd"], due["amount_usd"]) == (
            price, f"{fee // 100}.{fee % 100:02d}", f"{(cents - fee) // 100}.{(cents - fee) % 100:02d}")
        assert completed["order_id"] == oid and completed["data"]["held_usd"] == price


def test_refusals_write_nothing_and_say_what_the_general_way_says(api, db, taken):
    agent, buyer, (oid,) = _twins(api, 1)
    stranger = api.buyer()
    before = _records(db, oid)
    assert api.patch(f"/api/orders/{oid}", stranger, json={"action": "approve"})[0] == 404
    status, body = api.patch(f"/api/orders/{oid}", agent, json={"action": "approve"})
    assert (status, body["code"]) == (403, "forbidden")
    assert api.patch("/api/orders/order_doesnotexist0000000000", buyer, json={"action": "approve"})[0] == 404
    assert _records(db, oid) == before
    assert all(result is None for result in taken)
    assert api.ok("PATCH", f"/api/orders/{oid}", buyer, json={"action": "approve"})["status"] == "completed"
    status, body = api.patch(f"/api/orders/{oid}", buyer, json={"action": "approve"})  # again
    assert (status, body["code"]) == (409, "invalid_transition")
    assert len(_records(db, oid)["events"]) == len(before["events"]) + 1


def test_an_order_changed_while_the_statement_waited_is_left_to_the_general_way(api, app, db, taken):
    """The statement locks the order only after it began: if another change committed in between,
    what it read of the order's children is older than the order. It must then write nothing.
    (On SQLite the holder's write lock blocks the approval the same way, and the general way runs.)"""
    agent, buyer, (oid,) = _twins(api, 1)
    with db.engine.connect() as holder:
        holder.execute(text("UPDATE orders SET version = version + 1 WHERE id = :id"), {"id": oid})
        outcome = {}
        waiting = threading.Thread(target=lambda: outcome.update(
            answer=api.patch(f"/api/orders/{oid}", buyer, json={"action": "approve"})))
        waiting.start()
        waiting.join(1.0)
        assert waiting.is_alive()  # blocked on the row lock the holder has
        holder.commit()
    waiting.join(30)
    status, body = outcome["answer"]
    assert status == 200 and body["data"]["status"] == "completed"
    assert taken == [None]  # the statement saw the change and stepped aside; the general way approved
    timeline = [e["action"] for e in body["data"]["timeline"]]
    assert timeline.count("approve") == 1


def test_a_slower_reader_cannot_put_back_a_view_older_than_a_drop(app, api, redis_url):
    agent, buyer, (oid,) = _twins(api, 1)
    views: OrderViews = app.extensions["order_views"]
    with app.extensions["db"].transaction() as session:
        order = session.get(Order, oid)
        old_full, old_version = present.full_order(order), order.version
        views.drop(oid, "completed", old_version + 1)  # a change committed: version + 1, views gone
        views.store(order, old_full)  # a reader that read before it, storing late
    assert views.fetch(oid, Caller("buyer", buyer.id)) is None  # a miss: the reader goes to the database
    assert api.ok("GET", f"/api/orders/{oid}", buyer)["id"] == oid  # (the order did not really change here)


def test_one_row_statements_speak_sqlalchemys_errors_and_a_dead_connection_is_dropped(db):
    """Database.row_of: on PostgreSQL straight through the driver, on SQLite a transaction."""
    assert db.row_of(text("SELECT :x AS x, 'a%b' AS y"), {"x": 5}) == {"x": 5, "y": "a%b"}
    with pytest.raises(IntegrityError):  # as the general way's errors are, so the app answers 409
        db.row_of(text("INSERT INTO payouts_processed_events (id, processed_at) VALUES ('e', :at), ('e', :at) "
                       "RETURNING id"), {"at": utcnow()})
    assert db.row_of(text("SELECT count(*) AS n FROM payouts_processed_events WHERE id = 'e'"), {}) == {"n": 0}
    if db.is_postgres:  # a connection the server dropped: the app answers 503, the pool discards it
        with pytest.raises(OperationalError):
            db.row_of(text("SELECT pg_terminate_backend(pg_backend_pid())"), {})
        for _ in range(12):  # every pooled connection still works
            assert db.row_of(text("SELECT 1 AS one"), {}) == {"one": 1}
