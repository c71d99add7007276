"""A real webhooks worker (its own process, as `make run` starts it) killed with SIGKILL while its
request waits on the agent's endpoint loses nothing: once restarted, the sweep hands the
unfinished attempt to it again and every event arrives."""
from __future__ import annotations

import datetime as dt
import os
import tempfile
import time

from sqlalchemy import select

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
    # one process: the event being POSTed is the only message it holds when it is killed (a
    # message it was still recording would wait for the broker's visibility timeout, an hour)
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
