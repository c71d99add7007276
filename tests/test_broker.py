"""The outbox's own task messages are the ones Celery's send_task writes, and a Celery consumer
reads them as its own."""
import base64
import json

import redis

from shared.broker import Publisher, Task, task_message
from shared.celery_app import make_celery

# what differs between any two messages sent for the same task: who sent it, and unique tags
PER_MESSAGE = {("headers", "origin"), ("headers", "argsrepr"), ("properties", "reply_to"),
               ("properties", "delivery_tag")}


def _flatten(message: dict) -> dict:
    out = {}
    for part, value in message.items():
        if part == "body":
            out[("body",)] = json.loads(base64.b64decode(value))
        elif isinstance(value, dict):
            out.update({(part, key): v for key, v in value.items() if (part, key) not in PER_MESSAGE})
        else:
            out[(part,)] = value
    return out


def _celerys(settings, redis_url, task: Task) -> dict:
    """The message Celery's own send_task puts on the queue for `task`."""
    client = redis.Redis.from_url(redis_url)
    client.delete(task.queue)
    app = make_celery("reference", settings.replace(redis_url=redis_url))
    app.send_task(task.name, args=task.args, kwargs=task.kwargs, queue=task.queue, task_id=task.id,
                  headers=task.headers)
    [raw] = client.lrange(task.queue, 0, -1)
    client.delete(task.queue)
    return json.loads(raw)


def test_a_task_message_is_what_send_task_writes_but_for_who_sent_it(settings, redis_url):
    event = {"id": "evt_1", "event": "order.completed", "data": {"held_usd": "45.00", "note": "naïve ✓"}}
    for task in (Task("payouts.settle_order", "payouts", [event], id="evt_1:payouts.settle_order",
                      headers={"request_id": "req-1"}),
                 Task("orders.relay_outbox", "default", [["evt_1", "evt_2"]], {"published": True}, id="relay-1",
                      headers={"request_id": "req-2"})):
        ours = json.loads(task_message(task))
        reference = _celerys(settings, redis_url, task)
        assert _flatten(ours) == _flatten(reference)
        assert set(ours["headers"]) == set(reference["headers"])
        assert set(ours["properties"]) == set(reference["properties"])


def test_published_messages_are_read_by_a_celery_consumer_and_duplicated_on_request(settings, redis_url):
    app = make_celery("reader", settings.replace(redis_url=redis_url))
    client = redis.Redis.from_url(redis_url)
    client.delete("media")
    Publisher(redis_url, copies=2).publish([Task("media.process_delivery", "media", [{"id": "evt_9"}],
                                                 id="evt_9:media.process_delivery")])
    seen = []
    with app.connection_for_read() as conn:
        queue = conn.SimpleQueue("media", no_ack=True)
        for _ in range(2):
            message = queue.get(timeout=2)
            assert message.headers["task"] == "media.process_delivery"
            assert message.headers["id"] == "evt_9:media.process_delivery"
            args, kwargs, _embed = message.decode()
            seen.append((args, kwargs, message.delivery_info["routing_key"], message.delivery_tag))
        queue.close()
    assert [s[:3] for s in seen] == [([{"id": "evt_9"}], {}, "media")] * 2
    assert seen[0][3] != seen[1][3]  # two messages, not one message twice


def test_extra_headers_join_a_message_and_replace_its_own_of_the_same_name():
    from shared.broker import _plain_message, task_body

    event = {"id": "evt_2", "note": "naïve ✓ \"quoted\""}
    plain_headers = Task("payouts.settle_order", "payouts", [event], id="evt_2:p",
                         headers={"request_id": "req-\"3\"", "from_commit": True})
    fast, plain = (json.loads(m) for m in (task_message(plain_headers),
                                           _plain_message(plain_headers, task_body(plain_headers))))
    assert fast["properties"].pop("delivery_tag") != plain["properties"].pop("delivery_tag")
    assert fast == plain  # the two ways of writing a message agree
    assert fast["headers"]["request_id"] == 'req-"3"' and fast["headers"]["from_commit"] is True

    overriding = Task("payouts.settle_order", "payouts", [event], id="evt_2:p", headers={"retries": 3})
    message = json.loads(task_message(overriding))
    assert message["headers"]["retries"] == 3
    assert set(message["headers"]) == set(fast["headers"]) - {"request_id", "from_commit"}
    assert json.loads(base64.b64decode(message["body"]))[0] == [event]
