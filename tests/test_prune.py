"""Old bookkeeping is pruned; anything still owed (unpublished events, pending timers) is kept."""
import datetime as dt

from sqlalchemy import func, select, update

from services.orders.models import IdempotencyRecord, OutboxEvent, Timer, Upload, WebhookDelivery
from services.orders.tasks import prune
from shared.db import utcnow


def _count(db, model, *where):
    with db.transaction() as session:
        return session.scalar(select(func.count()).select_from(model).where(*where))


def test_prune_keeps_what_is_owed_and_drops_what_is_old(api, app, db, settings):
    agent, buyer, order = api.order_in("delivered")  # events (unpublished here), a pending auto_complete timer
    api.call("POST", "/api/orders", buyer, json={"service_id": order["service_id"], "brief": "Another fox please"},
             headers={"Idempotency-Key": "k1"})
    app.extensions["orders_runtime"].outbox.relay()  # publish all events
    events, timers = _count(db, OutboxEvent), _count(db, Timer)

    assert prune(db, settings) == {"idempotency_keys": 0, "outbox_events": 0, "order_timers": 0,
                                   "webhook_deliveries": 0, "unused_uploads": 0}
    later = utcnow() + dt.timedelta(days=settings.retention_days + 1)
    counts = prune(db, settings, now=later)
    assert counts["idempotency_keys"] == 1
    assert counts["outbox_events"] == events  # all published, all old
    # timers not yet fired are still owed, however old
    assert counts["order_timers"] == 0 and _count(db, Timer) == timers
    assert _count(db, Timer, Timer.fired_at.is_(None)) == timers


def test_unpublished_events_survive_the_prune(api, db, settings):
    api.order_in("quoted")
    before = _count(db, OutboxEvent, OutboxEvent.published_at.is_(None))
    assert before > 0
    prune(db, settings, now=utcnow() + dt.timedelta(days=365))
    assert _count(db, OutboxEvent, OutboxEvent.published_at.is_(None)) == before


def test_an_expired_idempotency_key_starts_afresh(make_app):
    from tests.support.api import ApiClient
    api = ApiClient(make_app(idempotency_ttl_seconds=0))
    agent, service, buyer = api.setup()
    body = {"service_id": service["id"], "brief": "A drawing of a fox."}
    first = api.call("POST", "/api/orders", buyer, json=body, headers={"Idempotency-Key": "k"})
    again = api.call("POST", "/api/orders", buyer, json=body, headers={"Idempotency-Key": "k"})
    assert first[1]["data"]["id"] != again[1]["data"]["id"]
    assert _count(api.app.extensions["db"], IdempotencyRecord) == 1  # the expired record was replaced


def test_an_upload_no_delivery_took_is_deleted_with_its_file_and_a_delivered_one_is_kept(api, app, db, settings):
    from tests.test_uploads import png
    storage = app.extensions["orders_runtime"].storage
    agent, buyer, order = api.order_in("paid")
    kept = api.upload(agent, png(), "kept.png")
    api.ok("POST", f"/api/orders/{order['id']}/deliver", agent,
           json={"deliverables": [{"upload_id": kept["upload_id"], "media_type": "image"}]})
    dropped = api.upload(agent, png(), "dropped.png")
    with db.transaction() as session:
        keys = dict(session.execute(select(Upload.id, Upload.storage_key)).all())
    assert prune(db, settings, storage=storage)["unused_uploads"] == 0  # too recent
    later = utcnow() + dt.timedelta(seconds=settings.unused_upload_ttl_seconds + 1)
    assert prune(db, settings, now=later, storage=storage)["unused_uploads"] == 1
    assert not storage.exists(keys[dropped["upload_id"]]) and storage.exists(keys[kept["upload_id"]])
    assert _count(db, Upload) == 1


def test_the_agents_feed_keeps_the_retention_period_and_what_is_still_being_sent(api, db, settings):
    from services.orders import webhooks
    agent, buyer, order = api.order_in("paid")
    with db.transaction() as session:
        for event in session.scalars(select(OutboxEvent).where(OutboxEvent.order_id == order["id"])):
            webhooks.record(session, settings, event.message())  # no endpoint: kept for the feed
        session.execute(update(WebhookDelivery).where(WebhookDelivery.event == "order.paid")
                        .values(status="pending"))  # as if still being retried
    assert prune(db, settings)["webhook_deliveries"] == 0
    later = utcnow() + dt.timedelta(days=settings.retention_days + 1)
    assert prune(db, settings, now=later)["webhook_deliveries"] == 1
    assert _count(db, WebhookDelivery) == 1 and _count(db, WebhookDelivery, WebhookDelivery.status == "pending") == 1
