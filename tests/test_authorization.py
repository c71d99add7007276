"""Who may call what: the authorization matrix of every endpoint in services/orders/views.py.

DESIGN.md §4-§5: no or bad credentials → 401 `unauthenticated`; a party calling an action that is
not theirs → 403 `forbidden`; an order the caller is not a party to → 404 `not_found`, with the very
body an unknown order id gets (existence is never revealed); a refused request changes nothing;
lists only ever hold the caller's own orders; `/internal/*` answers only the service credential.

One app and one cast of actors per module keep the ~200 cases fast; every case gets a fresh order.
"""
from __future__ import annotations

import base64
import io
import json
import secrets
import string

import pytest
from sqlalchemy import inspect, select, text

from services.orders import webhooks
from services.orders.models import Agent, OutboxEvent, WebhookDelivery
from shared.auth import new_webhook_secret

from shared.auth import sign_session
from tests.support.api import ADMIN, ApiClient
from tests.support.wallets import SolanaWallet

CALLERS = ("buyer", "other_buyer", "agent", "other_agent", "anonymous", "admin", "bad_token")

# ------------------------------------------------------------------------------------------------
# THE MATRIX.  endpoint → (order state the case starts from, then the expected status per caller).
#   buyer / agent         = the order's own buyer / the agent selling it ({aid} is that agent)
#   other_buyer / _agent  = a logged-in buyer / agent with nothing to do with the order
#   bad_token             = `Authorization: Bearer <garbage>` (more bad tokens: test_bad_tokens_...)
# Expected code: 401 unauthenticated, 403 forbidden, 404 not_found; 2xx {"success": true}.
# ------------------------------------------------------------------------------------------------
MATRIX = {
    # endpoint                                         state            buyer o_buyr agent o_agnt anon admin bad
    "GET /api/orders/{oid}":                         ("quoted",          200,  404,  200,  404,  401,  200, 401),
    "GET /api/orders/{oid}/payment":                 ("quoted",          200,  404,  403,  404,  401,  403, 401),
    "PATCH /api/orders/{oid} accept":                ("quoted",          200,  404,  403,  404,  401,  403, 401),
    "PATCH /api/orders/{oid} pay":                   ("quoted",          200,  404,  403,  404,  401,  403, 401),
    "PATCH /api/orders/{oid} approve":               ("delivered",       200,  404,  403,  404,  401,  403, 401),
    "PATCH /api/orders/{oid} revision":              ("delivered",       200,  404,  403,  404,  401,  403, 401),
    "PATCH /api/orders/{oid} dispute":               ("delivered",       200,  404,  403,  404,  401,  403, 401),
    "PATCH /api/orders/{oid} cancel":                ("quoted",          200,  404,  403,  404,  401,  403, 401),
    "POST /api/orders/{oid}/quote":                  ("pending_quote",   403,  404,  200,  404,  401,  403, 401),
    "POST /api/orders/{oid}/start":                  ("paid",            403,  404,  200,  404,  401,  403, 401),
    "POST /api/orders/{oid}/decline":                ("quoted",          403,  404,  200,  404,  401,  403, 401),
    "POST /api/orders/{oid}/deliver":                ("paid",            403,  404,  200,  404,  401,  403, 401),
    "POST /api/orders/{oid}/review":                 ("completed",       201,  404,  403,  404,  401,  403, 401),
    "POST /api/admin/orders/{oid}/resolve":          ("disputed",        403,  403,  403,  403,  401,  200, 401),
    "POST /api/admin/payouts/{pid}/retry":           ("payout_failed",   403,  403,  403,  403,  401,  202, 401),
    "POST /api/uploads":                             (None,              403,  403,  201,  201,  401,  403, 401),
    # a signed link is a short-lived capability, whoever holds it; but a buyer's own credentials
    # never fetch an image's original before completion (here: the admin's link, order delivered)
    "GET {file}":                                    ("file_delivered",  403,  200,  200,  200,  200,  200, 401),
    "POST /api/orders/{oid}/generate":               ("workspace",       202,  404,  403,  404,  401,  403, 401),
    "GET /api/orders/{oid}/generations":             ("workspace",       200,  404,  200,  404,  401,  200, 401),
    "POST /api/orders/{oid}/generations/{gid}":      ("generation",      403,  404,  200,  404,  401,  403, 401),
    "POST /api/orders/{oid}/renew":                  ("workspace",       201,  404,  403,  404,  401,  403, 401),
    "GET /api/agents/{aid}/generations":             ("generation",      403,  403,  200,  404,  401,  200, 401),
    "POST /api/agents/me/webhook-secret/rotate":     (None,              403,  403,  200,  200,  401,  403, 401),
    "GET /api/agents/me/webhook-deliveries":         (None,              403,  403,  200,  200,  401,  403, 401),
    "POST /api/agents/me/webhook-deliveries/{did}/redeliver": ("webhook", 403, 403, 202,  404,  401,  403, 401),
    "GET /api/agents/me/events":                     (None,              403,  403,  200,  200,  401,  403, 401),
    "GET /api/notifications":                        (None,              200,  200,  403,  403,  401,  403, 401),
    "PATCH /api/notifications":                      (None,              200,  200,  403,  403,  401,  403, 401),
    "GET /api/orders":                               (None,              200,  200,  403,  403,  401,  403, 401),
    "POST /api/orders":                              (None,              201,  201,  403,  403,  401,  403, 401),
    "GET /api/agents/{aid}/orders":                  ("paid",            403,  403,  200,  404,  401,  200, 401),
    "GET /api/agents/me":                            (None,              403,  403,  200,  200,  401,  403, 401),
    "PATCH /api/agents/me":                          (None,              403,  403,  200,  200,  401,  403, 401),
    "GET /api/agents/{aid}":                         (None,              200,  200,  200,  200,  200,  200, 401),
    "POST /api/agents":                              (None,              201,  201,  201,  201,  201,  201, 401),
    "POST /api/services":                            (None,              403,  403,  201,  201,  401,  403, 401),
    "GET /api/services":                             (None,              200,  200,  200,  200,  200,  200, 401),
    "GET /api/services/{sid}":                       (None,              200,  200,  200,  200,  200,  200, 401),
    "POST /api/sandbox/transfers":                   (None,              201,  201,  201,  201,  201,  201, 401),
    "POST /api/auth/challenge":                      (None,              201,  201,  201,  201,  201,  201, 401),
    "POST /api/auth/session":                        (None,              201,  201,  201,  201,  201,  201, 401),
}

# The order's status after the one caller allowed to act has acted.
STATUS_AFTER = {
    "PATCH /api/orders/{oid} accept": "accepted",
    "PATCH /api/orders/{oid} pay": "paid",
    "PATCH /api/orders/{oid} approve": "completed",
    "PATCH /api/orders/{oid} revision": "revision_requested",
    "PATCH /api/orders/{oid} dispute": "disputed",
    "PATCH /api/orders/{oid} cancel": "cancelled",
    "POST /api/orders/{oid}/quote": "quoted",
    "POST /api/orders/{oid}/start": "in_progress",
    "POST /api/orders/{oid}/decline": "cancelled",
    "POST /api/orders/{oid}/deliver": "delivered",
    "POST /api/admin/orders/{oid}/resolve": "cancelled",
}

ERROR_CODES = {401: "unauthenticated", 403: "forbidden", 404: "not_found"}
_ALNUM = string.ascii_letters + string.digits


def unknown_id(prefix: str) -> str:
    """A well-formed id that names nothing."""
    return prefix + "_" + "".join(secrets.choice(_ALNUM) for _ in range(20))


def parse(endpoint: str) -> tuple[str, str]:
    method, path, *_ = endpoint.split()
    return method, path


# --- the world: one app, a cast of actors, fresh orders on demand --------------------------------

class World:
    def __init__(self, app):
        self.app = app
        self.api = ApiClient(app)
        self.settings = app.config["SETTINGS"]
        self.agent = self.api.agent("Owning Agent")
        self.other_agent = self.api.agent("Other Agent")
        self.quote_service = self.api.service(self.agent, "quote")
        self.fixed_service = self.api.service(self.agent, "fixed")
        self.weekly_service = self.api.service(self.agent, "weekly", quota_limit=10)
        self.buyer = self.api.buyer()
        self.other_buyer = self.api.buyer()
        self.headers = {
            "buyer": self.buyer.headers, "other_buyer": self.other_buyer.headers,
            "agent": self.agent.headers, "other_agent": self.other_agent.headers,
            "anonymous": {}, "admin": ADMIN.headers,
            "bad_token": {"Authorization": "Bearer garbage-" + secrets.token_hex(8)},
        }
        with app.extensions["db"].transaction() as session:  # endpoints set as if validated earlier
            for agent in (self.agent, self.other_agent):
                row = session.get(Agent, agent.id)
                row.endpoint_url, row.webhook_secret = "https://hooks.example.com/in", new_webhook_secret()
        self.ids = {"buyer": self.buyer.id, "other_buyer": self.other_buyer.id,
                    "agent": self.agent.id, "other_agent": self.other_agent.id}

    def call(self, method: str, path: str, caller: str | dict, body=None):
        headers = self.headers[caller] if isinstance(caller, str) else caller
        if isinstance(body, Multipart):
            return self.api.call(method, path, None, headers=headers, data={"file": (io.BytesIO(body.content), body.name)},
                                 content_type="multipart/form-data")
        status, resp = self.api.call(method, path, None, json=body, headers=headers)
        if status == 200 and resp is None and self.api.last.data:  # a file, not JSON: count it as data
            resp = {"success": True, "data": {"bytes": len(self.api.last.data)}}
        return status, resp

    def order_in(self, state: str, agent=None, buyer=None, service=None) -> dict:
        """A fresh order of (agent, buyer) walked to `state` through the public API."""
        agent, buyer = agent or self.agent, buyer or self.buyer
        service = service or (self.quote_service if state == "pending_quote" else self.fixed_service)
        if state == "file_delivered":  # an uploaded image, delivered
            order = self.api.walk(agent, buyer, self.api.order(buyer, service), "paid")
            upload = self.api.upload(agent, PNG, "fox.png")
            self.api.ok("POST", f"/api/orders/{order['id']}/deliver", agent,
                        json={"deliverables": [{"upload_id": upload["upload_id"], "media_type": "image"}]})
            return self.api.ok("GET", f"/api/orders/{order['id']}", ADMIN)
        if state in ("workspace", "generation"):  # a weekly order's open workspace (with a dispatched generation)
            order = self.api.pay(buyer, self.api.order(buyer, self.weekly_service)["id"])
            if state == "generation":
                from services.orders import workspaces
                generation = self.api.ok("POST", f"/api/orders/{order['id']}/generate", buyer,
                                         json={"prompt": "A fox."}, expect=202)["generation"]
                with self.app.extensions["db"].transaction() as session:
                    workspaces.dispatch(session, self.app.extensions["orders_runtime"], generation["id"])
            return self.api.ok("GET", f"/api/orders/{order['id']}", ADMIN)
        if state == "webhook":  # a paid order whose events the webhooks worker recorded for the agent
            order = self.api.walk(agent, buyer, self.api.order(buyer, service), "paid")
            with self.app.extensions["db"].transaction() as session:
                for event in session.scalars(select(OutboxEvent).where(OutboxEvent.order_id == order["id"])):
                    webhooks.record(session, self.settings, event.message())
            return order
        if state == "payout_failed":  # completed, and the payouts worker gave up on the payout
            order = self.api.walk(agent, buyer, self.api.order(buyer, service), "completed")
            self.api.report_payout(order["id"], "payout", "failed", 5, error="The rail refused.")
            return self.api.ok("GET", f"/api/orders/{order['id']}", ADMIN)
        return self.api.walk(agent, buyer, self.api.order(buyer, service), state)

    def snapshot(self, order: dict | None = None) -> dict:
        """Everything a refused request must leave alone: row counts, the order, both agents."""
        engine = self.app.extensions["db"].engine
        with engine.connect() as conn:
            tables = sorted(t for t in inspect(conn).get_table_names() if t != "alembic_version")
            counts = {t: conn.execute(text(f"SELECT count(*) FROM {t}")).scalar() for t in tables}
        snap = {"counts": counts,
                "agents": [self.api.ok("GET", "/api/agents/me", a) for a in (self.agent, self.other_agent)]}
        if order is not None:
            snap["order"] = self.api.ok("GET", f"/api/orders/{order['id']}", ADMIN)
        return snap


class Multipart:
    def __init__(self, content: bytes, name: str):
        self.content, self.name = content, name


PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                    "1f15c4890000000d49444154789c6360f8cf000000030101007ce5e1e20000000049454e44ae426082")


def _body(world: World, endpoint: str, order: dict | None):
    """A valid request body for the endpoint (so a refusal is about the caller, not the input)."""
    if endpoint == "PATCH /api/orders/{oid} pay":
        # a real, matching transfer from the order's buyer: only authorization stands in the way
        return {"action": "pay", "escrow_tx_hash": world.api.transfer(world.buyer, order["id"])}
    if endpoint == "POST /api/uploads":
        return Multipart(PNG, "fox.png")
    if endpoint == "POST /api/auth/session":
        wallet = SolanaWallet.generate()
        challenge = world.api.ok("POST", "/api/auth/challenge", json={"wallet": wallet.address, "chain": "solana"})
        return {"wallet": wallet.address, "chain": "solana", "nonce": challenge["nonce"],
                "signature": wallet.sign(challenge["message"])}
    if endpoint.startswith("PATCH /api/orders/{oid} "):
        action = endpoint.split()[-1]
        return {"action": action, **{"revision": {"feedback": "Make it redder."},
                                     "dispute": {"reason": "Not what I asked for."}}.get(action, {})}
    return {
        "POST /api/orders/{oid}/quote": {"price_usd": "120.50"},
        "POST /api/orders/{oid}/start": None,
        "POST /api/orders/{oid}/decline": {"reason": "Too busy this week."},
        "POST /api/orders/{oid}/deliver": {"deliverables": [{"url": "https://example.com/fox", "media_type": "link"}]},
        "POST /api/orders/{oid}/review": {"rating": 5, "comment": "Great fox."},
        "POST /api/orders/{oid}/generate": {"prompt": "A fox in the snow."},
        "POST /api/orders/{oid}/generations/{gid}": {"url": "https://example.com/fox", "media_type": "link"},
        "POST /api/admin/orders/{oid}/resolve": {"outcome": "refund", "note": "The agent never delivered."},
        "POST /api/orders": {"service_id": world.fixed_service["id"], "brief": "Please draw a red fox."},
        "PATCH /api/agents/me": {"name": "Renamed " + secrets.token_hex(3)},
        "PATCH /api/notifications": {},
        "POST /api/agents": {"name": "Newcomer"},
        "POST /api/services": {"title": "Logo", "description": "A logo.", "price_type": "fixed",
                               "price_usd": "30.00"},
        "POST /api/sandbox/transfers": {"from_wallet": world.buyer.id, "to": world.settings.treasury_solana,
                                        "amount_usd": "45.00", "asset": "USDC", "chain": "solana"},
        "POST /api/auth/challenge": {"wallet": SolanaWallet.generate().address, "chain": "solana"},
    }.get(endpoint)


def _ids(world: World, order: dict | None) -> dict:
    order = order or {}
    items = [i for d in order.get("deliveries", ()) for i in d["items"]]
    generations = world.api.ok("GET", f"/api/orders/{order['id']}/generations", ADMIN)["items"] \
        if order.get("workspace") else []
    return {"oid": order.get("id"), "aid": world.agent.id, "sid": world.fixed_service["id"],
            "gid": generations[0]["id"] if generations else None, "did": _delivery_of(world, order.get("id")),
            "pid": (order.get("payout") or {}).get("id"), "file": items[0]["url"] if items else None}


def _delivery_of(world: World, order_id: str | None) -> str | None:
    with world.app.extensions["db"].transaction() as session:
        return session.scalar(select(WebhookDelivery.id).where(WebhookDelivery.order_id == order_id).limit(1))


def assert_error(status: int, body, expected_status: int, expected_code: str, context=""):
    assert status == expected_status, (context, status, body)
    assert isinstance(body, dict), (context, "not JSON", status, body)
    assert set(body) == {"success", "error", "code", "details"}, (context, "not the error envelope", body)
    assert body["success"] is False and isinstance(body["error"], str) and body["error"], (context, body)
    assert body["code"] == expected_code, (context, body)
    assert isinstance(body["details"], dict), (context, body)


@pytest.fixture(scope="module")
def world(module_app):
    return World(module_app)


# --- the matrix ----------------------------------------------------------------------------------

CASES = [(endpoint, caller) for endpoint in MATRIX for caller in CALLERS]


@pytest.mark.parametrize("endpoint,caller", CASES, ids=[f"{e} | {c}" for e, c in CASES])
def test_authorization_matrix(world, endpoint, caller):
    state, *statuses = MATRIX[endpoint]
    expected = dict(zip(CALLERS, statuses))[caller]
    method, template = parse(endpoint)
    order = world.order_in(state) if state else None
    ids = _ids(world, order)
    path = template.format(**ids)
    body = _body(world, endpoint, order)
    before = world.snapshot(order)

    status, resp = world.call(method, path, caller, body)

    if expected >= 400:
        assert_error(status, resp, expected, ERROR_CODES[expected], f"{endpoint} as {caller}")
        assert world.snapshot(order) == before, f"{endpoint} as {caller} was refused but changed something"
        if expected == 404:
            # no existence leak: exactly what an id naming nothing gets
            other = template.format(**{**ids, "oid": unknown_id("ord"), "aid": unknown_id("agt"),
                                       "pid": unknown_id("pay")})
            assert world.call(method, other, caller, body) == (status, resp), \
                f"{endpoint} as {caller}: a stranger can tell this id exists"
        return

    assert status == expected, (endpoint, caller, status, resp)
    assert resp["success"] is True and "data" in resp, resp
    data = resp["data"]
    if endpoint in STATUS_AFTER:
        assert data["status"] == STATUS_AFTER[endpoint], data
        assert world.api.ok("GET", f"/api/orders/{order['id']}", ADMIN)["status"] == STATUS_AFTER[endpoint]
    if isinstance(data, dict) and "items" in data:  # lists: never anyone else's orders
        field = {"buyer": "client_wallet", "other_buyer": "client_wallet", "agent": "agent_id",
                 "other_agent": "agent_id"}.get(caller)
        if endpoint == "GET /api/agents/{aid}/orders":
            assert data["items"] and all(o["agent_id"] == world.agent.id for o in data["items"]), data
        elif endpoint == "GET /api/orders":
            assert all(o[field] == world.ids[caller] for o in data["items"]), data
    if endpoint == "POST /api/orders":
        assert data["client_wallet"] == world.ids[caller] and data["status"] == "quoted"
    if endpoint == "POST /api/services":
        assert data["agent_id"] == world.ids[caller]
    if endpoint in ("GET /api/agents/me", "PATCH /api/agents/me"):
        assert data["id"] == world.ids[caller]  # "me" is always the caller, never another agent
    if endpoint == "PATCH /api/agents/me":
        other = "other_agent" if caller == "agent" else "agent"
        before_other = next(a for a in before["agents"] if a["id"] == world.ids[other])
        assert world.api.ok("GET", "/api/agents/me", getattr(world, other)) == before_other
    if endpoint == "GET /api/agents/{aid}":
        private = {"payout_wallet", "payout_chain", "endpoint_url"}
        assert (private <= set(data)) == (caller == "agent"), (caller, data)  # only the agent sees its own


def test_matrix_covers_every_route_of_the_app(world):
    """A new route without a row here is an authorization decision nobody wrote down."""
    declared = {parse(e) for e in MATRIX}
    declared_paths = {(m, p.replace("{oid}", "<order_id>").replace("{aid}", "<agent_id>")
                       .replace("{sid}", "<service_id>").replace("{pid}", "<payout_id>")
                       .replace("{gid}", "<generation_id>").replace("{did}", "<delivery_id>")
        .replace("{file}", "/api/files/<item_id>/<variant>")) for m, p in declared}
    missing = []
    for rule in world.app.url_map.iter_rules():
        if not rule.rule.startswith("/api/") or rule.rule == "/api/openapi.json":
            continue
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            if (method, rule.rule) not in declared_paths:
                missing.append(f"{method} {rule.rule}")
    assert not missing, f"routes without a row in MATRIX: {missing}"


# --- bad credentials, every endpoint -------------------------------------------------------------

def _tampered(token: str, **changes) -> str:
    """Rewrite a session token's payload and keep its old MAC."""
    _, payload, mac = token.split(".")
    data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    data.update(changes)
    raw = base64.urlsafe_b64encode(json.dumps(data, separators=(",", ":")).encode()).rstrip(b"=").decode()
    return f"ses.{raw}.{mac}"


BAD_TOKENS = {
    "garbage bearer": lambda w: "Bearer garbage",
    "empty bearer": lambda w: "Bearer ",
    "wrong scheme": lambda w: "Basic " + base64.b64encode(b"admin:admin").decode(),
    "unknown agent key": lambda w: "Bearer atl_" + secrets.token_urlsafe(32),
    "agent key with a typo": lambda w: "Bearer " + w.agent.token[:-1] + ("A" if w.agent.token[-1] != "A" else "B"),
    "wrong admin key": lambda w: "Bearer " + ADMIN.token + "x",
    "expired session": lambda w: "Bearer " + sign_session(w.settings.session_secret, w.buyer.id, "solana", -60)[0],
    "session, payload swapped to another wallet": lambda w: "Bearer " + _tampered(w.buyer.token, w=w.other_buyer.id),
    "session, expiry pushed back": lambda w: "Bearer " + _tampered(
        sign_session(w.settings.session_secret, w.buyer.id, "solana", -60)[0], e=2_000_000_000),
    "session, MAC altered": lambda w: "Bearer " + w.buyer.token[:-2] + ("AA" if w.buyer.token[-2:] != "AA" else "BB"),
    "session signed with another secret": lambda w: "Bearer " + sign_session("not-the-secret", w.buyer.id, "solana", 3600)[0],
    "session with a missing part": lambda w: "Bearer " + w.buyer.token.rsplit(".", 1)[0],
    "session with a non-ASCII MAC": lambda w: "Bearer ses.e30.\u00fc",
    "service token as bearer": lambda w: "Bearer " + w.settings.service_token,
}


@pytest.mark.parametrize("variant", list(BAD_TOKENS))
def test_bad_tokens_are_401_on_every_endpoint_and_change_nothing(world, variant):
    authorization = BAD_TOKENS[variant](world)
    orders = {}
    failures = []
    for endpoint, (state, *_statuses) in MATRIX.items():
        method, template = parse(endpoint)
        if state and state not in orders:
            orders[state] = world.order_in(state)
        order = orders.get(state)
        path = template.format(**_ids(world, order))
        body = _body(world, endpoint, order)
        before = world.snapshot(order)
        status, resp = world.call(method, path, {"Authorization": authorization}, body)
        try:
            assert_error(status, resp, 401, "unauthenticated", endpoint)
            assert world.snapshot(order) == before, f"{endpoint}: changed something"
        except AssertionError as exc:
            failures.append(str(exc))
    assert not failures, "\n".join(failures)


def test_a_tampered_session_cannot_act_as_the_wallet_it_names(world):
    """The victim's order stays private to a forged token naming the victim's wallet."""
    order = world.order_in("quoted", buyer=world.other_buyer)
    forged = {"Authorization": "Bearer " + _tampered(world.buyer.token, w=world.other_buyer.id)}
    status, body = world.call("GET", f"/api/orders/{order['id']}", forged)
    assert_error(status, body, 401, "unauthenticated")
    status, body = world.call("PATCH", f"/api/orders/{order['id']}", forged, {"action": "cancel"})
    assert_error(status, body, 401, "unauthenticated")
    assert world.api.ok("GET", f"/api/orders/{order['id']}", ADMIN)["status"] == "quoted"


# --- lists: only ever the caller's own orders ----------------------------------------------------

def _walk(world: World, path: str, party) -> list[dict]:
    """Every item of a cursor-paginated list, one item per page."""
    items, cursor = [], None
    for _ in range(50):
        sep = "&" if "?" in path else "?"
        page = world.api.ok("GET", f"{path}{sep}limit=1" + (f"&cursor={cursor}" if cursor else ""), party)
        items += page["items"]
        cursor = page["next_cursor"]
        if not cursor:
            return items
    raise AssertionError("pagination does not end")


def test_a_buyer_lists_only_their_own_orders(world):
    api = world.api
    buyer, other_buyer = api.buyer(), api.buyer()
    seller = api.agent("Seller")
    service = api.service(seller, "fixed")
    mine = {world.order_in("quoted", buyer=buyer)["id"], world.order_in("paid", buyer=buyer)["id"],
            api.order(buyer, service)["id"]}
    theirs = {world.order_in("quoted", buyer=other_buyer)["id"], api.order(other_buyer, service)["id"]}

    listed = api.ok("GET", "/api/orders", buyer)["items"]
    assert {o["id"] for o in listed} == mine
    assert all(o["client_wallet"] == buyer.id for o in listed)
    assert {o["id"] for o in api.ok("GET", "/api/orders", other_buyer)["items"]} == theirs
    paged = _walk(world, "/api/orders", buyer)
    assert sorted(o["id"] for o in paged) == sorted(mine)  # every page: mine only, no repeats
    paid = api.ok("GET", "/api/orders?status=paid,in_progress", buyer)["items"]
    assert [o["status"] for o in paid] == ["paid"] and paid[0]["id"] in mine
    # another buyer's order by id: the same 404 as an id that names nothing
    some = next(iter(theirs))
    assert api.get(f"/api/orders/{some}", buyer) == api.get(f"/api/orders/{unknown_id('ord')}", buyer)
    assert api.get(f"/api/orders/{some}", buyer)[0] == 404


def test_an_agent_polls_only_their_own_orders(world):
    api = world.api
    agent, rival = api.agent("Poller"), api.agent("Rival")
    agent_fixed, rival_fixed = api.service(agent, "fixed"), api.service(rival, "fixed")
    mine = {"quoted": world.order_in("quoted", agent=agent, service=agent_fixed)["id"],
            "paid": world.order_in("paid", agent=agent, service=agent_fixed)["id"],
            "in_progress": world.order_in("in_progress", agent=agent, service=agent_fixed)["id"]}
    theirs = {world.order_in("paid", agent=rival, service=rival_fixed)["id"],
              world.order_in("in_progress", agent=rival, service=rival_fixed)["id"]}

    listed = api.ok("GET", f"/api/agents/{agent.id}/orders", agent)["items"]
    assert {o["id"] for o in listed} == set(mine.values())
    assert all(o["agent_id"] == agent.id for o in listed)
    polled = api.ok("GET", f"/api/agents/{agent.id}/orders?status=paid,in_progress", agent)["items"]
    assert {o["id"] for o in polled} == {mine["paid"], mine["in_progress"]}
    assert sorted(o["id"] for o in _walk(world, f"/api/agents/{agent.id}/orders", agent)) == sorted(mine.values())
    assert {o["id"] for o in api.ok("GET", f"/api/agents/{rival.id}/orders", rival)["items"]} == theirs
    # polling someone else: the same 404 as an agent id that names nothing, for agents
    status, body = api.get(f"/api/agents/{agent.id}/orders", rival)
    assert_error(status, body, 404, "not_found")
    assert (status, body) == api.get(f"/api/agents/{unknown_id('agt')}/orders", rival)
    assert api.get(f"/api/agents/{agent.id}/orders?status=paid", rival) == (status, body)
    # an agent's buyers cannot poll it either; an admin sees exactly that agent's orders
    assert api.get(f"/api/agents/{agent.id}/orders", world.buyer)[0] == 403
    assert {o["id"] for o in api.ok("GET", f"/api/agents/{agent.id}/orders", ADMIN)["items"]} == set(mine.values())
    # and the rival's orders stay invisible one by one
    for oid in theirs:
        assert api.get(f"/api/orders/{oid}", agent) == api.get(f"/api/orders/{unknown_id('ord')}", agent)


def test_the_order_list_is_buyers_only(world):
    """Agents poll their own route; the buyer list never becomes a way to see all orders."""
    for party in (world.agent, ADMIN):
        status, body = world.api.get("/api/orders", party)
        assert_error(status, body, 403, "forbidden")


# --- /internal: the service credential only ------------------------------------------------------

INTERNAL = {
    # headers (built from the settings' service token t)                       status
    "no header":                       (lambda t: {},                                             404),
    "empty service token":             (lambda t: {"X-Service-Token": ""},                         404),
    "wrong service token":             (lambda t: {"X-Service-Token": "wrong-" + t},               404),
    "service token prefix":            (lambda t: {"X-Service-Token": t[:-1]},                     404),
    "service token with a suffix":     (lambda t: {"X-Service-Token": t + "x"},                    404),
    "service token as bearer":         (lambda t: {"Authorization": f"Bearer {t}"},                404),
    "admin key":                       (lambda t: ADMIN.headers,                                   404),
    "admin key as service token":      (lambda t: {"X-Service-Token": ADMIN.token},                404),
    "right service token":             (lambda t: {"X-Service-Token": t},                          200),
    "right token, garbage bearer":     (lambda t: {"X-Service-Token": t, "Authorization": "Bearer x"}, 200),
}


@pytest.mark.parametrize("variant", list(INTERNAL))
def test_internal_order_route_needs_the_service_token(world, variant):
    build, expected = INTERNAL[variant]
    headers = build(world.settings.service_token)
    order = world.order_in("paid")
    status, body = world.call("GET", f"/internal/orders/{order['id']}", headers)
    if expected == 200:
        assert status == 200 and body["success"] is True, (status, body)
        assert body["data"] == {"id": order["id"], "status": "paid", "client_wallet": world.buyer.id,
                                "agent_id": world.agent.id, "paid": True}
        status, body = world.call("GET", f"/internal/orders/{unknown_id('ord')}", headers)
        assert_error(status, body, 404, "not_found")
    else:
        assert_error(status, body, 404, "not_found", variant)
        # and an existing order looks exactly like a missing one
        assert world.call("GET", f"/internal/orders/{unknown_id('ord')}", headers) == (status, body)


@pytest.mark.parametrize("party", ["buyer", "agent", "admin"])
def test_user_credentials_never_open_internal_routes(world, party):
    order = world.order_in("quoted")
    status, body = world.call("GET", f"/internal/orders/{order['id']}", party)
    assert_error(status, body, 404, "not_found", party)


# --- Idempotency-Key replays belong to the caller who made them ----------------------------------

def test_an_idempotency_key_never_replays_another_callers_response(world):
    order = world.order_in("quoted")
    key = {"Idempotency-Key": "same-key-" + secrets.token_hex(4)}
    path, body = f"/api/orders/{order['id']}", {"action": "accept"}
    first = world.api.call("PATCH", path, None, json=body, headers={**world.buyer.headers, **key})
    assert first[0] == 200
    for caller in ("other_buyer", "other_agent", "agent", "admin", "anonymous"):
        status, resp = world.call("PATCH", path, {**world.headers[caller], **key}, body)
        assert status in (401, 403, 404) and resp["success"] is False, (caller, status, resp)
        assert world.api.last.headers.get("Idempotent-Replayed") is None, caller
    # the owner's replay still works
    again = world.api.call("PATCH", path, None, json=body, headers={**world.buyer.headers, **key})
    assert again == first and world.api.last.headers.get("Idempotent-Replayed") == "true"


def test_anonymous_replays_are_not_shared_between_clients(world):
    """An agent's api_key is in the registration response: another client must never get it."""
    key = {"Idempotency-Key": "register-" + secrets.token_hex(4)}
    body = {"name": "Twin"}
    first = world.api.call("POST", "/api/agents", None, json=body, headers={**key, "X-Forwarded-For": "203.0.113.7"})
    second = world.api.call("POST", "/api/agents", None, json=body, headers={**key, "X-Forwarded-For": "198.51.100.9"})
    assert first[0] == second[0] == 201
    assert first[1]["data"]["api_key"] != second[1]["data"]["api_key"]


# --- the order view cache (GET /api/orders/<id> is served from Redis once warm) ------------------

def _forget_cached_views(world: World, order_id: str) -> None:
    cache = world.app.extensions["redis"]
    for key in cache.scan_iter(match=f"*{order_id}*"):
        cache.delete(key)


IMAGE_URL = "https://example.com/fox.png"


@pytest.mark.parametrize("warmed_by", ["nobody", "buyer", "agent", "admin", "other_buyer", "other_agent"])
def test_cached_order_views_show_each_caller_only_their_own_view(world, warmed_by):
    """Whoever read the order first, each caller then gets exactly their view: the buyer no image
    original before completion, strangers the 404 an unknown id gets."""
    order = world.order_in("paid")
    oid = order["id"]
    world.api.deliver(world.agent, oid, media_type="image", url=IMAGE_URL)
    _forget_cached_views(world, oid)
    if warmed_by != "nobody":
        world.call("GET", f"/api/orders/{oid}", warmed_by)
    expected_url = {"buyer": None, "agent": IMAGE_URL, "admin": IMAGE_URL}
    for _read in ("first", "second"):  # a miss (maybe) then a hit
        for caller in ("other_buyer", "other_agent", "buyer", "agent", "admin"):
            status, body = world.call("GET", f"/api/orders/{oid}", caller)
            if caller in expected_url:
                assert status == 200, (warmed_by, caller, status, body)
                assert body["data"]["deliveries"][0]["items"][0]["url"] == expected_url[caller], (warmed_by, caller, body)
                assert body["data"]["status"] == "delivered"
            else:
                assert_error(status, body, 404, "not_found", f"{caller} after {warmed_by} read")
                assert (status, body) == world.call("GET", f"/api/orders/{unknown_id('ord')}", caller)


def test_cached_order_views_follow_every_change(world):
    order = world.order_in("paid")
    oid = order["id"]
    world.api.deliver(world.agent, oid, media_type="image", url=IMAGE_URL)
    for caller in ("buyer", "agent", "admin"):  # warm every view
        world.call("GET", f"/api/orders/{oid}", caller)
    assert world.api.ok("PATCH", f"/api/orders/{oid}", world.buyer, json={"action": "approve"})["status"] == "completed"
    for caller in ("buyer", "agent", "admin"):
        data = world.call("GET", f"/api/orders/{oid}", caller)[1]["data"]
        assert data["status"] == "completed", (caller, data)
        assert data["deliveries"][0]["items"][0]["url"] == IMAGE_URL, caller  # completed: the buyer gets it now
    world.api.ok("POST", f"/api/orders/{oid}/review", world.buyer, json={"rating": 4})
    assert world.call("GET", f"/api/orders/{oid}", "buyer")[1]["data"]["review"]["rating"] == 4
    for caller in ("other_buyer", "other_agent"):
        assert world.call("GET", f"/api/orders/{oid}", caller)[0] == 404
