"""Bad input, everywhere (DESIGN.md §4-§5): every refusal is a 4xx in the envelope
`{"success": false, "error": str, "code": str, "details": dict}`, a validation error names the field
in `details.fields`, unknown ids are 404 `not_found`, no request produces a 5xx, and a refused
request changes nothing.

One app and one cast of actors per module; orders are reused across cases while they stay
untouched (every case checks that they did) and replaced as soon as one changed.
"""
from __future__ import annotations

import base64
import json
import re
import secrets
import string
from urllib.parse import urlencode

import pytest
from hypothesis import HealthCheck, Phase, given, settings as hsettings, strategies as st
from sqlalchemy import inspect, select, text

from services.orders import notifications, workspaces
from services.orders.models import Notification, OutboxEvent
from tests.support.api import ADMIN, ApiClient
from tests.support.wallets import SolanaWallet

ENVELOPE_KEYS = {"success", "error", "code", "details"}
CODE_OF = {400: "validation_error", 404: "not_found", 405: "method_not_allowed", 413: "too_large",
           415: "unsupported_media_type"}
ONE_MB = 1024 * 1024
DROP = object()  # in a case's changes: remove this field from the valid body
_ALNUM = string.ascii_letters + string.digits


def unknown_id(prefix: str) -> str:
    return prefix + "_" + "".join(secrets.choice(_ALNUM) for _ in range(20))


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


# --- the world -----------------------------------------------------------------------------------

class World:
    # state → (the service ordered, the steps after placing the order, the status it ends in)
    STATES = {
        "pending_quote": ("quote",  [],                                 "pending_quote"),
        "quoted":        ("fixed",  [],                                 "quoted"),
        "paid":          ("fixed",  ["pay"],                            "paid"),
        "delivered":     ("fixed",  ["pay", "deliver"],                 "delivered"),
        "completed":     ("fixed",  ["pay", "deliver", "approve"],      "completed"),
        "disputed":      ("fixed",  ["pay", "deliver", "dispute"],      "disputed"),
        # paying a weekly order opens its workspace
        "workspace":     ("weekly", ["pay"],                            "in_progress"),
        # ... with a pending generation the agent was told about (what the workspaces worker does)
        "generation":    ("weekly", ["pay", "generate", "dispatch"],    "in_progress"),
        # its buyer has an unread notification about it (what the default worker does with the event)
        "notified":      ("quote",  ["quote", "notify"],                "quoted"),
    }

    def __init__(self, app):
        self.app = app
        self.api = ApiClient(app)
        self.settings = app.config["SETTINGS"]
        self.agent = self.api.agent("Input Agent")
        self.quote_service = self.api.service(self.agent, "quote")
        self.fixed_service = self.api.service(self.agent, "fixed")
        self.weekly_service = self.api.service(self.agent, "weekly", quota_limit=50)
        self.buyer = self.api.buyer()
        self.headers = {"buyer": self.buyer.headers, "agent": self.agent.headers, "admin": ADMIN.headers,
                        "anonymous": {}, "service": {"X-Service-Token": self.settings.service_token}}
        self._orders: dict[str, dict] = {}
        self._ids: dict[str, dict] = {}  # order id → the ids of what a state made on it: gid, nid

    def order(self, state: str) -> dict:
        """An order in `state`, reused while no request has changed it."""
        if state not in self._orders:
            self._orders[state] = self.fresh_order(state)
        return self._orders[state]

    def forget(self, state: str | None) -> None:
        self._orders.pop(state, None)

    def fresh_order(self, state: str) -> dict:
        api, buyer, agent = self.api, self.buyer, self.agent
        service, steps, status = self.STATES[state]
        order = api.order(buyer, {"quote": self.quote_service, "fixed": self.fixed_service,
                                  "weekly": self.weekly_service}[service])
        oid = order["id"]
        ids = self._ids.setdefault(oid, {})
        db, rt = self.app.extensions["db"], self.app.extensions["orders_runtime"]
        for step in steps:
            if step == "pay":
                api.pay(buyer, oid)
            elif step == "deliver":
                api.deliver(agent, oid)
            elif step == "quote":
                api.ok("POST", f"/api/orders/{oid}/quote", agent, json={"price_usd": "45.00"})
            elif step == "generate":
                ids["gid"] = api.ok("POST", f"/api/orders/{oid}/generate", buyer, json={"prompt": "A fox in the snow."},
                                    expect=202)["generation"]["id"]
            elif step == "dispatch":
                with db.transaction() as session:
                    assert workspaces.dispatch(session, rt, ids["gid"])
            elif step == "notify":
                with db.transaction() as session:
                    for event in session.scalars(select(OutboxEvent).where(OutboxEvent.order_id == oid)):
                        notifications.record(session, event.message())
                    ids["nid"] = session.scalar(select(Notification.id).where(Notification.order_id == oid))
                assert ids["nid"] is not None
            else:
                api.ok("PATCH", f"/api/orders/{oid}", buyer, json={"action": step})
        order = api.ok("GET", f"/api/orders/{oid}", ADMIN)
        assert order["status"] == status
        return order

    def fill(self, template: str, order: dict | None) -> str:
        """The path with its {oid}, {gid}, {nid} (of `order`), {aid} and {sid} filled in."""
        ids = self._ids.get(order["id"], {}) if order else {}
        return template.format(oid=order["id"] if order else "", aid=self.agent.id, sid=self.fixed_service["id"],
                               **ids)

    def call(self, method, path, caller="anonymous", *, json_body=None, data=None, content_type=None,
             headers=None):
        all_headers = {**self.headers[caller], **(headers or {})}
        kw = {"data": data, "content_type": content_type} if data is not None else {"json": json_body}
        response = self.api.client.open(path, method=method, headers=all_headers, **kw)
        self.api.last = response
        return response.status_code, response.get_json(silent=True)

    def snapshot(self, order: dict | None = None) -> dict:
        engine = self.app.extensions["db"].engine
        with engine.connect() as conn:
            tables = sorted(t for t in inspect(conn).get_table_names() if t != "alembic_version")
            counts = {t: conn.execute(text(f"SELECT count(*) FROM {t}")).scalar() for t in tables}
        # what row counts miss: the agent's profile, the buyer's notifications being read, the
        # order, and its generations' answers
        snap = {"counts": counts, "agent": self.api.ok("GET", "/api/agents/me", self.agent),
                "notifications": self.api.ok("GET", "/api/notifications?limit=100", self.buyer)}
        if order is not None:
            snap["order"] = self.api.ok("GET", f"/api/orders/{order['id']}", ADMIN)
            if snap["order"]["workspace"] is not None:
                snap["generations"] = self.api.ok("GET", f"/api/orders/{order['id']}/generations?limit=100", ADMIN)
        return snap


@pytest.fixture(scope="module")
def world(module_app):
    return World(module_app)


def assert_refused(status, body, statuses, field=None, context=""):
    """A 4xx in the envelope, with the stable code of its status and, if given, the field named."""
    statuses = (statuses,) if isinstance(statuses, int) else tuple(statuses)
    assert status < 500, (context, "server error", status, body)
    assert status in statuses, (context, status, body)
    assert isinstance(body, dict) and set(body) == ENVELOPE_KEYS, (context, "not the error envelope", status, body)
    assert body["success"] is False and isinstance(body["error"], str) and body["error"], (context, body)
    assert isinstance(body["code"], str) and body["code"] == CODE_OF[status], (context, body)
    assert isinstance(body["details"], dict), (context, body)
    if field is not None:
        fields = body["details"].get("fields")
        assert isinstance(fields, dict) and field in fields, (context, f"details.fields should name {field!r}", body)


def run_refused(world, state, method, path, caller, statuses, field=None, context="", **request):
    """Send one bad request; it must be refused properly and leave everything as it was."""
    order = world.order(state) if state else None
    path = world.fill(path, order)
    before = world.snapshot(order)
    status, body = world.call(method, path, caller, **request)
    after = world.snapshot(order)
    if after != before:
        world.forget(state)
    assert_refused(status, body, statuses, field, context)
    assert after == before, (context, "a refused request changed something")


# --- the endpoints that take a body, each with a valid body --------------------------------------

def _session_body(world):
    wallet = SolanaWallet.generate()
    challenge = world.api.ok("POST", "/api/auth/challenge", json={"wallet": wallet.address, "chain": "solana"})
    return {"wallet": wallet.address, "chain": "solana", "nonce": challenge["nonce"],
            "signature": wallet.sign(challenge["message"])}


BODY_ENDPOINTS = {
    # name             method   path                                    state          caller       valid body
    "create order":   ("POST",  "/api/orders",                          None,           "buyer",     lambda w, o: {"service_id": w.fixed_service["id"], "brief": "Please draw a red fox."}),
    "accept":         ("PATCH", "/api/orders/{oid}",                    "quoted",       "buyer",     lambda w, o: {"action": "accept"}),
    "pay":            ("PATCH", "/api/orders/{oid}",                    "quoted",       "buyer",     lambda w, o: {"action": "pay", "escrow_tx_hash": w.api.transfer(w.buyer, o["id"])}),
    "revision":       ("PATCH", "/api/orders/{oid}",                    "delivered",    "buyer",     lambda w, o: {"action": "revision", "feedback": "More red, please."}),
    "dispute":        ("PATCH", "/api/orders/{oid}",                    "delivered",    "buyer",     lambda w, o: {"action": "dispute", "reason": "It is a dog."}),
    "quote":          ("POST",  "/api/orders/{oid}/quote",              "pending_quote", "agent",    lambda w, o: {"price_usd": "120.50"}),
    "decline":        ("POST",  "/api/orders/{oid}/decline",            "quoted",       "agent",     lambda w, o: {"reason": "Too busy."}),
    "deliver":        ("POST",  "/api/orders/{oid}/deliver",            "paid",         "agent",     lambda w, o: {"deliverables": [{"url": "https://example.com/fox", "media_type": "link"}]}),
    "review":         ("POST",  "/api/orders/{oid}/review",             "completed",    "buyer",     lambda w, o: {"rating": 5, "comment": "Lovely."}),
    "resolve":        ("POST",  "/api/admin/orders/{oid}/resolve",      "disputed",     "admin",     lambda w, o: {"outcome": "split", "agent_amount_usd": "20.00", "note": "Half done."}),
    "create service": ("POST",  "/api/services",                        None,           "agent",     lambda w, o: {"title": "Logo", "description": "A logo.", "price_type": "fixed", "price_usd": "30.00"}),
    "update agent":   ("PATCH", "/api/agents/me",                       None,           "agent",     lambda w, o: {"name": "Renamed Agent"}),
    "register agent": ("POST",  "/api/agents",                          None,           "anonymous", lambda w, o: {"name": "Newcomer"}),
    "transfer":       ("POST",  "/api/sandbox/transfers",               None,           "anonymous", lambda w, o: {"from_wallet": w.buyer.id, "to": w.settings.treasury_solana, "amount_usd": "45.00", "asset": "USDC", "chain": "solana"}),
    "challenge":      ("POST",  "/api/auth/challenge",                  None,           "anonymous", lambda w, o: {"wallet": SolanaWallet.generate().address, "chain": "solana"}),
    "session":        ("POST",  "/api/auth/session",                    None,           "anonymous", lambda w, o: _session_body(w)),
    "generate":       ("POST",  "/api/orders/{oid}/generate",           "workspace",    "buyer",     lambda w, o: {"prompt": "A fox in the snow."}),
    # the one route's two bodies: a result, a failure
    "answer generation": ("POST", "/api/orders/{oid}/generations/{gid}", "generation",  "agent",     lambda w, o: {"url": "https://example.com/fox", "media_type": "link", "title": "Fox"}),
    "fail generation": ("POST", "/api/orders/{oid}/generations/{gid}",  "generation",   "agent",     lambda w, o: {"status": "failed", "error": "The model is down."}),
    "mark notifications read": ("PATCH", "/api/notifications",          "notified",     "buyer",     lambda w, o: {"ids": [w.fill("{nid}", o)]}),
}


def _valid_body(world, name):
    method, path, state, caller, make = BODY_ENDPOINTS[name]
    order = world.order(state) if state else None
    return make(world, order)


@pytest.mark.parametrize("endpoint", list(BODY_ENDPOINTS))
def test_the_valid_bodies_are_accepted_and_seen_by_the_snapshot(world, endpoint):
    """So every refusal below is about what its case broke, and run_refused's before/after
    comparison would see the change had a refused request made it (the auth endpoints keep theirs
    in Redis)."""
    method, path, state, caller, _ = BODY_ENDPOINTS[endpoint]
    body = _valid_body(world, endpoint)
    order = world.order(state) if state else None
    before = world.snapshot(order)
    status, resp = world.call(method, world.fill(path, order), caller, json_body=body)
    world.forget(state)
    assert 200 <= status < 300 and resp["success"] is True, (endpoint, status, resp)
    if endpoint not in ("challenge", "session"):
        assert world.snapshot(order) != before, (endpoint, "the snapshot does not see what this endpoint changes")


# --- 1. a malformed body, on every endpoint that takes one ---------------------------------------

# name → (make raw request from the valid body, accepted statuses, field to be named)
RAW_BODIES = {
    "malformed JSON":           (lambda v: dict(data='{"brief": "a fox", ', content_type="application/json"), 400, None),
    "JSON with a trailing comma": (lambda v: dict(data='{"action": "accept",}', content_type="application/json"), 400, None),
    "single-quoted pseudo-JSON": (lambda v: dict(data="{'action': 'accept'}", content_type="application/json"), 400, None),
    "JSON array":               (lambda v: dict(json_body=[v]), 400, None),
    "JSON string":              (lambda v: dict(json_body="accept"), 400, None),
    "JSON number":              (lambda v: dict(json_body=42), 400, None),
    "JSON null":                (lambda v: dict(data="null", content_type="application/json"), 400, None),
    "JSON true":                (lambda v: dict(data="true", content_type="application/json"), 400, None),
    "invalid UTF-8":            (lambda v: dict(data=b'{"name": "\xff\xfe\xfa"}', content_type="application/json"), 400, None),
    "deeply nested JSON":       (lambda v: dict(data="[" * 100_000 + "]" * 100_000, content_type="application/json"), 400, None),
    "deeply nested field":      (lambda v: dict(data='{"brief": ' + "[" * 50_000 + "]" * 50_000 + "}", content_type="application/json"), 400, None),
    "JSON body as text/plain":  (lambda v: dict(data=json.dumps(v), content_type="text/plain"), (415, 400), None),
    "JSON body, no Content-Type": (lambda v: dict(data=json.dumps(v), content_type=None), (415, 400), None),
    "form-encoded body":        (lambda v: dict(data=urlencode({k: str(x) for k, x in v.items()}), content_type="application/x-www-form-urlencoded"), (415, 400), None),
    "XML body":                 (lambda v: dict(data="<order><brief>fox</brief></order>", content_type="application/xml"), (415, 400), None),
    "unknown field":            (lambda v: dict(json_body={**v, "zzz_unknown": 1}), 400, "zzz_unknown"),
    "body over 1 MB":           (lambda v: dict(json_body={**v, "padding": "a" * (ONE_MB + 1)}), 413, None),
    "body over 1 MB, not JSON": (lambda v: dict(data="a" * (ONE_MB + 1), content_type="application/json"), 413, None),
}

RAW_CASES = [(e, r) for e in BODY_ENDPOINTS for r in RAW_BODIES]


@pytest.mark.parametrize("endpoint,raw", RAW_CASES, ids=[f"{e} | {r}" for e, r in RAW_CASES])
def test_malformed_bodies_are_refused_in_the_envelope(world, endpoint, raw):
    method, path, state, caller, _ = BODY_ENDPOINTS[endpoint]
    build, statuses, field = RAW_BODIES[raw]
    request = build(_valid_body(world, endpoint))
    run_refused(world, state, method, path, caller, statuses, field, f"{endpoint}: {raw}", **request)


# --- 2. wrong fields, per endpoint ---------------------------------------------------------------

LONG_URL = "https://example.com/" + "a" * 2040

FIELD_CASES = [
    # endpoint          what is wrong                          changes to the valid body                                   field
    ("create order",   "brief 9 characters",                  {"brief": "x" * 9},                                         "brief"),
    ("create order",   "brief 3001 characters",               {"brief": "x" * 3001},                                      "brief"),
    ("create order",   "brief 10 chars of which 9 spaces",    {"brief": "x" + " " * 12},                                  "brief"),
    ("create order",   "brief a number",                      {"brief": 1234567890123},                                   "brief"),
    ("create order",   "brief a list",                        {"brief": ["Please draw a red fox."]},                      "brief"),
    ("create order",   "brief null",                          {"brief": None},                                            "brief"),
    ("create order",   "brief missing",                       {"brief": DROP},                                            "brief"),
    ("create order",   "service_id missing",                  {"service_id": DROP},                                       "service_id"),
    ("create order",   "service_id a number",                 {"service_id": 12345},                                      "service_id"),
    ("create order",   "service_id null",                     {"service_id": None},                                       "service_id"),
    ("create order",   "6 reference_urls",                    {"reference_urls": [f"https://example.com/{i}" for i in range(6)]}, "reference_urls"),
    ("create order",   "javascript: reference url",           {"reference_urls": ["javascript:alert(1)"]},                "reference_urls"),
    ("create order",   "ftp: reference url",                  {"reference_urls": ["ftp://example.com/fox.png"]},          "reference_urls"),
    ("create order",   "file: reference url",                 {"reference_urls": ["file:///etc/passwd"]},                 "reference_urls"),
    ("create order",   "data: reference url",                 {"reference_urls": ["data:text/html,<script>alert(1)</script>"]}, "reference_urls"),
    ("create order",   "reference url not a URL",             {"reference_urls": ["a red fox"]},                          "reference_urls"),
    ("create order",   "reference url over 2048 chars",       {"reference_urls": [LONG_URL]},                             "reference_urls"),
    ("create order",   "reference url a number",              {"reference_urls": [42]},                                   "reference_urls"),
    ("create order",   "reference_urls a string",             {"reference_urls": "https://example.com/fox"},              "reference_urls"),
    ("create order",   "reference_urls null",                 {"reference_urls": None},                                   "reference_urls"),
    ("create order",   "setting the status",                  {"status": "completed"},                                    "status"),
    ("create order",   "setting the price",                   {"quoted_price_usd": "0.01"},                               "quoted_price_usd"),
    ("create order",   "setting the buyer",                   {"client_wallet": "HyAdiZRk1pnBDdpFCXUeRZj1wr3xd7GYNa8Pt86jXDV4"}, "client_wallet"),
    ("accept",         "action missing",                      {"action": DROP},                                           "action"),
    ("accept",         "action unknown",                      {"action": "explode"},                                      "action"),
    ("accept",         "action in upper case",                {"action": "ACCEPT"},                                       "action"),
    ("accept",         "action an agent's (quote)",           {"action": "quote"},                                        "action"),
    ("accept",         "action a system one (auto_complete)", {"action": "auto_complete"},                                "action"),
    ("accept",         "action a number",                     {"action": 1},                                              "action"),
    ("accept",         "action null",                         {"action": None},                                           "action"),
    ("accept",         "action a list",                       {"action": ["accept"]},                                     "action"),
    ("accept",         "setting the status",                  {"status": "completed"},                                    "status"),
    ("accept",         "setting the price",                   {"price_usd": "0.01"},                                      "price_usd"),
    ("pay",            "escrow_tx_hash missing",              {"escrow_tx_hash": DROP},                                   "escrow_tx_hash"),
    ("pay",            "escrow_tx_hash empty",                {"escrow_tx_hash": ""},                                     "escrow_tx_hash"),
    ("pay",            "escrow_tx_hash 129 chars",            {"escrow_tx_hash": "a" * 129},                              "escrow_tx_hash"),
    ("pay",            "escrow_tx_hash a number",             {"escrow_tx_hash": 1234},                                   "escrow_tx_hash"),
    ("pay",            "escrow_tx_hash null",                 {"escrow_tx_hash": None},                                   "escrow_tx_hash"),
    ("revision",       "feedback missing",                    {"feedback": DROP},                                         "feedback"),
    ("revision",       "feedback empty",                      {"feedback": ""},                                           "feedback"),
    ("revision",       "feedback only spaces",                {"feedback": "    "},                                       "feedback"),
    ("revision",       "feedback 2001 characters",            {"feedback": "x" * 2001},                                   "feedback"),
    ("revision",       "feedback a number",                   {"feedback": 42},                                           "feedback"),
    ("revision",       "feedback an object",                  {"feedback": {"text": "more red"}},                         "feedback"),
    ("dispute",        "reason 2001 characters",              {"reason": "x" * 2001},                                     "reason"),
    ("dispute",        "reason a number",                     {"reason": 42},                                             "reason"),
    ("dispute",        "reason a list",                       {"reason": ["bad"]},                                        "reason"),
    ("quote",          "price_usd missing",                   {"price_usd": DROP},                                        "price_usd"),
    ("quote",          "unknown field amount",                {"amount": "10.00"},                                        "amount"),
    ("decline",        "reason 2001 characters",              {"reason": "x" * 2001},                                     "reason"),
    ("decline",        "reason a number",                     {"reason": 7},                                              "reason"),
    ("decline",        "asking for a refund flag",            {"refund": False},                                          "refund"),
    ("deliver",        "deliverables empty",                  {"deliverables": []},                                       "deliverables"),
    ("deliver",        "21 deliverables",                     {"deliverables": [{"url": f"https://example.com/{i}", "media_type": "link"} for i in range(21)]}, "deliverables"),
    ("deliver",        "deliverables a string",               {"deliverables": "https://example.com/fox"},                "deliverables"),
    ("deliver",        "deliverables missing",                {"deliverables": DROP},                                     "deliverables"),
    ("deliver",        "a deliverable without media_type",    {"deliverables": [{"url": "https://example.com/fox"}]},     "deliverables"),
    ("deliver",        "an unknown media_type",               {"deliverables": [{"url": "https://example.com/x", "media_type": "exe"}]}, "deliverables"),
    ("deliver",        "a javascript: url",                   {"deliverables": [{"url": "javascript:alert(1)", "media_type": "link"}]}, "deliverables"),
    ("deliver",        "an ftp: url",                         {"deliverables": [{"url": "ftp://example.com/fox.png", "media_type": "image"}]}, "deliverables"),
    ("deliver",        "a deliverable with url and upload_id", {"deliverables": [{"url": "https://example.com/x", "upload_id": "upl_1", "media_type": "link"}]}, "deliverables"),
    ("deliver",        "an unknown upload_id",                {"deliverables": [{"upload_id": "upl_doesnotexist", "media_type": "image"}]}, "deliverables"),
    ("deliver",        "a title of 201 characters",           {"deliverables": [{"url": "https://example.com/x", "media_type": "link", "title": "t" * 201}]}, "deliverables"),
    ("deliver",        "a deliverable that is a string",      {"deliverables": ["https://example.com/fox"]},              "deliverables"),
    ("deliver",        "single form with an ftp: url",        {"deliverables": DROP, "deliverable_url": "ftp://example.com/x", "deliverable_media_type": "link"}, "deliverables"),
    ("deliver",        "single form, bad media type",         {"deliverables": DROP, "deliverable_url": "https://example.com/x", "deliverable_media_type": "exe"}, "deliverables"),
    ("review",         "rating a string",                     {"rating": "5"},                                            "rating"),
    ("review",         "rating a float",                      {"rating": 5.0},                                            "rating"),
    ("review",         "rating 4.5",                          {"rating": 4.5},                                            "rating"),
    ("review",         "rating 0",                            {"rating": 0},                                              "rating"),
    ("review",         "rating 6",                            {"rating": 6},                                              "rating"),
    ("review",         "rating -1",                           {"rating": -1},                                             "rating"),
    ("review",         "rating true",                         {"rating": True},                                           "rating"),
    ("review",         "rating null",                         {"rating": None},                                           "rating"),
    ("review",         "rating missing",                      {"rating": DROP},                                           "rating"),
    ("review",         "rating huge",                         {"rating": 10 ** 30},                                       "rating"),
    ("review",         "comment 501 characters",              {"comment": "c" * 501},                                     "comment"),
    ("review",         "comment a number",                    {"comment": 5},                                             "comment"),
    ("resolve",        "note missing",                        {"note": DROP},                                             "note"),
    ("resolve",        "note empty",                          {"note": ""},                                               "note"),
    ("resolve",        "note only spaces",                    {"note": "   "},                                            "note"),
    ("resolve",        "note 2001 characters",                {"note": "n" * 2001},                                       "note"),
    ("resolve",        "outcome unknown",                     {"outcome": "steal"},                                       "outcome"),
    ("resolve",        "outcome missing",                     {"outcome": DROP},                                          "outcome"),
    ("resolve",        "split without agent_amount_usd",      {"agent_amount_usd": DROP},                                 "agent_amount_usd"),
    ("resolve",        "split giving the agent everything",   {"agent_amount_usd": "45.00"},                              "agent_amount_usd"),
    ("resolve",        "split giving the agent more",         {"agent_amount_usd": "45.01"},                              "agent_amount_usd"),
    ("resolve",        "split parts not adding up",           {"agent_amount_usd": "20.00", "buyer_amount_usd": "20.00"}, "buyer_amount_usd"),
    ("create service", "title empty",                         {"title": ""},                                              "title"),
    ("create service", "title only spaces",                   {"title": "    "},                                          "title"),
    ("create service", "title 201 characters",                {"title": "t" * 201},                                       "title"),
    ("create service", "title a number",                      {"title": 5},                                               "title"),
    ("create service", "description missing",                {"description": DROP},                                      "description"),
    ("create service", "description 5001 characters",         {"description": "d" * 5001},                                "description"),
    ("create service", "price_type unknown",                  {"price_type": "free"},                                     "price_type"),
    ("create service", "price_type upper case",               {"price_type": "FIXED"},                                    "price_type"),
    ("create service", "fixed without a price",               {"price_usd": DROP},                                        "price_usd"),
    ("create service", "turnaround_hours a string",           {"turnaround_hours": "48"},                                 "turnaround_hours"),
    ("create service", "turnaround_hours 0",                  {"turnaround_hours": 0},                                    "turnaround_hours"),
    ("create service", "turnaround_hours 8761",               {"turnaround_hours": 8761},                                 "turnaround_hours"),
    ("create service", "turnaround_hours 1.5",                {"turnaround_hours": 1.5},                                  "turnaround_hours"),
    ("create service", "turnaround_hours true",               {"turnaround_hours": True},                                 "turnaround_hours"),
    ("create service", "max_revisions 11",                    {"max_revisions": 11},                                      "max_revisions"),
    ("create service", "max_revisions -1",                    {"max_revisions": -1},                                      "max_revisions"),
    ("create service", "max_revisions a string",              {"max_revisions": "3"},                                     "max_revisions"),
    ("create service", "a quota on a fixed service",          {"quota_limit": 5},                                         "quota_limit"),
    ("create service", "quota_limit -1",                      {"price_type": "weekly", "quota_limit": -1},                "quota_limit"),
    ("create service", "quota_limit a string",                {"price_type": "weekly", "quota_limit": "5"},               "quota_limit"),
    ("create service", "setting the agent",                   {"agent_id": "agt_" + "a" * 20},                            "agent_id"),
    ("create service", "setting active",                      {"active": False},                                          "active"),
    ("update agent",   "nothing to change",                   {"name": DROP},                                             None),
    ("update agent",   "name empty",                          {"name": ""},                                               "name"),
    ("update agent",   "name only spaces",                    {"name": "   "},                                            "name"),
    ("update agent",   "name 101 characters",                 {"name": "n" * 101},                                        "name"),
    ("update agent",   "name a number",                       {"name": 7},                                                "name"),
    ("update agent",   "name null",                           {"name": None},                                             "name"),
    ("update agent",   "payout_wallet without chain",         {"payout_wallet": "HyAdiZRk1pnBDdpFCXUeRZj1wr3xd7GYNa8Pt86jXDV4"}, "payout_wallet"),
    ("update agent",   "payout_wallet not a wallet",          {"payout_wallet": "not-a-wallet", "payout_chain": "solana"}, "payout_wallet"),
    ("update agent",   "payout_wallet of the other chain",    {"payout_wallet": "0x" + "ab" * 20, "payout_chain": "solana"}, "payout_wallet"),
    ("update agent",   "payout_chain unknown",                {"payout_wallet": "0x" + "ab" * 20, "payout_chain": "ethereum"}, "payout_chain"),
    ("update agent",   "endpoint_url javascript:",            {"endpoint_url": "javascript:alert(1)"},                    "endpoint_url"),
    ("update agent",   "endpoint_url ftp:",                   {"endpoint_url": "ftp://example.com/hook"},                 "endpoint_url"),
    ("update agent",   "endpoint_url not a URL",              {"endpoint_url": "my server"},                              "endpoint_url"),
    ("update agent",   "setting the key hash",                {"api_key_hash": "0" * 64},                                 "api_key_hash"),
    ("update agent",   "setting the rating",                  {"review_count": 1000},                                     "review_count"),
    ("update agent",   "setting the id",                      {"id": "agt_" + "b" * 20},                                  "id"),
    ("register agent", "name missing",                        {"name": DROP},                                             "name"),
    ("register agent", "name 101 characters",                 {"name": "n" * 101},                                        "name"),
    ("register agent", "endpoint_url javascript:",            {"endpoint_url": "javascript:alert(1)"},                    "endpoint_url"),
    ("register agent", "payout_chain unknown",                {"payout_wallet": "0x" + "ab" * 20, "payout_chain": "eth"}, "payout_chain"),
    ("register agent", "choosing the api key",                {"api_key": "atl_mine"},                                    "api_key"),
    ("transfer",       "chain unknown",                       {"chain": "eth"},                                           "chain"),
    ("transfer",       "from_wallet not a wallet",            {"from_wallet": "not-a-wallet"},                            "from_wallet"),
    ("transfer",       "to missing",                          {"to": DROP},                                               "to"),
    ("transfer",       "to empty",                            {"to": ""},                                                 "to"),
    ("transfer",       "asset empty",                         {"asset": ""},                                              "asset"),
    ("transfer",       "asset 17 characters",                 {"asset": "U" * 17},                                        "asset"),
    ("challenge",      "wallet not a wallet",                 {"wallet": "not-a-wallet"},                                 "wallet"),
    ("challenge",      "wallet 65 characters",                {"wallet": "1" * 65},                                       "wallet"),
    ("challenge",      "chain unknown",                       {"chain": "ethereum"},                                      "chain"),
    ("challenge",      "chain missing",                       {"chain": DROP},                                            "chain"),
    ("session",        "signature empty",                     {"signature": ""},                                          "signature"),
    ("session",        "signature 201 characters",            {"signature": "s" * 201},                                   "signature"),
    ("session",        "nonce missing",                       {"nonce": DROP},                                            "nonce"),
    ("mark notifications read", "ids empty",                  {"ids": []},                                                "ids"),
    ("mark notifications read", "101 ids",                    {"ids": [unknown_id("ntf") for _ in range(101)]},           "ids"),
    ("mark notifications read", "ids a string",               {"ids": "all"},                                             "ids"),
    ("mark notifications read", "ids null",                   {"ids": None},                                              "ids"),
    ("mark notifications read", "an id a number",             {"ids": [42]},                                              "ids"),
    ("mark notifications read", "an id empty",                {"ids": [""]},                                              "ids"),
    ("mark notifications read", "an id of 33 characters",     {"ids": ["n" * 33]},                                        "ids"),
    ("mark notifications read", "setting read_at",            {"read_at": "2020-01-01T00:00:00Z"},                        "read_at"),
]

# Amounts: every money field refuses anything but a string of at most 2 decimals in (0, 1000000.00].
BAD_AMOUNTS = {
    "float 45.0": 45.0, "integer 45": 45, "zero": "0", "zero cents": "0.00", "negative": "-1.00",
    "minus one cent": "-0.01", "3 decimals": "45.001", "1000000.01": "1000000.01", "8 digits": "10000000",
    "1e3": "1e3", "1E3": "1E3", "empty": "", "words": "forty-five", "leading space": " 45.00",
    "trailing space": "45.00 ", "trailing newline": "45.00\n", "comma decimal": "45,00", "plus sign": "+45.00",
    "hex": "0x2D", "NaN": "NaN", "Infinity": "Infinity", "trailing dot": "45.", "leading dot": ".50",
    "thousands separator": "1,000.00", "arabic-indic digits": "\u0664\u0665.\u0660\u0660",
    "fullwidth digits": "\uff14\uff15.\uff10\uff10", "null": None, "true": True, "list": ["45.00"],
    "object": {"usd": "45.00"},
}
AMOUNT_FIELDS = {"quote": "price_usd", "create service": "price_usd", "transfer": "amount_usd",
                 "resolve": "agent_amount_usd"}
FIELD_CASES += [(endpoint, f"{field} {label}", {field: value}, field)
                for endpoint, field in AMOUNT_FIELDS.items() for label, value in BAD_AMOUNTS.items()]


@pytest.mark.parametrize("endpoint,what,changes,field", FIELD_CASES,
                         ids=[f"{c[0]} | {c[1]}" for c in FIELD_CASES])
def test_wrong_fields_are_400_naming_the_field(world, endpoint, what, changes, field):
    method, path, state, caller, _ = BODY_ENDPOINTS[endpoint]
    body = {**_valid_body(world, endpoint), **changes}
    body = {k: v for k, v in body.items() if v is not DROP}
    run_refused(world, state, method, path, caller, 400, field, f"{endpoint}: {what}", json_body=body)


def test_boundary_amounts_and_lengths_are_accepted(world):
    """The edges of the rules are inside them (so the refusals above are about the input)."""
    api = world.api
    for price in ("0.01", "1000000.00", "45"):
        order = world.fresh_order("pending_quote")
        assert api.ok("POST", f"/api/orders/{order['id']}/quote", world.agent, json={"price_usd": price})["status"] == "quoted"
    created = api.ok("POST", "/api/orders", world.buyer, json={
        "service_id": world.fixed_service["id"], "brief": "b" * 3000,
        "reference_urls": [f"https://example.com/{i}" for i in range(5)]})
    assert len(created["brief"]) == 3000 and len(created["reference_urls"]) == 5
    assert api.ok("POST", "/api/orders", world.buyer, json={"service_id": world.fixed_service["id"],
                                                            "brief": "b" * 10})["brief"] == "b" * 10


# --- 3. query strings ----------------------------------------------------------------------------

QUERY_CASES = [
    # path                                                         caller     field
    ("/api/orders?limit=0",                                         "buyer",   "limit"),
    ("/api/orders?limit=101",                                       "buyer",   "limit"),
    ("/api/orders?limit=-1",                                        "buyer",   "limit"),
    ("/api/orders?limit=ten",                                       "buyer",   "limit"),
    ("/api/orders?limit=1.5",                                       "buyer",   "limit"),
    ("/api/orders?status=shipped",                                  "buyer",   "status"),
    ("/api/orders?status=",                                         "buyer",   "status"),
    ("/api/orders?status=,,",                                       "buyer",   "status"),
    ("/api/orders?status=paid,shipped",                             "buyer",   "status"),
    ("/api/orders?status=PAID",                                     "buyer",   "status"),
    ("/api/orders?status=" + "paid," * 80,                          "buyer",   "status"),
    ("/api/orders?cursor=!!!",                                      "buyer",   "cursor"),
    ("/api/orders?cursor=" + "A" * 201,                             "buyer",   "cursor"),
    ("/api/orders?cursor=" + b64(b"not json"),                      "buyer",   "cursor"),
    ("/api/orders?cursor=" + b64(b'["2024-01-01T00:00:00Z"]'),      "buyer",   "cursor"),
    ("/api/orders?cursor=" + b64(b'{"a": 1, "b": 2}'),              "buyer",   "cursor"),
    ("/api/orders?cursor=" + b64(b"[1, 2]"),                        "buyer",   "cursor"),
    ("/api/orders?cursor=" + b64(b"[null, null]"),                  "buyer",   "cursor"),
    ("/api/orders?cursor=" + b64(b'[[], "ord_x"]'),                 "buyer",   "cursor"),
    ("/api/orders?cursor=" + b64(b'["yesterday", "ord_x"]'),        "buyer",   "cursor"),
    ("/api/orders?cursor=" + b64(b"\xff\xfe\xfd"),                  "buyer",   "cursor"),
    ("/api/services?limit=0",                                       "anonymous", "limit"),
    ("/api/services?limit=1000",                                    "anonymous", "limit"),
    ("/api/services?agent_id=" + "a" * 33,                          "anonymous", "agent_id"),
    ("/api/services?cursor=" + b64(b"[1, 2]"),                      "anonymous", "cursor"),
    ("/api/services?cursor=" + b64(b'["yesterday", "svc_x"]'),      "anonymous", "cursor"),
    ("/api/agents/{aid}/orders?status=shipped",                     "agent",   "status"),
    ("/api/agents/{aid}/orders?limit=0",                            "agent",   "limit"),
    ("/api/agents/{aid}/orders?cursor=" + b64(b"[1, 2]"),           "agent",   "cursor"),
    ("/api/agents/{aid}/orders?cursor=!!!",                         "agent",   "cursor"),
    # {oid}: the buyer's own weekly order, with its workspace
    ("/api/orders/{oid}/generations?limit=0",                       "buyer",   "limit"),
    ("/api/orders/{oid}/generations?limit=101",                     "buyer",   "limit"),
    ("/api/orders/{oid}/generations?limit=ten",                     "buyer",   "limit"),
    ("/api/orders/{oid}/generations?status=in_progress",            "buyer",   "status"),  # an order's, not a generation's
    ("/api/orders/{oid}/generations?status=pending,nope",           "buyer",   "status"),
    ("/api/orders/{oid}/generations?status=",                       "buyer",   "status"),
    ("/api/orders/{oid}/generations?cursor=!!!",                    "buyer",   "cursor"),
    ("/api/orders/{oid}/generations?cursor=" + b64(b'["yesterday", "gen_x"]'), "buyer", "cursor"),
    ("/api/agents/{aid}/generations?limit=0",                       "agent",   "limit"),
    ("/api/agents/{aid}/generations?limit=101",                     "agent",   "limit"),
    ("/api/agents/{aid}/generations?limit=ten",                     "agent",   "limit"),
    ("/api/agents/{aid}/generations?status=delivered",              "agent",   "status"),
    ("/api/agents/{aid}/generations?status=PENDING",                "agent",   "status"),
    ("/api/agents/{aid}/generations?cursor=!!!",                    "agent",   "cursor"),
    ("/api/agents/{aid}/generations?cursor=" + b64(b"[1, 2]"),      "admin",   "cursor"),
    ("/api/agents/me/webhook-deliveries?limit=0",                   "agent",   "limit"),
    ("/api/agents/me/webhook-deliveries?limit=101",                 "agent",   "limit"),
    ("/api/agents/me/webhook-deliveries?limit=ten",                 "agent",   "limit"),
    ("/api/agents/me/webhook-deliveries?status=sent",               "agent",   "status"),
    ("/api/agents/me/webhook-deliveries?status=,",                  "agent",   "status"),
    ("/api/agents/me/webhook-deliveries?cursor=!!!",                "agent",   "cursor"),
    ("/api/agents/me/webhook-deliveries?cursor=" + b64(b'["yesterday", "whd_x"]'), "agent", "cursor"),
    # the event feed pages by position (`after`), up to 1000 at a time
    ("/api/agents/me/events?limit=0",                               "agent",   "limit"),
    ("/api/agents/me/events?limit=1001",                            "agent",   "limit"),
    ("/api/agents/me/events?limit=ten",                             "agent",   "limit"),
    ("/api/agents/me/events?after=-1",                              "agent",   "after"),
    ("/api/agents/me/events?after=ten",                             "agent",   "after"),
    ("/api/agents/me/events?after=1.5",                             "agent",   "after"),
    ("/api/agents/me/events?after=",                                "agent",   "after"),
    ("/api/agents/me/events?after=" + str(2 ** 62 + 1),             "agent",   "after"),
    ("/api/agents/me/events?after=" + "9" * 400,                    "agent",   "after"),
    ("/api/notifications?limit=0",                                  "buyer",   "limit"),
    ("/api/notifications?limit=101",                                "buyer",   "limit"),
    ("/api/notifications?limit=ten",                                "buyer",   "limit"),
    ("/api/notifications?cursor=!!!",                               "buyer",   "cursor"),
    ("/api/notifications?cursor=" + "A" * 201,                      "buyer",   "cursor"),
    ("/api/notifications?cursor=" + b64(b'["yesterday", "ntf_x"]'), "buyer",  "cursor"),
]


@pytest.mark.parametrize("path,caller,field", QUERY_CASES, ids=[c[0][:70] for c in QUERY_CASES])
def test_bad_query_parameters_are_400_naming_the_parameter(world, path, caller, field):
    run_refused(world, "workspace" if "{oid}" in path else None, "GET", path, caller, 400, field, path)


# --- 4. junk ids in paths → 404 ------------------------------------------------------------------

ANSWER = {"url": "https://example.com/x", "media_type": "link"}

ID_ROUTES = {
    # route ({id} is the junk one)                            kind   caller     body                      state of {oid}/{gid}
    "GET /api/orders/{id}":                                  ("ord", "buyer",   None,                      None),
    "PATCH /api/orders/{id}":                                ("ord", "buyer",   {"action": "accept"},      None),
    "GET /api/orders/{id}/payment":                          ("ord", "buyer",   None,                      None),
    "POST /api/orders/{id}/quote":                           ("ord", "agent",   {"price_usd": "10.00"},    None),
    "POST /api/orders/{id}/start":                           ("ord", "agent",   None,                      None),
    "POST /api/orders/{id}/decline":                         ("ord", "agent",   {},                        None),
    "POST /api/orders/{id}/deliver":                         ("ord", "agent",   {"deliverables": [ANSWER]}, None),
    "POST /api/orders/{id}/review":                          ("ord", "buyer",   {"rating": 5},             None),
    "POST /api/orders/{id}/generate":                        ("ord", "buyer",   {"prompt": "A fox."},      None),
    "GET /api/orders/{id}/generations":                      ("ord", "buyer",   None,                      None),
    # a real, pending generation under a junk order; a junk generation on the agent's real order
    "POST /api/orders/{id}/generations/{gid}":               ("ord", "agent",   ANSWER,                    "generation"),
    "POST /api/orders/{oid}/generations/{id}":               ("gen", "agent",   ANSWER,                    "generation"),
    "POST /api/orders/{id}/renew":                           ("ord", "buyer",   None,                      None),
    "POST /api/admin/orders/{id}/resolve":                   ("ord", "admin",   {"outcome": "refund", "note": "No."}, None),
    "POST /api/admin/payouts/{id}/retry":                    ("pay", "admin",   None,                      None),
    "GET /api/services/{id}":                                ("svc", "anonymous", None,                    None),
    "GET /api/agents/{id}":                                  ("agt", "anonymous", None,                    None),
    "GET /api/agents/{id}/orders":                           ("agt", "agent",   None,                      None),
    "GET /api/agents/{id}/generations":                      ("agt", "agent",   None,                      None),
    "POST /api/agents/me/webhook-deliveries/{id}/redeliver": ("whd", "agent",   None,                      None),
    "GET /internal/orders/{id}":                             ("ord", "service", None,                      None),
}

JUNK_IDS = {
    "prefix and x":             lambda p: f"{p}_x",
    "dot-dot":                  lambda p: "../etc",
    "encoded dot-dot":          lambda p: "..%2F..%2Fetc%2Fpasswd",
    "very long":                lambda p: f"{p}_" + "a" * 5000,
    "21 characters":            lambda p: f"{p}_" + "a" * 21,
    "unicode":                  lambda p: f"{p}_" + "ü" * 20,
    "emoji":                    lambda p: f"{p}_" + "\U0001F98A" * 20,
    "NUL byte":                 lambda p: f"{p}_%00" + "a" * 19,
    "SQL":                      lambda p: f"{p}_'%20OR%20'1'='1",
    "another kind's prefix":    lambda p: unknown_id("rev"),
    "well-formed, unknown":     lambda p: unknown_id(p),
    "blank":                    lambda p: "%20",
    "empty":                    lambda p: "",  # two slashes in a row: not merged into another route
    "encoded slash":            lambda p: "%2F",
}
ID_CASES = [(r, j) for r in ID_ROUTES for j in JUNK_IDS]


@pytest.mark.parametrize("route,junk", ID_CASES, ids=[f"{r} | {j}" for r, j in ID_CASES])
def test_junk_ids_are_404(world, route, junk):
    method, template = route.split()
    kind, caller, body, state = ID_ROUTES[route]
    path = template.replace("{id}", JUNK_IDS[junk](kind))  # run_refused fills in the real {oid}, {gid}
    run_refused(world, state, method, path, caller, 404, None, f"{route}: {junk}", json_body=body)


@pytest.mark.parametrize("junk", list(JUNK_IDS))
@pytest.mark.parametrize("listing", ["orders", "generations"])
def test_an_admin_polling_a_junk_agent_id_gets_404_or_nothing(world, listing, junk):
    """Admins may poll any agent; a junk id must not be a 5xx nor return anybody's orders or generations."""
    status, body = world.call("GET", f"/api/agents/{JUNK_IDS[junk]('agt')}/{listing}", "admin")
    assert status < 500, (status, body)
    if status == 200:
        assert body["data"]["items"] == [], body
    else:
        assert_refused(status, body, 404)


NUL_LOOKUPS = [
    # a NUL byte reaching a lookup (PostgreSQL refuses it in text parameters)
    ("/api/services?agent_id=%00",                                             "anonymous"),
    ("/api/services?agent_id=agt_%00",                                         "anonymous"),
    ("/api/agents/agt_%00/orders",                                             "admin"),
    ("/api/orders?cursor=" + b64(b'["2024-01-01T00:00:00Z", "ord_\\u0000"]'),  "buyer"),
    ("/api/services?cursor=" + b64(b'["2024-01-01T00:00:00Z", "svc_\\u0000"]'), "anonymous"),
]


@pytest.mark.parametrize("path,caller", NUL_LOOKUPS, ids=[p for p, _ in NUL_LOOKUPS])
def test_a_nul_byte_in_a_lookup_is_never_5xx(world, path, caller):
    """400 naming the parameter, 404, or an empty list: never a 5xx."""
    status, body = world.call("GET", path, caller)
    assert status < 500, (path, status, body)
    if status == 200:
        assert body["data"]["items"] == [], body
    else:
        assert_refused(status, body, (400, 404), None, path)


def test_a_junk_service_id_in_the_body_is_404_or_400(world):
    for service_id in ("svc_x", "../etc", "svc_" + "ü" * 20, unknown_id("svc"), unknown_id("ord"), "svc_" + "a" * 40):
        before = world.snapshot()
        status, body = world.call("POST", "/api/orders", "buyer",
                                  json_body={"service_id": service_id, "brief": "Please draw a red fox."})
        if status == 400:
            assert_refused(status, body, 400, "service_id", service_id)
        else:
            assert_refused(status, body, 404, None, service_id)
        assert world.snapshot() == before


TIMES_BEYOND_UTC = ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00", "0001-01-01T00:00:00+00:01"]


@pytest.mark.parametrize("moment", TIMES_BEYOND_UTC)
def test_a_time_with_no_utc_form_is_a_400_on_the_internal_routes(world, moment):
    """A valid ISO 8601 time whose offset pushes it past year 1 or 9999 in UTC."""
    run_refused(world, None, "GET", "/internal/settlements?since=" + moment.replace("+", "%2B"), "service",
                400, "since", moment)
    settled = world.order("completed")
    payout = world.call("GET", f"/api/orders/{settled['id']}", "admin")[1]["data"]["payout"]
    run_refused(world, "completed", "POST", "/internal/orders/{oid}/settlements", "service", 400, "updated_at",
                moment, json_body={"id": payout["id"], "status": "sent", "version": 7, "updated_at": moment,
                                   "tx_ref": "t"})


# --- 5. unknown routes, wrong methods ------------------------------------------------------------

UNKNOWN_ROUTES = [
    ("GET", "/api/nope"), ("GET", "/api"), ("GET", "/api/"), ("POST", "/api/order"),
    ("GET", "/api/orders/{oid}/nope"), ("POST", "/api/orders/{oid}/approve"), ("GET", "/api/orders/{oid}/"),
    ("GET", "/api/agents/{aid}/services"), ("GET", "/api/admin/orders"), ("GET", "/nope"),
    ("GET", "/internal/nope"), ("GET", "/internal/orders"),
]


@pytest.mark.parametrize("method,path", UNKNOWN_ROUTES, ids=[f"{m} {p}" for m, p in UNKNOWN_ROUTES])
def test_unknown_routes_are_404_in_the_envelope(world, method, path):
    caller = "service" if path.startswith("/internal") else "buyer"
    run_refused(world, "quoted", method, path, caller, 404, None, f"{method} {path}",
                json_body={} if method != "GET" else None)


WRONG_METHODS = [
    ("DELETE", "/api/orders/{oid}", "buyer"), ("PUT", "/api/orders/{oid}", "buyer"),
    ("POST", "/api/orders/{oid}", "buyer"), ("DELETE", "/api/orders", "buyer"),
    ("PUT", "/api/orders", "buyer"), ("GET", "/api/orders/{oid}/quote", "agent"),
    ("PATCH", "/api/orders/{oid}/quote", "agent"), ("GET", "/api/orders/{oid}/review", "buyer"),
    ("DELETE", "/api/orders/{oid}/review", "buyer"), ("POST", "/api/orders/{oid}/payment", "buyer"),
    ("GET", "/api/admin/orders/{oid}/resolve", "admin"), ("DELETE", "/api/services/{sid}", "agent"),
    ("PATCH", "/api/services/{sid}", "agent"), ("PUT", "/api/services", "agent"),
    ("DELETE", "/api/agents/me", "agent"), ("PUT", "/api/agents/me", "agent"),
    ("POST", "/api/agents/{aid}", "agent"), ("GET", "/api/sandbox/transfers", "anonymous"),
    ("GET", "/api/auth/session", "anonymous"), ("DELETE", "/api/auth/challenge", "anonymous"),
    ("POST", "/internal/orders/{oid}", "service"), ("DELETE", "/internal/orders/{oid}", "service"),
]


@pytest.mark.parametrize("method,path,caller", WRONG_METHODS, ids=[f"{m} {p}" for m, p, _ in WRONG_METHODS])
def test_wrong_methods_are_405_in_the_envelope(world, method, path, caller):
    run_refused(world, "quoted", method, path, caller, 405, None, f"{method} {path}",
                json_body={"action": "cancel"} if method in ("POST", "PUT", "PATCH") else None)


# --- 6. characters a database cannot store; a bad Idempotency-Key --------------------------------

TEXT_FIELDS = [
    # endpoint          field          value template (the {} is the strange character)
    ("create order",   "brief",       "Please draw a red fox{}."),
    ("revision",       "feedback",    "More red{} please."),
    ("dispute",        "reason",      "It is a dog{}."),
    ("decline",        "reason",      "Too busy{}."),
    ("review",         "comment",     "Lovely{}."),
    ("resolve",        "note",        "Half done{}."),
    ("create service", "title",       "Logo{}"),
    ("update agent",   "name",        "Agent{}"),
    ("register agent", "name",        "Agent{}"),
    ("generate",       "prompt",      "A fox in the snow{}."),
    ("answer generation", "title",    "Fox{}"),
    ("fail generation", "error",      "The model is down{}."),
]
STRANGE = {"lone surrogate": "\ud800", "NUL": "\x00"}
TEXT_CASES = [(e, f, v, s) for e, f, v in TEXT_FIELDS for s in STRANGE]


@pytest.mark.parametrize("endpoint,field,template,strange", TEXT_CASES,
                         ids=[f"{c[0]} | {c[1]} | {c[3]}" for c in TEXT_CASES])
def test_unstorable_characters_are_refused_or_stored_never_5xx(world, endpoint, field, template, strange):
    """JSON can carry "\\ud800" and "\\u0000"; the answer is a 400 naming the field, or the text kept as
    sent. A 5xx, or a 2xx that stored something else, is a bug."""
    method, path, state, caller, _ = BODY_ENDPOINTS[endpoint]
    order = world.order(state) if state else None
    value = template.format(STRANGE[strange])
    body = {**_valid_body(world, endpoint), field: value}
    raw = json.dumps(body)  # ensure_ascii: the escapes go over the wire as \\ud800 / \\u0000
    before = world.snapshot(order)
    status, resp = world.call(method, world.fill(path, order), caller,
                              data=raw, content_type="application/json")
    if status < 400:
        world.forget(state)
        assert resp["success"] is True, resp
        assert json.dumps(value)[1:-1] in json.dumps(resp["data"]), (endpoint, field, "not kept as sent", resp)
        return
    assert_refused(status, resp, 400, field, f"{endpoint}.{field} with {strange}")
    assert world.snapshot(order) == before


@pytest.mark.parametrize("key", ["k" * 256, ""], ids=["256 characters", "empty"])
def test_a_bad_idempotency_key_is_400(world, key):
    run_refused(world, "quoted", "PATCH", "/api/orders/{oid}", "buyer", 400, None, repr(key[:10]),
                json_body={"action": "accept"}, headers={"Idempotency-Key": key})


# --- 7. fuzz: arbitrary JSON never makes a 5xx, and always answers in the envelope ---------------

# Characters that break things more often than random ones: NUL, lone surrogates, bidi and BOM,
# backslashes, new lines.
TRICKY = ["\x00", "\ud800", "\udfff", "\x00", "\u202e", "\ufeff", "\\", "\n"]


def spiked(min_size=0, max_size=40):
    """Random text with one tricky character spliced in."""
    return st.builds(lambda a, c, b: a + c + b, st.text(min_size=min_size, max_size=max_size // 2),
                     st.sampled_from(TRICKY), st.text(max_size=max_size // 2))


def texts(min_size=0, max_size=40):
    return st.text(min_size=min_size, max_size=max_size) | spiked(min_size, max_size)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | texts(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(texts(max_size=12), children, max_size=4),
    max_leaves=12,
)
ACTIONS = ["accept", "pay", "approve", "revision", "dispute", "cancel", "quote", "deliver", "resolve", "start"]


def _with_extra(known: st.SearchStrategy) -> st.SearchStrategy:
    return st.builds(lambda k, extra: {**extra, **k}, known,
                     st.dictionaries(texts(max_size=12), json_values, max_size=2))


patch_bodies = st.one_of(
    json_values,
    _with_extra(st.fixed_dictionaries({}, optional={
        "action": st.sampled_from(ACTIONS) | json_values,
        "feedback": texts(1, 60) | json_values,
        "reason": texts(0, 60) | json_values,
        "escrow_tx_hash": texts(0, 140) | json_values,
    })),
    # well-formed actions with free text: the text reaches the database
    st.fixed_dictionaries({"action": st.sampled_from(["revision", "dispute"])},
                          optional={"feedback": spiked(1, 60), "reason": spiked(0, 60)}),
)


def order_bodies(service_ids):
    return st.one_of(
        json_values,
        _with_extra(st.fixed_dictionaries({}, optional={
            "service_id": st.sampled_from(service_ids) | json_values,
            "brief": texts(10, 80) | json_values,
            "reference_urls": st.lists(st.sampled_from(["https://example.com/a", "javascript:alert(1)", "ftp://x/y"])
                                       | texts(max_size=30), max_size=7) | json_values,
        })),
        # well-formed orders with free text: the text reaches the database
        st.fixed_dictionaries({"service_id": st.sampled_from(service_ids), "brief": spiked(10, 80)}),
    )


# No shrink phase: a failure is reported as found (with its body in the message), so a failing run
# stays as quick as a passing one.
FUZZ = hsettings(max_examples=40, deadline=None, database=None, phases=(Phase.explicit, Phase.generate),
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                        HealthCheck.data_too_large])


def _send_fuzz(world, method, path, caller, body, state=None):
    """Send `body` as raw JSON; return (status, response, before, after)."""
    order = world.order(state) if state else None
    path = path.format(oid=order["id"] if order else "")
    engine = world.app.extensions["db"].engine

    def snap():
        with engine.connect() as conn:
            counts = [conn.execute(text(f"SELECT count(*) FROM {t}")).scalar()
                      for t in ("orders", "order_timeline", "outbox_events", "revisions", "order_timers")]
        return counts, (world.api.ok("GET", f"/api/orders/{order['id']}", ADMIN) if order else None)

    before = snap()
    status, resp = world.call(method, path, caller, data=json.dumps(body), content_type="application/json")
    after = snap()
    if after != before:
        world.forget(state)
    return status, resp, before, after


# Two properties per endpoint, so that one failing does not hide the other.

@FUZZ
@given(body=patch_bodies, state=st.sampled_from(["quoted", "delivered", "delivered"]))
def test_fuzz_patch_order_never_5xx_and_refusals_change_nothing(world, body, state):
    status, resp, before, after = _send_fuzz(world, "PATCH", "/api/orders/{oid}", "buyer", body, state)
    assert status < 500, (body, status, resp)
    assert status < 400 or after == before, (body, status, "a refused request changed something")


@FUZZ
@given(body=patch_bodies, state=st.sampled_from(["quoted", "delivered", "delivered"]))
def test_fuzz_patch_order_answers_in_the_envelope(world, body, state):
    status, resp, _, _ = _send_fuzz(world, "PATCH", "/api/orders/{oid}", "buyer", body, state)
    _check_envelope(status, resp, body)


@FUZZ
@given(data=st.data())
def test_fuzz_create_order_never_5xx_and_refusals_change_nothing(world, data):
    body = data.draw(order_bodies([world.fixed_service["id"], world.quote_service["id"], unknown_id("svc")]))
    status, resp, before, after = _send_fuzz(world, "POST", "/api/orders", "buyer", body)
    assert status < 500, (body, status, resp)
    assert status < 400 or after == before, (body, status, "a refused request changed something")


@FUZZ
@given(data=st.data())
def test_fuzz_create_order_answers_in_the_envelope(world, data):
    body = data.draw(order_bodies([world.fixed_service["id"], world.quote_service["id"], unknown_id("svc")]))
    status, resp, _, _ = _send_fuzz(world, "POST", "/api/orders", "buyer", body)
    _check_envelope(status, resp, body)


def _check_envelope(status, resp, context):
    assert isinstance(resp, dict), (context, status, "not JSON")
    if status < 400:
        assert resp.get("success") is True and "data" in resp, (context, status, resp)
    else:
        assert set(resp) == ENVELOPE_KEYS and resp["success"] is False, (context, status, resp)
        assert isinstance(resp["code"], str) and isinstance(resp["error"], str), (context, resp)
        assert isinstance(resp["details"], dict), (context, resp)


# --- 8. no route forgotten -----------------------------------------------------------------------

# POST and PATCH routes that take no JSON body: nothing in one to be malformed (their junk ids are
# in ID_ROUTES; what each does is tested with its feature).
NO_BODY = [
    "POST /api/orders/{id}/start",                            # the agent starts work
    "POST /api/orders/{id}/renew",                            # the next period, on the service's terms
    "POST /api/agents/me/webhook-secret/rotate",              # the server makes the secret
    "POST /api/agents/me/webhook-deliveries/{id}/redeliver",
    "POST /api/admin/payouts/{id}/retry",
    "POST /api/uploads",                                      # multipart, not JSON: tests/test_uploads.py
]
# Routes with a path parameter whose bad values are tested elsewhere.
ID_EXEMPT = [
    # signed links: the signature is checked before the id, so a junk id is a 403 (tests/test_uploads.py)
    "GET /api/files/{item_id}/{variant}",
]


def _shape(method: str, path: str) -> tuple[str, tuple[str, ...]]:
    """A route with its parameters' names erased: `{oid}`, `{id}` and `<order_id>` are alike."""
    return method, tuple("{}" if re.fullmatch(r"\{\w*\}|<[\w:]+>", part) else part for part in path.split("/"))


def _junk_positions(path: str) -> list[int]:
    return [i for i, part in enumerate(path.split("/")) if part == "{id}"]


def test_every_route_taking_input_has_its_bad_input_cases(world):
    """A new endpoint cannot be forgotten: every /api route taking a body is in BODY_ENDPOINTS (or
    NO_BODY), every path parameter of every /api route gets junk in ID_ROUTES (or is in ID_EXEMPT),
    and those lists name no route that is gone (a junk id on a route that no longer exists is a 404
    too, so such a case would pass while testing nothing)."""
    routes = [(method, rule.rule) for rule in world.app.url_map.iter_rules()
              for method in sorted(rule.methods - {"HEAD", "OPTIONS"})]
    with_body = {_shape(m, p) for m, p, *_ in BODY_ENDPOINTS.values()} | {_shape(*r.split()) for r in NO_BODY}
    junk = {(_shape(*r.split()), i) for r in ID_ROUTES for i in _junk_positions(r.split()[1])}
    exempt = {_shape(*r.split()) for r in ID_EXEMPT}
    missing = []
    for method, rule in routes:
        if not rule.startswith("/api/") or rule == "/api/openapi.json":
            continue
        shape = _shape(method, rule)
        if method in ("POST", "PATCH") and shape not in with_body:
            missing.append(f"{method} {rule}: add it to BODY_ENDPOINTS (or to NO_BODY if it takes no body)")
        for i, part in enumerate(rule.split("/")):
            if part.startswith("<") and shape not in exempt and (shape, i) not in junk:
                missing.append(f"{method} {rule}: add a junk {part} to ID_ROUTES")
    assert not missing, "routes whose bad input is not tested:\n" + "\n".join(missing)

    existing = {_shape(m, r) for m, r in routes}
    listed = [f"{m} {p}" for m, p, *_ in BODY_ENDPOINTS.values()] + NO_BODY + ID_EXEMPT + list(ID_ROUTES)
    gone = sorted({r for r in listed if _shape(*r.split()) not in existing})
    assert not gone, f"listed here, but no such route: {gone}"
