"""A real webhooks worker (its own process, as `make run` starts it) killed with SIGKILL loses
nothing. Killed while its request waits on the agent's endpoint: once restarted, the sweep hands
the unfinished attempt to it again. Killed while it is still recording an event: the broker hands
the event's message out again after BROKER_VISIBILITY_TIMEOUT_SECONDS. Either way every event
arrives."""
from __future__ import annotations

import contextlib
import datetime as dt
import os
import sqlite3
import tempfile
import time

import redis as redis_lib
from sqlalchemy import select, text

from services.orders import webhooks
from services.orders.models import WebhookDelivery
from tests.support.api import ApiClient, Party
from tests.support.net import Proc, celery
from tests.support.receiver import Receiver

TIMEOUT = 3  # WEBHOOK_TIMEOUT_SECONDS: a killed attempt's lease runs out after 2 × 3 + 5 s


def _wait(predicate, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return predicate()


def test_killing_the_webhooks_worker_mid_delivery_loses_nothing(make_app, migrated, redis_url):
    settings = dict(webhook_allowed_hosts=("127.0.0.1",), webhook_timeout_seconds=TIMEOUT,
                    webhook_retry_base_seconds=0.5)
    app = make_app(**settings)
    api, db, rt = ApiClient(app), app.extensions["db"], app.extensions["orders_runtime"]
    receiver = Receiver(delay=TIMEOUT - 1)  # slow enough to be caught mid-request
    env = {k: v for k, v in os.environ.items() if not k.endswith("DATABASE_URL")}
    env.update(DATABASE_URL=migrated.url, REDIS_URL=redis_url, LOG_LEVEL="WARNING",
               WEBHOOK_ALLOWED_HOSTS="127.0.0.1", WEBHOOK_TIMEOUT_SECONDS=str(TIMEOUT),
               WEBHOOK_RETRY_BASE_SECONDS="0.5")
    # one process: the event being POSTed is the only message it holds when it is killed (one it
    # was still recording comes back after the broker's visibility timeout: the next test)
    worker = Proc("webhooks", celery("services.orders.worker", "worker", "-Q", "webhooks", "--concurrency", "1",
                                     "--without-gossip", "--without-mingle"), env, tempfile.mkdtemp())
    try:
        created = api.ok("POST", "/api/agents", json={"name": "Hooked", "endpoint_url": receiver.url})
        agent = Party(created["api_key"], created["agent"]["id"])
        buyer, service = api.buyer(), api.service(agent, "fixed")
        oid = api.pay(buyer, api.order(buyer, service)["id"])["id"]  # order.created, order.paid
        # the outbox published both events to queue webhooks at commit; the worker takes them
        assert _wait(lambda: receiver.received, 30), "the worker never called the endpoint"
        worker.kill()  # mid-request: the receiver holds every request for a while
        receiver.delay = 0
        worker.start()

        def sweep_until_delivered():
            with db.transaction() as session:
                for delivery_id in webhooks.due_ids(session, dt.datetime.now(dt.timezone.utc)):
                    rt.outbox.celery.send_task("webhooks.attempt", args=[delivery_id], queue="webhooks")
                statuses = session.scalars(select(WebhookDelivery.status)
                                           .where(WebhookDelivery.order_id == oid)).all()
            return len(statuses) == 2 and set(statuses) == {"delivered"}

        assert _wait(sweep_until_delivered, 60), api.ok("GET", "/api/agents/me/webhook-deliveries", agent)
        assert sorted(set(receiver.events())) == ["order.created", "order.paid"]
        assert len(receiver.received) >= 3  # at least one attempt was cut off and made again
        by_delivery = {}
        for request in receiver.received:
            by_delivery.setdefault(request.headers["X-Webhook-Delivery"], set()).add(request.json["id"])
        assert len(by_delivery) == 2 and all(len(ids) == 1 for ids in by_delivery.values())
    finally:
        worker.stop()
        receiver.close()


# the shortest visibility timeout the settings allow with these task limits (twice the longest)
SHORT_LIMITS = {"WEBHOOK_TIMEOUT_SECONDS": "1", "RAIL_TIMEOUT_SECONDS": "0.5", "MEDIA_TASK_TIME_LIMIT_SECONDS": "2",
                "BROKER_VISIBILITY_TIMEOUT_SECONDS": "14"}


@contextlib.contextmanager
def agents_locked(db, agent_id: str):
    """Hold the lock recording an event for this agent needs (PostgreSQL: the agent's row; SQLite:
    the database's write lock), so a worker that takes the event waits inside its transaction."""
    if db.is_postgres:
        with db.engine.connect() as conn:
            conn.execute(text("SELECT id FROM agents WHERE id = :id FOR UPDATE"), {"id": agent_id})
            yield
            conn.rollback()
    else:
        conn = sqlite3.connect(db.engine.url.database, isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            conn.execute("ROLLBACK")
            conn.close()


def test_a_worker_killed_while_recording_gets_its_event_back_after_the_visibility_timeout(
        make_app, migrated, redis_url):
    app = make_app(webhook_allowed_hosts=("127.0.0.1",))
    api, db = ApiClient(app), app.extensions["db"]
    broker = redis_lib.Redis.from_url(redis_url)
    receiver = Receiver()
    env = {k: v for k, v in os.environ.items() if not k.endswith("DATABASE_URL")}
    env.update(DATABASE_URL=migrated.url, REDIS_URL=redis_url, LOG_LEVEL="WARNING",
               WEBHOOK_ALLOWED_HOSTS="127.0.0.1", **SHORT_LIMITS)
    argv = celery("services.orders.worker", "worker", "-Q", "webhooks", "--concurrency", "1", "--without-gossip",
                  "--without-mingle")
    logdir, worker = tempfile.mkdtemp(), None
    try:
        created = api.ok("POST", "/api/agents", json={"name": "Hooked", "endpoint_url": receiver.url})
        agent = Party(created["api_key"], created["agent"]["id"])
        buyer, service = api.buyer(), api.service(agent, "fixed")
        oid = api.pay(buyer, api.order(buyer, service)["id"])["id"]  # order.created, order.paid: queued
        with agents_locked(db, agent.id):
            worker = Proc("webhooks", argv, env, logdir)
            # the worker took order.created (its message is unacknowledged) and waits on the lock
            assert _wait(lambda: broker.hlen("unacked") >= 1, 30), "the worker never took the event"
            time.sleep(0.5)
            worker.kill()
        taken_at = time.monotonic()
        worker.start()
        assert _wait(lambda: sorted(set(receiver.events())) == ["order.created", "order.paid"], 60), \
            (receiver.events(), api.ok("GET", "/api/agents/me/webhook-deliveries", agent))
        # order.paid went out at once; order.created only once the broker gave its message back
        assert time.monotonic() - taken_at >= 14 - 2

        def statuses():
            with db.transaction() as session:
                return sorted(session.execute(select(WebhookDelivery.event, WebhookDelivery.status)
                                              .where(WebhookDelivery.order_id == oid)).all())

        # the worker records a delivery once the endpoint has answered: a moment after it received
        assert _wait(lambda: statuses() == [("order.created", "delivered"), ("order.paid", "delivered")], 10), \
            statuses()
        assert len(receiver.received) == 2  # each event once
    finally:
        if worker is not None:
            worker.stop()
        receiver.close()
