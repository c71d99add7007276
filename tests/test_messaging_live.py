"""Live messages over Server-Sent Events: both parties hear each new message, whichever messaging
process took it; a stream resumes after Last-Event-ID; streams are kept alive and end in time.

Streams are read over real HTTP (served apps in threads, and real gunicorn processes)."""
from __future__ import annotations

import http.client
import json
import os
import threading
import time
from urllib.parse import urlsplit

import pytest
import requests

from tests.support.api import ADMIN, Party
from tests.support.net import GunicornProcess, ServedApp
from tests.test_messaging import Chat, make_messaging, orders  # noqa: F401  (fixtures)


class EventStream:
    """A minimal SSE client: one event block at a time, comments included."""

    def __init__(self, base_url: str, path: str, who: Party | None = None, headers: dict | None = None,
                 timeout: float = 10):
        url = urlsplit(base_url)
        self.conn = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)
        all_headers = dict(who.headers) if who else {}
        all_headers.update(headers or {})
        self.conn.request("GET", path, headers=all_headers)
        self.response = self.conn.getresponse()

    @property
    def status(self) -> int:
        return self.response.status

    def block(self) -> dict:
        fields, comments = {}, []
        while True:
            raw = self.response.readline()
            if not raw:
                raise EOFError("the stream ended")
            line = raw.decode().rstrip("\n")
            if line == "":
                if fields or comments:
                    return {**fields, "comments": comments}
                continue
            if line.startswith(":"):
                comments.append(line[1:].strip())
                continue
            name, _, value = line.partition(":")
            fields[name] = value[1:] if value.startswith(" ") else value

    def message(self) -> dict:
        """The next message event: {"id": seq, **message}."""
        while True:
            block = self.block()
            if block.get("event") == "message":
                return {"seq": int(block["id"]), **json.loads(block["data"])}

    def messages(self, n: int) -> list[dict]:
        return [self.message() for _ in range(n)]

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def live(make_messaging):
    """A messaging app served over HTTP, and a client of the same app."""
    app = make_messaging(messaging_stream_heartbeat_seconds=0.3)
    served = ServedApp(app)
    yield served, Chat(app)
    served.close()


def stream_path(order_id: str, query: str = "") -> str:
    return f"/api/orders/{order_id}/messages/stream" + (f"?{query}" if query else "")


def test_both_parties_hear_each_new_message(api, live):
    served, chat = live
    agent, buyer, order = api.order_in("paid")
    oid = order["id"]
    chat.say(oid, buyer, "Before anyone listened.")
    streams = {name: EventStream(served.url, stream_path(oid), who) for name, who in
               (("buyer", buyer), ("agent", agent), ("admin", ADMIN))}
    try:
        for stream in streams.values():
            assert stream.status == 200
            assert stream.response.getheader("Content-Type").startswith("text/event-stream")
            assert stream.response.getheader("Cache-Control") == "no-cache"
            assert stream.block()["retry"] == "2000"
        sent = chat.say(oid, buyer, "Hello live!")
        reply = chat.say(oid, agent, "Hello back.")
        for stream in streams.values():  # only what came after connecting, in order
            heard = stream.messages(2)
            assert [{k: v for k, v in m.items() if k != "seq"} for m in heard] == [sent, reply]
            assert heard[0]["seq"] < heard[1]["seq"]
    finally:
        for stream in streams.values():
            stream.close()


def test_a_stream_resumes_after_last_event_id(api, live):
    served, chat = live
    agent, buyer, order = api.order_in("paid")
    oid = order["id"]
    sent = [chat.say(oid, buyer if n % 2 == 0 else agent, f"message {n}") for n in range(3)]
    everything = EventStream(served.url, stream_path(oid, "last_event_id=0"), agent)
    replayed = everything.messages(3)
    everything.close()
    assert [m["id"] for m in replayed] == [m["id"] for m in sent]
    seqs = [m["seq"] for m in replayed]

    resumed = EventStream(served.url, stream_path(oid), buyer, headers={"Last-Event-ID": str(seqs[0])})
    assert [m["content"] for m in resumed.messages(2)] == ["message 1", "message 2"]
    later = chat.say(oid, agent, "message 3")
    assert resumed.message()["id"] == later["id"]  # then live, without a repeat
    resumed.close()

    # the header wins over the query (a browser's EventSource reconnects to the same URL)
    both = EventStream(served.url, stream_path(oid, "last_event_id=0"), buyer, headers={"Last-Event-ID": str(seqs[1])})
    assert [m["content"] for m in both.messages(2)] == ["message 2", "message 3"]
    both.close()

    # a page's next_cursor is a position too: list, then stream from there
    cursor = chat.messages(oid, buyer, limit=2)["next_cursor"]
    from_page = EventStream(served.url, stream_path(oid, f"last_event_id={cursor}"), buyer)
    assert [m["content"] for m in from_page.messages(2)] == ["message 2", "message 3"]
    from_page.close()


def test_a_stream_gets_every_message_of_a_burst_once_in_order(api, live):
    served, chat = live
    agent, buyer, order = api.order_in("paid")
    oid = order["id"]
    stream = EventStream(served.url, stream_path(oid), agent)
    stream.block()  # connected (retry advice)

    def post_many(who: Party, tag: str):
        client = Chat(chat.app)
        for n in range(15):
            client.say(oid, who, f"{tag} {n}")

    threads = [threading.Thread(target=post_many, args=(buyer, "buyer")),
               threading.Thread(target=post_many, args=(agent, "agent"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    heard = stream.messages(30)
    stream.close()
    assert [m["id"] for m in heard] == [m.id for m in chat.stored(oid)]


def test_idle_streams_get_heartbeats_and_end_after_their_maximum_duration(api, make_messaging):
    app = make_messaging(messaging_stream_heartbeat_seconds=0.2, messaging_stream_max_seconds=1.0)
    served = ServedApp(app)
    try:
        agent, buyer, order = api.order_in("paid")
        stream = EventStream(served.url, stream_path(order["id"]), buyer)
        started = time.monotonic()
        blocks = []
        with pytest.raises(EOFError):
            while True:
                blocks.append(stream.block())
        assert time.monotonic() - started < 5
        assert sum("keep-alive" in b["comments"] for b in blocks) >= 2
        stream.close()
    finally:
        served.close()


# --- two messaging processes -------------------------------------------------------------------

def test_a_message_posted_to_one_process_reaches_a_stream_on_another(api, orders, migrated, redis_url):
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "MESSAGING_DATABASE_URL")}
    env.update(DATABASE_URL=migrated.url, REDIS_URL=redis_url, ORDERS_URL=orders.url, RATE_LIMITS="off",
               LOG_LEVEL="WARNING", MESSAGING_STREAM_HEARTBEAT_SECONDS="1", PYTHONUNBUFFERED="1")
    one, two = (GunicornProcess("services.messaging.wsgi:app", env) for _ in range(2))
    try:
        one.wait_ready()
        two.wait_ready()
        agent, buyer, order = api.order_in("paid")
        oid = order["id"]
        listening = EventStream(one.url, stream_path(oid), agent)
        assert listening.status == 200
        listening.block()
        posted = requests.post(f"{two.url}/api/orders/{oid}/messages", headers=buyer.headers,
                               json={"content": "Posted to process two."}, timeout=10)
        assert posted.status_code == 201, posted.text
        heard = listening.message()
        assert heard["id"] == posted.json()["data"]["id"] and heard["content"] == "Posted to process two."
        reply = requests.post(f"{one.url}/api/orders/{oid}/messages", headers=agent.headers,
                              json={"content": "Answered on process one."}, timeout=10)
        assert reply.status_code == 201, reply.text
        assert listening.message()["id"] == reply.json()["data"]["id"]
        listening.close()
        page = requests.get(f"{two.url}/api/orders/{oid}/messages", headers=buyer.headers, timeout=10).json()["data"]
        assert [m["content"] for m in page["items"]] == ["Posted to process two.", "Answered on process one."]
        assert page["unread_count"] == 0 and page["items"][0]["read_at"] is None  # the agent never paged
    finally:
        one.stop()
        two.stop()
