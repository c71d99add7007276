"""Messaging (issue 5): an order's buyer and agent talk once it is paid.

The messaging app runs against the real orders app served over HTTP (its internal API, with the
service credential), on the test database and Redis, as it does in production; orders are
walked to their states through the orders API the way users would.
"""
from __future__ import annotations

import base64
import json
import secrets
import string
import threading
import time

import pytest
import redis
from hypothesis import HealthCheck, Phase, given, settings as hsettings, strategies as st
from sqlalchemy import select

from services.messaging.app import create_app as create_messaging
from services.messaging.models import Message, OutboxEvent
from shared.auth import sign_session
from shared.settings import load
from tests.support.api import ADMIN, ApiClient, Party
from tests.support.net import ServedApp

_ALNUM = string.ascii_letters + string.digits
UNKNOWN_ORDER = {"success": False, "error": "No such order.", "code": "not_found", "details": {}}
OPEN = ["paid", "in_progress", "delivered", "revision_requested", "completed", "disputed"]
BEFORE_PAYMENT = ["pending_quote", "quoted", "accepted", "cancelled"]


def unknown_id(prefix: str = "ord") -> str:
    return prefix + "_" + "".join(secrets.choice(_ALNUM) for _ in range(20))


def wait_for(predicate, timeout: float = 5.0, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(every)


# --- fixtures ----------------------------------------------------------------------------------

@pytest.fixture
def orders(app):
    """The orders app over real HTTP, where messaging's ORDERS_URL points."""
    served = ServedApp(app)
    yield served
    served.close()


@pytest.fixture
def make_messaging(migrated, redis_url, orders):
    apps = []

    def factory(**overrides):
        settings = load({}, database_url=migrated.url, redis_url=redis_url, rate_limits=False,
                        log_level="WARNING", orders_url=orders.url, outbox_sweep_seconds=0.2)
        app = create_messaging(settings.replace(**overrides))
        app.testing = True
        apps.append(app)
        return app

    yield factory
    for app in apps:
        runtime = app.extensions["messaging"]
        runtime.background.stop()
        runtime.db.engine.dispose()


@pytest.fixture
def messaging(make_messaging):
    return make_messaging()


@pytest.fixture
def chat(messaging):
    return Chat(messaging)


class Chat(ApiClient):
    """The messaging API as its users call it."""

    def messages(self, order_id: str, who: Party, expect=200, **query) -> dict:
        path = f"/api/orders/{order_id}/messages"
        if query:
            path += "?" + "&".join(f"{k}={v}" for k, v in query.items())
        status, body = self.get(path, who)
        assert status == expect, (status, body)
        return body["data"] if expect == 200 else body

    def say(self, order_id: str, who: Party, content: str, expect=201, headers=None) -> dict:
        status, body = self.post(f"/api/orders/{order_id}/messages", who, json={"content": content}, headers=headers)
        assert status == expect, (status, body)
        return body["data"] if expect == 201 else body

    @property
    def runtime(self):
        return self.app.extensions["messaging"]

    def listening(self) -> None:
        """Wait until this process listens to orders' change announcements."""
        self.get("/api/orders/x/messages")  # the first API request starts the listener
        assert wait_for(lambda: self.runtime.background.listener and self.runtime.background.listener.subscribed.is_set())

    def heard_of_change(self, order_id: str) -> None:
        """Wait until the listener dropped the fresh copy of this order (milliseconds after the change)."""
        cache = self.runtime.cache
        assert wait_for(lambda: not cache.exists(f"messaging:access-fresh:{order_id}"))

    def stored(self, order_id: str) -> list[Message]:
        with self.runtime.db.transaction() as session:
            return list(session.scalars(select(Message).where(Message.order_id == order_id).order_by(Message.seq)))


def assert_error(status: int, body, expected_status: int, code: str):
    assert status == expected_status, (status, body)
    assert set(body) == {"success", "error", "code", "details"} and body["success"] is False, body
    assert body["code"] == code, body


# --- the conversation ------------------------------------------------------------------------

def test_buyer_and_agent_talk_and_each_sees_what_the_other_read(api, chat):
    agent, buyer, order = api.order_in("paid")
    oid = order["id"]
    hello = chat.say(oid, buyer, "Hello! Can the fox be red?")
    assert hello["id"].startswith("msg_") and len(hello["id"]) == 24
    assert (hello["sender_type"], hello["sender_id"], hello["content"], hello["read_at"]) == \
        ("client", buyer.id, "Hello! Can the fox be red?", None)
    assert hello["created_at"].endswith("Z")
    assert set(hello) == {"id", "sender_type", "sender_id", "content", "created_at", "read_at"}

    # the agent has one unread message until it reads it
    page = chat.messages(oid, agent)
    assert [m["id"] for m in page["items"]] == [hello["id"]]
    assert page["unread_count"] == 0 and page["items"][0]["read_at"].endswith("Z")
    # the buyer now sees that the agent read it
    mine = chat.messages(oid, buyer)["items"][0]
    assert mine["read_at"] == page["items"][0]["read_at"]

    first = chat.say(oid, agent, "Sure, red it is.")
    second = chat.say(oid, agent, "Any size?")
    assert first["sender_type"] == "agent" and first["sender_id"] == agent.id
    one = chat.messages(oid, buyer, limit=1)
    assert [m["id"] for m in one["items"]] == [hello["id"]] and one["unread_count"] == 2
    two = chat.messages(oid, buyer, limit=1, after=one["next_cursor"])
    assert [m["id"] for m in two["items"]] == [first["id"]] and two["unread_count"] == 1
    three = chat.messages(oid, buyer, limit=1, after=two["next_cursor"])
    assert [m["id"] for m in three["items"]] == [second["id"]] and three["unread_count"] == 0
    end = chat.messages(oid, buyer, after=three["next_cursor"])
    assert end == {"items": [], "next_cursor": None, "unread_count": 0}
    # reading again changes nothing: read_at stays when it first was read
    again = chat.messages(oid, buyer)
    assert [m["read_at"] for m in again["items"]] == [page["items"][0]["read_at"], two["items"][0]["read_at"],
                                                       three["items"][0]["read_at"]]
    assert [m["id"] for m in chat.messages(oid, agent)["items"]] == [hello["id"], first["id"], second["id"]]


def test_content_is_plain_text_stored_as_sent(api, chat):
    agent, buyer, order = api.order_in("paid")
    sent = "  <b>Bold?</b> & \"quotes\" — ünïcödé 🦊\nline two\t "
    assert chat.say(order["id"], buyer, sent)["content"] == sent
    assert chat.messages(order["id"], agent)["items"][0]["content"] == sent
    longest = "\n " + "x" * 2000 + " \n"  # 2000 characters once trimmed
    assert chat.say(order["id"], buyer, longest)["content"] == longest
    assert chat.say(order["id"], agent, "x")["content"] == "x"


def test_the_unread_count_is_the_callers_own(api, chat):
    agent, buyer, order = api.order_in("paid")
    for n in range(3):
        chat.say(order["id"], buyer, f"buyer {n}")
    chat.say(order["id"], agent, "agent 0")
    # the buyer reads only her own messages in this page: nothing of the agent's is marked
    page = chat.messages(order["id"], buyer, limit=3)
    assert page["unread_count"] == 1 and all(m["read_at"] is None for m in page["items"])
    assert chat.messages(order["id"], agent, limit=1)["unread_count"] == 2
    assert chat.messages(order["id"], agent)["unread_count"] == 0


# --- when messaging is open --------------------------------------------------------------------

@pytest.mark.parametrize("state", OPEN)
def test_the_parties_post_while_the_order_is_open(api, chat, state):
    agent, buyer, order = api.order_in(state)
    chat.say(order["id"], buyer, f"buyer in {state}")
    chat.say(order["id"], agent, f"agent in {state}")
    assert [m["content"] for m in chat.messages(order["id"], buyer)["items"]] == [f"buyer in {state}",
                                                                                  f"agent in {state}"]


@pytest.mark.parametrize("state", BEFORE_PAYMENT)
def test_messaging_is_closed_before_payment(api, chat, state):
    agent, buyer, order = api.order_in(state)
    for who in (buyer, agent):
        assert_error(*chat.post(f"/api/orders/{order['id']}/messages", who, json={"content": "hi"}), 409,
                     "messaging_closed")
        assert_error(*chat.get(f"/api/orders/{order['id']}/messages", who), 409, "messaging_closed")
        assert_error(*chat.get(f"/api/orders/{order['id']}/messages/stream", who), 409, "messaging_closed")
    assert chat.stored(order["id"]) == []


def test_a_paid_order_cancelled_later_keeps_its_history_readable_and_closed(api, chat):
    agent, buyer, order = api.order_in("paid")
    chat.listening()
    chat.say(order["id"], buyer, "Actually, never mind.")
    chat.say(order["id"], agent, "Sorry to hear.")
    api.ok("PATCH", f"/api/orders/{order['id']}", buyer, json={"action": "cancel"})
    path = f"/api/orders/{order['id']}/messages"
    chat.heard_of_change(order["id"])
    for who in (buyer, agent):
        assert_error(*chat.post(path, who, json={"content": "one more"}), 409, "messaging_closed")
        assert [m["content"] for m in chat.messages(order["id"], who)["items"]] == ["Actually, never mind.",
                                                                                   "Sorry to hear."]
    assert chat.messages(order["id"], ADMIN)["items"][0]["content"] == "Actually, never mind."


def test_an_order_change_reaches_messaging_at_once_not_after_the_cache_ttl(api, make_messaging):
    chat = Chat(make_messaging(messaging_access_ttl_seconds=3600))
    chat.listening()
    agent, buyer, order = api.order_in("accepted")
    oid = order["id"]
    assert_error(*chat.get(f"/api/orders/{oid}/messages", buyer), 409, "messaging_closed")  # now cached
    api.pay(buyer, oid)
    assert wait_for(lambda: chat.get(f"/api/orders/{oid}/messages", buyer)[0] == 200)
    chat.say(oid, agent, "Thanks for paying.")
    api.ok("POST", f"/api/orders/{oid}/decline", agent, json={"reason": "Too busy after all."})
    chat.heard_of_change(oid)
    assert_error(*chat.post(f"/api/orders/{oid}/messages", agent, json={"content": "x"}), 409, "messaging_closed")
    assert [m.content for m in chat.stored(oid)] == ["Thanks for paying."]


# --- who may talk ------------------------------------------------------------------------------

def test_only_the_orders_buyer_and_agent_see_and_post_others_get_what_an_unknown_order_gets(api, chat):
    agent, buyer, order = api.order_in("paid")
    chat.say(order["id"], buyer, "Private.")
    other_buyer, other_agent = api.buyer(), api.agent("Other Agent")
    unknown = unknown_id()
    for who in (other_buyer, other_agent):
        for path in (f"/api/orders/{order['id']}/messages", f"/api/orders/{unknown}/messages"):
            assert chat.get(path, who) == (404, UNKNOWN_ORDER)
            assert chat.post(path, who, json={"content": "Let me in"}) == (404, UNKNOWN_ORDER)
            assert chat.get(path + "/stream", who) == (404, UNKNOWN_ORDER)
    assert [m.content for m in chat.stored(order["id"])] == ["Private."]


def test_the_other_partys_orders_stay_private_to_a_party(api, chat):
    """A buyer of one order is a stranger to another order of the same agent."""
    agent, buyer, order = api.order_in("paid")
    service = api.service(agent)
    stranger = api.buyer()
    theirs = api.walk(agent, stranger, api.order(stranger, service), "paid")
    assert chat.get(f"/api/orders/{theirs['id']}/messages", buyer) == (404, UNKNOWN_ORDER)
    chat.say(theirs["id"], agent, "Hello other buyer")  # the agent is a party to both
    chat.say(order["id"], agent, "Hello first buyer")


def test_anonymous_and_bad_credentials_get_401(api, chat):
    agent, buyer, order = api.order_in("paid")
    path = f"/api/orders/{order['id']}/messages"
    wallet_token, _ = sign_session("wrong-secret", buyer.id, "solana", 3600)
    expired, _ = sign_session(chat.runtime.settings.session_secret, buyer.id, "solana", 60, now=time.time() - 3600)
    bad = {
        "anonymous": {},
        "unknown scheme": {"Authorization": f"Basic {buyer.token}"},
        "empty bearer": {"Authorization": "Bearer "},
        "garbage": {"Authorization": "Bearer garbage"},
        "session signed elsewhere": {"Authorization": f"Bearer {wallet_token}"},
        "expired session": {"Authorization": f"Bearer {expired}"},
        "mangled session": {"Authorization": f"Bearer {buyer.token[:-2]}"},
        "non-ascii session": {"Authorization": "Bearer ses.e30.\u00fc"},
        "unknown agent key": {"Authorization": "Bearer atl_" + "A" * 43},
        "malformed agent key": {"Authorization": "Bearer atl_x"},
        "wrong admin key": {"Authorization": "Bearer dev-admin-key-change-me-not"},
    }
    for name, headers in bad.items():
        for method, json_body in (("GET", None), ("POST", {"content": "hi"})):
            status, body = chat.call(method, path, json=json_body, headers=headers)
            assert_error(status, body, 401, "unauthenticated")
        assert_error(*chat.call("GET", path + "/stream", headers=headers), 401, "unauthenticated")
    assert chat.stored(order["id"]) == []


def test_refused_credentials_count_against_the_address_and_end_in_429(make_messaging, frozen_window):
    """Guessing keys or tokens here is limited like any anonymous caller, as on the orders service."""
    chat = Chat(make_messaging(rate_limits=True, rate_limit_anonymous_per_minute=3))
    path = "/api/orders/ord_x/messages"
    for token in ("atl_" + "A" * 43, "ses.e30.bad", "not-an-admin-key"):
        assert_error(*chat.call("GET", path, headers={"Authorization": f"Bearer {token}"}), 401, "unauthenticated")
    assert_error(*chat.call("GET", path, headers={"Authorization": "Bearer atl_" + "B" * 43}), 429, "rate_limited")
    assert_error(*chat.call("GET", path), 429, "rate_limited")


def test_admins_read_any_conversation_without_marking_it_read_but_cannot_post(api, chat):
    agent, buyer, order = api.order_in("paid")
    chat.say(order["id"], buyer, "Admin may read this.")
    page = chat.messages(order["id"], ADMIN)
    assert [m["content"] for m in page["items"]] == ["Admin may read this."]
    assert page["items"][0]["read_at"] is None and page["unread_count"] == 0
    assert_error(*chat.post(f"/api/orders/{order['id']}/messages", ADMIN, json={"content": "Hi"}), 403, "forbidden")
    assert chat.messages(order["id"], agent)["unread_count"] == 0  # the agent's read was the first
    assert chat.messages(order["id"], buyer)["items"][0]["read_at"] is not None
    assert_error(*chat.get(f"/api/orders/{unknown_id()}/messages", ADMIN), 404, "not_found")


def test_the_orders_internal_agent_lookup_needs_the_service_credential(api, app):
    agent = api.agent("Lookup")
    token = app.config["SETTINGS"].service_token
    status, body = api.get("/internal/agents/by-key", headers={"X-Service-Token": token, "X-Agent-Key": agent.token})
    assert (status, body["data"]) == (200, {"id": agent.id})
    for headers in ({"X-Service-Token": token, "X-Agent-Key": "atl_" + "B" * 43},
                    {"X-Service-Token": token},
                    {"X-Service-Token": token, "X-Agent-Key": "nope"},
                    {"X-Agent-Key": agent.token},
                    {"X-Service-Token": "wrong", "X-Agent-Key": agent.token},
                    {"Authorization": f"Bearer {agent.token}", "X-Agent-Key": agent.token}):
        assert_error(*api.get("/internal/agents/by-key", headers=headers), 404, "not_found")


# --- pages ---------------------------------------------------------------------------------------

def test_pages_default_to_50_and_hold_at_most_100(api, chat):
    agent, buyer, order = api.order_in("paid")
    seed(chat, order["id"], buyer, agent, 120)
    first = chat.messages(order["id"], ADMIN)
    assert len(first["items"]) == 50 and first["next_cursor"]
    rest = chat.messages(order["id"], ADMIN, limit=100, after=first["next_cursor"])
    assert len(rest["items"]) == 70
    assert [m["content"] for m in first["items"] + rest["items"]] == [f"message {n}" for n in range(120)]
    assert len(chat.messages(order["id"], ADMIN, limit=100)["items"]) == 100


def test_a_cursor_keeps_working_for_newer_messages(api, chat):
    agent, buyer, order = api.order_in("paid")
    chat.say(order["id"], buyer, "one")
    page = chat.messages(order["id"], agent)
    assert chat.messages(order["id"], agent, after=page["next_cursor"])["items"] == []
    chat.say(order["id"], buyer, "two")
    newer = chat.messages(order["id"], agent, after=page["next_cursor"])
    assert [m["content"] for m in newer["items"]] == ["two"] and newer["unread_count"] == 0


def seed(chat: Chat, order_id: str, buyer: Party, agent: Party, n: int) -> None:
    """n messages, alternating sender, straight through the domain (as posting would store them)."""
    from services.messaging import services
    runtime = chat.runtime
    with runtime.db.transaction() as session:
        for i in range(n):
            who, kind = (buyer, "client") if i % 2 == 0 else (agent, "agent")
            services.post_message(session, runtime.outbox, order_id, kind, who.id, f"message {i}")
    runtime.outbox.sweep(older_than_seconds=-60)  # publish the seeded events now


def test_walking_1000_messages_while_new_ones_arrive_has_no_gap_and_no_repeat(api, chat, messaging):
    agent, buyer, order = api.order_in("paid")
    oid = order["id"]
    seed(chat, oid, buyer, agent, 1000)
    failures = []

    def post_as(who: Party, n: int):
        client = Chat(messaging)  # a client of its own per thread
        for i in range(n):
            status, body = client.post(f"/api/orders/{oid}/messages", who, json={"content": f"live {who.id} {i}"})
            if status != 201:
                failures.append((status, body))

    posters = [threading.Thread(target=post_as, args=(buyer, 60)), threading.Thread(target=post_as, args=(agent, 60))]
    for thread in posters:
        thread.start()
    seen, cursor, pages_while_posting = [], None, 0
    while True:
        finished_before = all(not t.is_alive() for t in posters)
        page = chat.messages(oid, buyer, limit=37, **({"after": cursor} if cursor else {}))
        seen += page["items"]
        pages_while_posting += not finished_before and all(t.is_alive() for t in posters)
        if page["next_cursor"]:
            cursor = page["next_cursor"]
        elif finished_before:
            break
    for thread in posters:
        thread.join()
    assert failures == []
    stored = chat.stored(oid)
    assert len(stored) == 1120
    assert [m["id"] for m in seen] == [m.id for m in stored]  # each once, in order, none missing
    assert pages_while_posting >= 3  # the walk and the posts overlapped
    assert chat.messages(oid, buyer)["unread_count"] == 0  # the walk read all of the agent's


# --- bad input -----------------------------------------------------------------------------------

def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


BAD_BODIES = {
    "content missing": ({}, "content"),
    "content null": ({"content": None}, "content"),
    "content a number": ({"content": 42}, "content"),
    "content a list": ({"content": ["hi"]}, "content"),
    "content an object": ({"content": {"text": "hi"}}, "content"),
    "content a bool": ({"content": True}, "content"),
    "content empty": ({"content": ""}, "content"),
    "content only white space": ({"content": " \n\t "}, "content"),
    "content 2001 characters": ({"content": "x" * 2001}, "content"),
    "content 2001 characters inside white space": ({"content": " " + "x" * 2001 + " "}, "content"),
    "white space beyond what is kept": ({"content": "x" + " " * 4000}, "content"),
    "unknown field": ({"content": "hi", "sender_id": "agt_x"}, "sender_id"),
    "a list body": (["hi"], None),
    "a string body": ("hi", None),
    "a number body": (5, None),
}


@pytest.mark.parametrize("case", list(BAD_BODIES))
def test_bad_bodies_are_400_naming_the_field_and_store_nothing(api, chat, case):
    agent, buyer, order = api.order_in("paid")
    body, field = BAD_BODIES[case]
    status, reply = chat.call("POST", f"/api/orders/{order['id']}/messages", buyer, json=body)
    assert_error(status, reply, 400, "validation_error")
    if field:
        assert field in reply["details"]["fields"], reply
    assert chat.stored(order["id"]) == []


def test_malformed_and_oversize_bodies_are_refused_in_the_envelope(api, chat):
    agent, buyer, order = api.order_in("paid")
    path = f"/api/orders/{order['id']}/messages"
    json_type = {"Content-Type": "application/json"}
    for raw in (b"{", b'{"content": "hi",}', b"\xff\xfe", b"[" * 100_000 + b"]" * 100_000,
                b'{"content": "a\\u0000b"}', b'{"content": "\\ud800"}'):
        assert_error(*chat.call("POST", path, buyer, data=raw, headers=json_type), 400, "validation_error")
    assert_error(*chat.call("POST", path, buyer, data=b"content=hi",
                            headers={"Content-Type": "application/x-www-form-urlencoded"}), 415,
                 "unsupported_media_type")
    big = json.dumps({"content": "x" * (1024 * 1024 + 1)}).encode()
    assert_error(*chat.call("POST", path, buyer, data=big, headers=json_type), 413, "too_large")
    assert chat.stored(order["id"]) == []


BAD_QUERIES = [
    ("limit=0", "limit"), ("limit=101", "limit"), ("limit=-1", "limit"), ("limit=ten", "limit"),
    ("limit=1.5", "limit"), ("limit=", "limit"), ("after=!!!", "after"), ("after=" + "A" * 41, "after"),
    ("after=" + b64(b"not a cursor"), "after"), ("after=" + b64(b"m-1"), "after"), ("after=" + b64(b"m1.5"), "after"),
    ("after=" + b64(b"m" + b"9" * 19), "after"), ("after=" + b64(b"\xff\xfe"), "after"), ("after=%00", "after"),
    ("cursor=abc", "cursor"), ("status=paid", "status"),
]


@pytest.mark.parametrize("query,field", BAD_QUERIES, ids=[q for q, _ in BAD_QUERIES])
def test_bad_query_parameters_are_400_naming_the_parameter(api, chat, query, field):
    agent, buyer, order = api.order_in("paid")
    status, body = chat.get(f"/api/orders/{order['id']}/messages?{query}", buyer)
    assert_error(status, body, 400, "validation_error")
    assert field in body["details"]["fields"], body


JUNK_IDS = ["ord_x", "..%2Fetc", "ord_" + "a" * 21, "ord_" + "a" * 5000, "ORD_" + "a" * 20, "msg_" + "a" * 20,
            "ord_" + "\u00fc" * 20, "ord_%00" + "a" * 19, "%F0%9F%A6%8A"]


@pytest.mark.parametrize("junk", JUNK_IDS + ["unknown"])
def test_junk_and_unknown_order_ids_are_404(api, chat, junk):
    agent, buyer, order = api.order_in("paid")
    oid = unknown_id() if junk == "unknown" else junk
    for method, suffix, body in (("GET", "", None), ("POST", "", {"content": "hi"}), ("GET", "/stream", None)):
        for who in (buyer, agent, ADMIN):
            status, reply = chat.call(method, f"/api/orders/{oid}/messages{suffix}", who, json=body)
            assert_error(status, reply, 404, "not_found")


def test_bad_stream_positions_and_idempotency_keys_are_400(api, chat):
    agent, buyer, order = api.order_in("paid")
    path = f"/api/orders/{order['id']}/messages"
    for position in ("abc", "-1", "1.5", "9" * 30):
        assert_error(*chat.get(f"{path}/stream?last_event_id={position}", buyer), 400, "validation_error")
        assert_error(*chat.get(f"{path}/stream", buyer, headers={"Last-Event-ID": position}), 400,
                     "validation_error")
    assert_error(*chat.get(f"{path}/stream?since=1", buyer), 400, "validation_error")
    status, body = chat.post(path, buyer, json={"content": "hi"}, headers={"Idempotency-Key": "k" * 256})
    assert_error(status, body, 400, "validation_error")
    assert chat.stored(order["id"]) == []


FUZZ = hsettings(max_examples=60, deadline=None, database=None, phases=(Phase.explicit, Phase.generate),
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                       max_size=3), max_leaves=8)
bodies = st.one_of(json_values, st.fixed_dictionaries({"content": json_values}),
                   st.fixed_dictionaries({"content": st.text(max_size=2100)}),
                   st.fixed_dictionaries({"content": st.text(min_size=1, max_size=40)}, optional={"x": json_values}))
queries = st.dictionaries(st.sampled_from(["after", "limit", "cursor", "last_event_id"]),
                          st.text(max_size=30) | st.integers().map(str), max_size=3)


@FUZZ
@given(body=bodies, query=queries)
def test_fuzz_messages_never_5xx_and_answer_in_the_envelope(api, chat, body, query):
    if not hasattr(chat, "fuzz_order"):
        chat.fuzz_agent, chat.fuzz_buyer, chat.fuzz_order = api.order_in("paid")
    oid = chat.fuzz_order["id"]
    before = len(chat.stored(oid))
    status, reply = chat.call("POST", f"/api/orders/{oid}/messages", chat.fuzz_buyer, json=body)
    assert status in (201, 400) and isinstance(reply, dict) and reply["success"] is (status == 201), (body, reply)
    assert len(chat.stored(oid)) == before + (status == 201)
    status, reply = chat.call("GET", f"/api/orders/{oid}/messages", chat.fuzz_agent, query_string=query)
    assert status in (200, 400) and isinstance(reply, dict) and reply["success"] is (status == 200), (query, reply)
    if status == 400:
        assert reply["code"] == "validation_error" and reply["details"]["fields"], reply


# --- Idempotency-Key -----------------------------------------------------------------------------

def test_a_retried_post_with_its_idempotency_key_is_stored_once(api, chat):
    agent, buyer, order = api.order_in("paid")
    key = {"Idempotency-Key": "retry-" + secrets.token_hex(4)}
    first = chat.say(order["id"], buyer, "Only once, please.", headers=key)
    again = chat.say(order["id"], buyer, "Only once, please.", headers=key)
    assert again == first and chat.last.headers["Idempotent-Replayed"] == "true"
    assert_error(*chat.post(f"/api/orders/{order['id']}/messages", buyer, json={"content": "Other"}, headers=key),
                 409, "idempotency_conflict")
    chat.say(order["id"], agent, "Only once, please.", headers=key)  # keys are each sender's own
    assert [m.sender_type for m in chat.stored(order["id"])] == ["client", "agent"]


# --- the order.message event -----------------------------------------------------------------------

def _events(chat: Chat, order_id: str) -> list[OutboxEvent]:
    with chat.runtime.db.transaction() as session:
        return list(session.scalars(select(OutboxEvent).where(OutboxEvent.order_id == order_id)))


def _queued(redis_url: str, queue: str) -> list[dict]:
    """The events waiting in a queue for their consumers (other tasks, such as the relay's, left out)."""
    messages = [json.loads(raw) for raw in redis.Redis.from_url(redis_url).lrange(queue, 0, -1)]
    calls = [(json.loads(base64.b64decode(m["body"]))[0], m["headers"]["task"]) for m in messages]
    return [args[0] | {"task": task} for args, task in calls if args and isinstance(args[0], dict)]


def test_every_message_becomes_an_order_message_event_for_webhooks_and_notifications(api, chat, redis_url):
    agent, buyer, order = api.order_in("paid")
    sent = chat.say(order["id"], buyer, "Please hurry.")
    answer = chat.say(order["id"], agent, "On it.")
    events = {e.data["sender_type"]: e for e in _events(chat, order["id"])}
    assert [e.event for e in events.values()] == ["order.message"] * 2
    assert all(e.published_at is not None for e in events.values())  # relayed right after commit
    # the buyer's message goes to the agent's webhooks, the agent's to the buyer's notifications
    [to_agent] = [m for m in _queued(redis_url, "webhooks") if m["event"] == "order.message"]
    [to_buyer] = [m for m in _queued(redis_url, "default") if m["event"] == "order.message"]
    assert (to_agent["task"], to_agent["id"]) == ("webhooks.deliver_event", events["client"].id)
    assert (to_buyer["task"], to_buyer["id"]) == ("orders.notify_buyer", events["agent"].id)
    assert to_agent["order_id"] == order["id"] and to_agent["sequence"] == 0  # the orders service numbers it
    assert to_agent["data"] == {"order_id": order["id"], "message_id": sent["id"], "sender_type": "client",
                                "sender_id": buyer.id, "content": "Please hurry.", "created_at": sent["created_at"]}
    assert to_buyer["data"]["message_id"] == answer["id"] and to_buyer["data"]["sender_id"] == agent.id


def test_an_event_the_after_commit_relay_missed_is_relayed_by_the_sweeper(api, chat, redis_url, monkeypatch):
    agent, buyer, order = api.order_in("paid")
    monkeypatch.setattr(chat.runtime.outbox, "_hand_off", lambda ids: None)  # as if the process died there
    chat.say(order["id"], buyer, "Lost hand-off.")
    assert wait_for(lambda: all(e.published_at for e in _events(chat, order["id"])), timeout=10)
    assert [m["data"]["content"] for m in _queued(redis_url, "webhooks") if m["event"] == "order.message"] == \
        ["Lost hand-off."]


def test_a_refused_post_makes_no_event_and_no_message(api, chat):
    agent, buyer, order = api.order_in("quoted")
    chat.say(order["id"], buyer, "Too early", expect=409)
    assert _events(chat, order["id"]) == [] and chat.stored(order["id"]) == []


# --- rate limit --------------------------------------------------------------------------------

def test_each_sender_may_post_the_hourly_limit_then_gets_429(api, make_messaging):
    chat = Chat(make_messaging(rate_limits=True, message_rate_limit_per_hour=3))
    agent, buyer, order = api.order_in("paid")
    remaining = []
    for n in range(3):
        chat.say(order["id"], buyer, f"post {n}")
        remaining.append(chat.last.headers["X-RateLimit-Remaining"])
    assert remaining == ["2", "1", "0"] and chat.last.headers["X-RateLimit-Limit"] == "3"
    status, body = chat.post(f"/api/orders/{order['id']}/messages", buyer, json={"content": "one too many"})
    assert_error(status, body, 429, "rate_limited")
    assert 0 < int(chat.last.headers["Retry-After"]) <= 3600
    assert chat.last.headers["X-RateLimit-Remaining"] == "0"
    chat.say(order["id"], agent, "The agent has its own budget.")
    assert chat.messages(order["id"], buyer)["unread_count"] == 0  # reading is not limited by it
    assert len(chat.stored(order["id"])) == 4


def test_rate_limits_off_lets_every_post_through(api, make_messaging):
    chat = Chat(make_messaging(rate_limits=False, message_rate_limit_per_hour=1))
    agent, buyer, order = api.order_in("paid")
    for n in range(3):
        chat.say(order["id"], buyer, f"post {n}")
    assert "X-RateLimit-Limit" not in chat.last.headers


# --- the orders service stopped ------------------------------------------------------------------

def test_with_the_orders_service_stopped_history_stays_readable_and_posts_get_503(api, orders, make_messaging):
    chat = Chat(make_messaging(messaging_access_ttl_seconds=1))
    agent, buyer, order = api.order_in("paid")
    never_seen = api.order_in("paid")[2]
    chat.say(order["id"], buyer, "Before the outage.")
    chat.messages(order["id"], agent)  # the agent's key and the order's access are known now
    new_agent = api.agent("Not seen by messaging yet")
    orders.close()
    time.sleep(1.1)  # the kept copy is stale now: only reads may use it
    for who in (buyer, agent):
        page = chat.messages(order["id"], who)
        assert [m["content"] for m in page["items"]] == ["Before the outage."]
        status, body = chat.post(f"/api/orders/{order['id']}/messages", who, json={"content": "During it."})
        assert_error(status, body, 503, "service_unavailable")
    status, body = chat.get(f"/api/orders/{never_seen['id']}/messages", buyer)
    assert_error(status, body, 503, "service_unavailable")
    assert_error(*chat.get(f"/api/orders/{order['id']}/messages", new_agent), 503, "service_unavailable")
    assert [m.content for m in chat.stored(order["id"])] == ["Before the outage."]


# --- the published API ---------------------------------------------------------------------------

def test_the_openapi_document_describes_the_message_routes(chat):
    doc = chat.client.get("/api/openapi.json").get_json()
    paths = doc["paths"]
    assert {"get", "post"} <= set(paths["/api/orders/{order_id}/messages"])
    assert "get" in paths["/api/orders/{order_id}/messages/stream"]
    assert "text/event-stream" in paths["/api/orders/{order_id}/messages/stream"]["get"]["responses"]["200"]["content"]
