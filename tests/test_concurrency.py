"""Two requests racing on one order: exactly one wins, the rest get 409 and change nothing."""
import threading
from collections import Counter

from sqlalchemy import func, select

from services.orders.models import OutboxEvent, TimelineEntry
from tests.support.api import ApiClient


def _race(app, n, request):
    barrier = threading.Barrier(n)
    results = []

    def worker():
        client = ApiClient(app)  # a client per thread, like separate connections
        barrier.wait()
        results.append(request(client))

    threads = [threading.Thread(target=worker) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def test_twenty_racing_approvals_complete_the_order_once(app, api, db):
    agent, buyer, order = api.order_in("delivered")
    oid = order["id"]
    results = _race(app, 20, lambda c: c.patch(f"/api/orders/{oid}", buyer, json={"action": "approve"}))
    statuses = Counter(status for status, _ in results)
    assert statuses == {200: 1, 409: 19}, statuses
    assert all(body["code"] == "invalid_transition" for status, body in results if status == 409)

    final = api.ok("GET", f"/api/orders/{oid}", buyer)
    assert final["status"] == "completed"
    assert [t["action"] for t in final["timeline"]].count("approve") == 1
    assert api.ok("GET", f"/api/agents/{agent.id}")["completed_orders"] == 1
    with db.transaction() as session:
        completions = session.scalar(select(func.count()).select_from(OutboxEvent)
                                     .where(OutboxEvent.order_id == oid, OutboxEvent.event == "order.completed"))
    assert completions == 1  # one payout asked for, not twenty


def test_one_hash_racing_to_pay_several_orders_pays_one_and_the_others_are_payment_reused(app, api):
    """One buyer, four unpaid orders of one price, one transfer: four pays race with its hash."""
    agent, service, buyer = api.setup()
    for _ in range(3):
        orders = [api.order(buyer, service)["id"] for _ in range(4)]
        tx = api.transfer(buyer, orders[0])
        todo, lock = iter(orders), threading.Lock()

        def request(client):
            with lock:
                oid = next(todo)
            return client.patch(f"/api/orders/{oid}", buyer, json={"action": "pay", "escrow_tx_hash": tx})

        results = _race(app, 4, request)
        assert sorted((status, body.get("code")) for status, body in results) == \
            [(200, None)] + [(409, "payment_reused")] * 3, results
        statuses = sorted(api.ok("GET", f"/api/orders/{oid}", buyer)["status"] for oid in orders)
        assert statuses == ["paid"] + ["quoted"] * 3


def test_retries_racing_with_one_idempotency_key_all_get_the_first_response(app, api):
    """A client retrying while its first approval still runs (one Idempotency-Key, five requests at
    once): the order is approved once and every request gets that approval's 200."""
    agent, buyer, order = api.order_in("delivered")
    oid = order["id"]

    def request(client):
        status, body = client.patch(f"/api/orders/{oid}", buyer, json={"action": "approve"},
                                    headers={"Idempotency-Key": "approve-once"})
        return status, body, client.last.headers.get("Idempotent-Replayed")

    results = _race(app, 5, request)
    assert [status for status, _, _ in results] == [200] * 5, results
    assert all(body == results[0][1] for _, body, _ in results)
    assert sorted(str(replayed) for _, _, replayed in results) == ["None"] + ["true"] * 4
    final = api.ok("GET", f"/api/orders/{oid}", buyer)
    assert [t["action"] for t in final["timeline"]].count("approve") == 1


def test_approve_racing_dispute_lets_exactly_one_through(app, api, db):
    agent, buyer, order = api.order_in("delivered")
    oid = order["id"]
    actions = iter(["approve", "dispute"] * 5)
    lock = threading.Lock()

    def request(client):
        with lock:
            action = next(actions)
        return client.patch(f"/api/orders/{oid}", buyer, json={"action": action})

    results = _race(app, 10, request)
    assert sorted(s for s, _ in results).count(200) == 1
    final = api.ok("GET", f"/api/orders/{oid}", buyer)
    with db.transaction() as session:
        entries = session.scalar(select(func.count()).select_from(TimelineEntry)
                                 .where(TimelineEntry.order_id == oid))
    assert final["status"] in ("completed", "disputed")
    assert entries == len(final["timeline"]) == len(order["timeline"]) + 1


def test_one_transaction_hash_pays_one_order_even_when_raced(app, api):
    agent, service, buyer = api.setup()
    first, second = api.order(buyer, service), api.order(buyer, service)
    tx = api.transfer(buyer, first["id"])
    ids = iter([first["id"], second["id"]] * 4)
    lock = threading.Lock()

    def request(client):
        with lock:
            oid = next(ids)
        return client.patch(f"/api/orders/{oid}", buyer, json={"action": "pay", "escrow_tx_hash": tx})

    results = _race(app, 8, request)
    assert [s for s, _ in results].count(200) == 1
    assert {body["code"] for s, body in results if s != 200} <= {"payment_reused", "invalid_transition", "conflict"}
    paid = [api.ok("GET", f"/api/orders/{o['id']}", buyer)["escrow_tx_hash"] for o in (first, second)]
    assert paid.count(tx) == 1


def test_two_sweepers_fire_each_due_timer_once(app, api, db):
    import datetime as dt
    from services.orders.tasks import sweep_timers
    from shared.db import utcnow
    orders = [api.order_in("delivered") for _ in range(6)]
    runtime = app.extensions["orders_runtime"]
    later = utcnow() + dt.timedelta(seconds=runtime.settings.review_window_seconds + 60)
    fired = []
    barrier = threading.Barrier(2)

    def sweeper():
        barrier.wait()
        fired.append(sweep_timers(db, runtime, now=later))

    threads = [threading.Thread(target=sweeper) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sum(fired) == 6
    for agent, buyer, order in orders:
        final = api.ok("GET", f"/api/orders/{order['id']}", buyer)
        assert final["status"] == "completed"
        assert [t["action"] for t in final["timeline"]].count("auto_complete") == 1
    with db.transaction() as session:
        completions = session.scalar(select(func.count()).select_from(OutboxEvent)
                                     .where(OutboxEvent.event == "order.completed"))
    assert completions == 6
