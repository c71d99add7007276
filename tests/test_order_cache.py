"""Reading an order is served from its cached views, which never go stale or leak."""
import redis
from sqlalchemy import event

from services.orders.models import Order
from tests.support.api import ADMIN, ApiClient


def _count_queries(engine):
    seen = []
    listener = lambda *args, **kw: seen.append(args[2])  # noqa: E731
    event.listen(engine, "before_cursor_execute", listener)
    return seen, lambda: event.remove(engine, "before_cursor_execute", listener)


def test_a_read_after_a_change_costs_no_query_and_shows_the_change(api, db):
    agent, buyer, order = api.order_in("delivered")
    api.ok("PATCH", f"/api/orders/{order['id']}", buyer, json={"action": "revision", "feedback": "Bluer sky"})
    seen, stop = _count_queries(db.engine)
    try:
        view = api.ok("GET", f"/api/orders/{order['id']}", buyer)
    finally:
        stop()
    assert view["status"] == "revision_requested" and view["revisions"][0]["feedback"] == "Bluer sky"
    assert seen == []


def test_each_party_gets_its_own_view_and_strangers_get_404(api):
    agent, buyer, order = api.order_in("delivered")
    oid = order["id"]
    assert api.ok("GET", f"/api/orders/{oid}", buyer)["deliveries"][0]["items"][0]["url"] == \
        "https://example.com/result"  # a link is not gated
    image_agent, image_buyer, image_order = api.order_in("paid")
    api.deliver(image_agent, image_order["id"], media_type="image", url="https://example.com/x.png")
    for _ in range(2):  # the first read fills the cache, the second is served from it
        assert api.ok("GET", f"/api/orders/{image_order['id']}", image_buyer)["deliveries"][0]["items"][0]["url"] is None
        assert api.ok("GET", f"/api/orders/{image_order['id']}", image_agent)["deliveries"][0]["items"][0]["url"]
        assert api.ok("GET", f"/api/orders/{image_order['id']}", ADMIN)["deliveries"][0]["items"][0]["url"]
        for stranger in (buyer, agent):
            status, body = api.get(f"/api/orders/{image_order['id']}", stranger)
            assert (status, body["code"]) == (404, "not_found")


def test_an_older_version_never_replaces_a_newer_view(api, app, db, redis_url):
    agent, buyer, order = api.order_in("paid")
    views = app.extensions["order_views"]
    with db.transaction() as session:
        stale = session.get(Order, order["id"])
        stale_args = views._render(stale)  # as a slow reader rendered it
    api.ok("POST", f"/api/orders/{order['id']}/start", agent)
    views._write(order["id"], stale_args)  # the slow reader stores late
    assert api.ok("GET", f"/api/orders/{order['id']}", buyer)["status"] == "in_progress"


def test_reads_fall_back_to_the_database_when_redis_is_down(make_app, app):
    api = ApiClient(app)
    agent, buyer, order = api.order_in("paid")
    broken = ApiClient(make_app(redis_url="redis://127.0.0.1:1/0"))
    assert broken.ok("GET", f"/api/orders/{order['id']}", buyer)["status"] == "paid"


def test_the_cached_view_matches_a_fresh_rendering(api, app, db, redis_url):
    agent, buyer, order = api.order_in("completed")
    api.ok("POST", f"/api/orders/{order['id']}/review", buyer, json={"rating": 5}, expect=201)
    cached = api.ok("GET", f"/api/orders/{order['id']}", buyer)
    redis.Redis.from_url(redis_url).delete(f"orders:view:{order['id']}")
    fresh = api.ok("GET", f"/api/orders/{order['id']}", buyer)
    assert cached == fresh and fresh["review"]["rating"] == 5


def test_a_writer_that_dies_before_storing_leaves_no_stale_view(api, app, monkeypatch):
    agent, buyer, order = api.order_in("paid")
    assert api.ok("GET", f"/api/orders/{order['id']}", buyer)["status"] == "paid"  # cached
    views = app.extensions["order_views"]
    monkeypatch.setattr(views, "_write", lambda order_id, args: None)  # dies between commit and store
    api.ok("POST", f"/api/orders/{order['id']}/start", agent)
    assert api.ok("GET", f"/api/orders/{order['id']}", buyer)["status"] == "in_progress"


def test_every_committed_change_is_announced_and_a_refused_one_is_not(api, redis_url):
    import json
    import time
    from services.orders.cache import CHANGES_CHANNEL
    agent, buyer, order = api.order_in("delivered")
    listener = redis.Redis.from_url(redis_url).pubsub(ignore_subscribe_messages=True)
    listener.subscribe(CHANGES_CHANNEL)
    listener.get_message(timeout=1)
    api.patch(f"/api/orders/{order['id']}", buyer, json={"action": "start"})  # refused: not the buyer's
    api.ok("PATCH", f"/api/orders/{order['id']}", buyer, json={"action": "approve"})
    heard, deadline = [], time.monotonic() + 5
    while time.monotonic() < deadline and not heard:
        message = listener.get_message(timeout=0.5)
        if message and json.loads(message["data"])["order_id"] == order["id"]:  # the channel is shared
            heard.append(json.loads(message["data"]))
    listener.close()
    assert [(m["order_id"], m["status"]) for m in heard] == [(order["id"], "completed")]
