"""End to end: the real processes of `make run` (gunicorn services, Celery worker and beat, the
gateway), driven over HTTP through the gateway only."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import redis
import requests
from sqlalchemy import create_engine, text

from shared.db import normalize_url
from tests.support.net import free_port
from tests.support.wallets import SolanaWallet

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[1]
WEEK = 20  # seconds: a weekly workspace's period in this stack


@pytest.fixture(scope="module")
def stack():
    tmp = tempfile.mkdtemp(prefix="orderdesk-e2e-")
    database_url = os.environ.get("E2E_DATABASE_URL") or f"sqlite:///{tmp}/orders.db"
    if database_url.startswith("postgres"):
        engine = create_engine(normalize_url(database_url))
        with engine.begin() as conn:
            conn.execute(text("DROP SCHEMA public CASCADE"))
            conn.execute(text("CREATE SCHEMA public"))
        engine.dispose()
    ports = {name: free_port() for name in ("ORDERS_PORT", "MESSAGING_PORT", "GATEWAY_PORT",
                                              "EMBEDDED_REDIS_PORT")}
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL", "ORDERS_URL",
                                                            "MESSAGING_URL")}
    env.update({k: str(v) for k, v in ports.items()})
    env.update(DATABASE_URL=database_url, RATE_LIMITS="off", REVIEW_WINDOW_SECONDS="4",
               TIMER_SWEEP_SECONDS="1", OUTBOX_SWEEP_SECONDS="1", LOG_LEVEL="INFO",
               WORKSPACE_WEEKLY_SECONDS=str(WEEK), GENERATION_TIMEOUT_SECONDS="3", WORKSPACE_SWEEP_SECONDS="1",
               WEBHOOK_ALLOWED_HOSTS="127.0.0.1", WEBHOOK_RETRY_BASE_SECONDS="0.5", WEBHOOK_SWEEP_SECONDS="1")
    redis_url = os.environ.get("E2E_REDIS_URL")
    if redis_url:
        env["REDIS_URL"] = redis_url
        redis.Redis.from_url(redis_url).flushdb()
    else:
        redis_url = f"redis://127.0.0.1:{ports['EMBEDDED_REDIS_PORT']}/0"
    runner = subprocess.Popen([sys.executable, "-m", "services.run"], cwd=ROOT, env=env,
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    base = f"http://127.0.0.1:{ports['GATEWAY_PORT']}"
    output = []
    deadline = time.monotonic() + 90
    seed = None
    # the runner prints the seed's JSON once every process is healthy
    while time.monotonic() < deadline:
        line = runner.stdout.readline()
        if not line:
            break
        output.append(line)
        if "Ctrl-C stops everything" in line:
            text_out = "".join(output)
            seed = json.loads(text_out[text_out.index("Demo data:") + len("Demo data:"):
                                       text_out.index("Log in as a buyer")])
            break
    if seed is None:
        runner.kill()
        pytest.fail("the stack did not start:\n" + "".join(output) + (runner.stdout.read() or ""))
    yield {"base": base, "seed": seed, "redis_url": redis_url, "runner": runner,
           "env": {**env, "REDIS_URL": redis_url, "ORDERS_URL": f"http://127.0.0.1:{ports['ORDERS_PORT']}"}}
    runner.send_signal(signal.SIGTERM)
    try:
        assert runner.wait(30) == 0, "Ctrl-C/SIGTERM should stop everything cleanly"
    finally:
        if runner.poll() is None:
            runner.kill()


class Gateway:
    def __init__(self, base):
        self.base = base
        self.http = requests.Session()

    def call(self, method, path, token=None, expect=None, headers=None, **kw):
        headers = dict(headers or {})
        if token:
            headers["Authorization"] = f"Bearer {token}"
        response = self.http.request(method, self.base + path, headers=headers, timeout=30, **kw)
        body = response.json()
        if expect is not None:
            assert response.status_code == expect, (method, path, response.status_code, body)
        return response.status_code, body

    def ok(self, method, path, token=None, expect=200, **kw):
        return self.call(method, path, token, expect=expect, **kw)[1]["data"]

    def buyer(self):
        wallet = SolanaWallet.generate()
        challenge = self.ok("POST", "/api/auth/challenge", expect=201,
                            json={"wallet": wallet.address, "chain": "solana"})
        session = self.ok("POST", "/api/auth/session", expect=201, json={
            "wallet": wallet.address, "chain": "solana", "nonce": challenge["nonce"],
            "signature": wallet.sign(challenge["message"])})
        return wallet.address, session["token"]

    def pay(self, token, wallet, oid):
        payment = self.ok("GET", f"/api/orders/{oid}/payment", token)
        tx = self.ok("POST", "/api/sandbox/transfers", expect=201, json={
            "from_wallet": wallet, "to": payment["destination"], "amount_usd": payment["amount_usd"],
            "asset": payment["asset"], "chain": payment["chain"]})["tx_hash"]
        return self.ok("PATCH", f"/api/orders/{oid}", token, json={"action": "pay", "escrow_tx_hash": tx})


def _wait_for(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    return predicate()


def test_a_quote_order_from_placement_to_review_through_the_gateway(stack):
    gw = Gateway(stack["base"])
    agent = gw.ok("POST", "/api/agents", expect=201, json={"name": "E2E Agent"})
    agent_key, agent_id = agent["api_key"], agent["agent"]["id"]
    service = gw.ok("POST", "/api/services", agent_key, expect=201, json={
        "title": "Logo", "description": "A logo", "price_type": "quote"})
    wallet, buyer = gw.buyer()
    order = gw.ok("POST", "/api/orders", buyer, expect=201,
                  json={"service_id": service["id"], "brief": "A logo for a bakery."})
    oid = order["id"]
    # messaging stays closed until payment (and the gateway routes the messages path to messaging)
    status, body = gw.call("GET", f"/api/orders/{oid}/messages", buyer)
    assert (status, body["code"]) == (409, "messaging_closed")

    assert gw.ok("POST", f"/api/orders/{oid}/quote", agent_key, json={"price_usd": "80.00"})["status"] == "quoted"
    assert gw.pay(buyer, wallet, oid)["status"] == "paid"
    polled = gw.ok("GET", f"/api/agents/{agent_id}/orders?status=paid,in_progress", agent_key)
    assert [o["id"] for o in polled["items"]] == [oid]
    gw.ok("POST", f"/api/orders/{oid}/start", agent_key)
    gw.ok("POST", f"/api/orders/{oid}/deliver", agent_key,
          json={"deliverable_url": "https://example.com/logo.svg", "deliverable_media_type": "document"})
    done = gw.ok("PATCH", f"/api/orders/{oid}", buyer, json={"action": "approve"})
    assert done["status"] == "completed"
    assert [t["action"] for t in done["timeline"]] == ["create", "quote", "accept", "pay", "start", "deliver",
                                                       "approve"]
    gw.ok("POST", f"/api/orders/{oid}/review", buyer, expect=201, json={"rating": 5, "comment": "Great"})
    profile = gw.ok("GET", f"/api/agents/{agent_id}")
    assert (profile["avg_rating"], profile["completed_orders"], profile["review_count"]) == ("5.00", 1, 1)

    # the completion reached the payouts worker through the outbox; this agent has no payout wallet
    # yet, so the payout waits, blocked, and goes out by itself once the agent sets one
    blocked = _wait_for(lambda: gw.ok("GET", f"/api/orders/{oid}", agent_key)["payout"]["status"] == "blocked",
                        timeout=60)
    assert blocked
    gw.ok("PATCH", "/api/agents/me", agent_key,
          json={"payout_wallet": SolanaWallet.generate().address, "payout_chain": "solana"})
    payout = _wait_for(lambda: (p := gw.ok("GET", f"/api/orders/{oid}", agent_key)["payout"])["status"] == "sent"
                       and p, timeout=60)
    assert payout and (payout["amount_usd"], payout["fee_usd"]) == ("72.00", "8.00") and payout["tx_ref"]
    assert gw.ok("GET", f"/api/orders/{oid}", buyer)["payout"] is None


def test_a_fixed_price_order_through_dispute_and_split(stack):
    gw = Gateway(stack["base"])
    seed = stack["seed"]
    wallet, buyer = gw.buyer()
    order = gw.ok("POST", "/api/orders", buyer, expect=201,
                  json={"service_id": seed["services"]["fixed"], "brief": "A poster for a concert."})
    oid = order["id"]
    assert order["status"] == "quoted" and order["quoted_price_usd"] == "45.00"
    gw.pay(buyer, wallet, oid)
    gw.ok("POST", f"/api/orders/{oid}/deliver", seed["agent_api_key"],
          json={"deliverables": [{"url": "https://example.com/poster.png", "media_type": "image"}]})
    assert gw.ok("GET", f"/api/orders/{oid}", buyer)["deliveries"][0]["items"][0]["url"] is None
    gw.ok("PATCH", f"/api/orders/{oid}", buyer, json={"action": "dispute", "reason": "Wrong band name."})
    status, body = gw.call("POST", f"/api/admin/orders/{oid}/resolve", seed["admin_api_key"], json={
        "outcome": "split", "agent_amount_usd": "30.00", "buyer_amount_usd": "16.00", "note": "Half fixed"})
    assert (status, body["code"]) == (400, "validation_error")  # 30 + 16 is not the 45 held
    resolved = gw.ok("POST", f"/api/admin/orders/{oid}/resolve", seed["admin_api_key"], json={
        "outcome": "split", "agent_amount_usd": "30.00", "buyer_amount_usd": "15.00", "note": "Half fixed"})
    assert resolved["status"] == "completed"
    assert resolved["timeline"][-1]["action"] == "resolve" and "split" in resolved["timeline"][-1]["note"]
    # both parts go out: the agent's 30.00 less the fee, the buyer's 15.00
    admin = seed["admin_api_key"]
    done = _wait_for(lambda: (o := gw.ok("GET", f"/api/orders/{oid}", admin))["payout"]["status"] == "sent"
                     and o["refund"]["status"] == "sent" and o, timeout=60)
    assert done and (done["payout"]["amount_usd"], done["payout"]["fee_usd"]) == ("27.00", "3.00")
    assert done["refund"]["amount_usd"] == "15.00"
    assert gw.ok("GET", f"/api/orders/{oid}", buyer)["refund"]["status"] == "sent"
    # and the books agree with the orders and the rail
    reconciled = subprocess.run([sys.executable, "-m", "services.payouts.reconcile"], cwd=ROOT, env=stack["env"],
                                capture_output=True, text=True, timeout=120)
    assert reconciled.returncode == 0, reconciled.stdout + reconciled.stderr
    assert "0 mismatches" in reconciled.stdout


def test_beat_and_the_worker_auto_complete_after_the_review_window(stack):
    gw = Gateway(stack["base"])
    seed = stack["seed"]
    wallet, buyer = gw.buyer()
    oid = gw.ok("POST", "/api/orders", buyer, expect=201,
                json={"service_id": seed["services"]["fixed"], "brief": "Another poster please."})["id"]
    gw.pay(buyer, wallet, oid)
    gw.ok("POST", f"/api/orders/{oid}/deliver", seed["agent_api_key"],
          json={"deliverables": [{"url": "https://example.com/p.txt", "media_type": "text"}]})
    # the review window is 4 s here; beat sweeps timers every second
    final = _wait_for(lambda: (o := gw.ok("GET", f"/api/orders/{oid}", buyer))["status"] == "completed" and o,
                      timeout=30)
    assert final and final["timeline"][-1]["action"] == "auto_complete"
    assert final["timeline"][-1]["actor_type"] == "system"


def test_buyer_and_agent_exchange_messages_through_the_gateway_after_payment(stack):
    gw = Gateway(stack["base"])
    seed = stack["seed"]
    agent = seed["agent_api_key"]
    wallet, buyer = gw.buyer()
    oid = gw.ok("POST", "/api/orders", buyer, expect=201,
                json={"service_id": seed["services"]["fixed"], "brief": "A poster, and a question."})["id"]
    status, body = gw.call("POST", f"/api/orders/{oid}/messages", buyer, json={"content": "Too early?"})
    assert (status, body["code"]) == (409, "messaging_closed")
    gw.pay(buyer, wallet, oid)
    # the agent listens live through the gateway while the buyer writes
    with requests.get(f"{stack['base']}/api/orders/{oid}/messages/stream", stream=True, timeout=(3, 30),
                      headers={"Authorization": f"Bearer {agent}"}) as stream:
        assert stream.status_code == 200 and stream.headers["Content-Type"].startswith("text/event-stream")
        lines = stream.iter_lines(chunk_size=None, decode_unicode=True)
        assert next(lines).startswith("retry:")  # subscribed
        sent = gw.ok("POST", f"/api/orders/{oid}/messages", buyer, expect=201, json={"content": "Can it be blue?"})
        data = next(line for line in lines if line.startswith("data:"))
        assert json.loads(data[len("data:"):]) == sent
    reply = gw.ok("POST", f"/api/orders/{oid}/messages", agent, expect=201, json={"content": "Blue it is."})
    page = gw.ok("GET", f"/api/orders/{oid}/messages", buyer)
    assert [(m["sender_type"], m["content"]) for m in page["items"]] == [("client", "Can it be blue?"),
                                                                         ("agent", "Blue it is.")]
    assert page["unread_count"] == 0 and page["items"][1]["id"] == reply["id"]
    assert gw.ok("GET", f"/api/orders/{oid}/messages", agent)["items"][1]["read_at"] is not None


def test_the_gateway_never_exposes_internal_routes(stack):
    gw = Gateway(stack["base"])
    for path in ("/internal/orders/ord_x", "/api/../internal/orders/ord_x", "/%69nternal/orders/x"):
        status, body = gw.call("GET", path, headers={"X-Service-Token": "dev-service-token-change-me"})
        assert status == 404 and body["success"] is False
    doc = gw.http.get(stack["base"] + "/api/openapi.json", timeout=30).json()
    assert "/api/orders/{order_id}" in doc["paths"] and "/api/orders/{order_id}/messages" in doc["paths"]


def test_each_gunicorn_answers_on_a_control_socket_of_its_own(stack):
    """`gunicornc` reaches each web process of the runner by its port, each with its own workers."""
    gunicornc = Path(sys.executable).parent / "gunicornc"
    env = stack["env"]
    for port, workers in ((env["ORDERS_PORT"], 2), (env["MESSAGING_PORT"], 2), (env["GATEWAY_PORT"], 1)):
        answer = subprocess.run([str(gunicornc), "-s", str(ROOT / "var" / "run" / f"gunicorn-{port}.ctl"),
                                 "-c", "show workers", "-j"], capture_output=True, text=True, timeout=30)
        assert answer.returncode == 0, answer.stderr
        assert json.loads(answer.stdout)["count"] == workers


def test_an_uploaded_image_is_previewed_by_the_media_worker_and_its_original_gated(stack):
    import io
    from PIL import Image
    gw = Gateway(stack["base"])
    seed = stack["seed"]
    agent_key = seed["agent_api_key"]
    wallet, buyer = gw.buyer()
    oid = gw.ok("POST", "/api/orders", buyer, expect=201,
                json={"service_id": seed["services"]["fixed"], "brief": "A photo of a red fox."})["id"]
    gw.pay(buyer, wallet, oid)
    original = io.BytesIO()
    Image.new("RGB", (1600, 1200), (180, 40, 30)).save(original, "JPEG", quality=90)
    upload = gw.ok("POST", "/api/uploads", agent_key, expect=201,
                   files={"file": ("fox.jpg", original.getvalue(), "application/octet-stream")})
    assert (upload["media_type"], upload["content_type"]) == ("image", "image/jpeg")
    gw.ok("POST", f"/api/orders/{oid}/deliver", agent_key,
          json={"deliverables": [{"upload_id": upload["upload_id"], "media_type": "image"}]})

    def item(token):
        return gw.ok("GET", f"/api/orders/{oid}", token)["deliveries"][0]["items"][0]
    ready = _wait_for(lambda: (i := item(buyer))["preview_status"] == "ready" and i, timeout=60)
    assert ready, item(agent_key)
    assert ready["url"] is None  # the buyer waits for the original
    preview = gw.http.get(stack["base"] + ready["preview_url"], timeout=30)
    assert preview.status_code == 200 and preview.headers["Content-Type"] == "image/jpeg"
    image = Image.open(io.BytesIO(preview.content))
    assert max(image.size) == 1024 and image.size[0] > image.size[1]
    agents_link = item(agent_key)["url"]
    refused = gw.http.get(stack["base"] + agents_link, headers={"Authorization": f"Bearer {buyer}"}, timeout=30)
    assert refused.status_code == 403

    gw.ok("PATCH", f"/api/orders/{oid}", buyer, json={"action": "approve"})
    got = gw.http.get(stack["base"] + item(buyer)["url"], timeout=30)
    assert got.status_code == 200 and got.content == original.getvalue()


def test_a_weekly_workspace_with_the_real_workspaces_worker_and_beat(stack):
    """generate → the worker dispatches to the agent → one answer, one timeout (its unit back) →
    beat closes the workspace at its period's end → the answer is the delivery → approve."""
    gw = Gateway(stack["base"])
    agent = gw.ok("POST", "/api/agents", expect=201, json={"name": "Workspace Agent"})
    key, aid = agent["api_key"], agent["agent"]["id"]
    service = gw.ok("POST", "/api/services", key, expect=201, json={
        "title": "Weekly foxes", "description": "Fox pictures all week.", "price_type": "weekly",
        "price_usd": "25.00", "quota_limit": 2})
    wallet, buyer = gw.buyer()
    oid = gw.ok("POST", "/api/orders", buyer, expect=201,
                json={"service_id": service["id"], "brief": "Foxes, every day this week."})["id"]
    order = gw.pay(buyer, wallet, oid)
    assert order["status"] == "in_progress" and order["workspace"]["quota_total"] == 2
    answered, ignored = (gw.ok("POST", f"/api/orders/{oid}/generate", buyer, expect=202,
                               json={"prompt": prompt})["generation"] for prompt in ("A fox.", "Two foxes."))
    status, body = gw.call("POST", f"/api/orders/{oid}/generate", buyer, json={"prompt": "Three foxes."})
    assert (status, body["code"]) == (409, "quota_exhausted")

    def pending():
        return gw.ok("GET", f"/api/agents/{aid}/generations?status=pending", key)["items"]
    assert _wait_for(lambda: len(pending()) == 2, timeout=10), "the workspaces worker did not dispatch"
    import io
    from PIL import Image
    picture = io.BytesIO()
    Image.new("RGB", (1200, 800), (200, 90, 20)).save(picture, "JPEG")
    upload = gw.ok("POST", "/api/uploads", key, expect=201, files={"file": ("fox.jpg", picture.getvalue())})
    gw.ok("POST", f"/api/orders/{oid}/generations/{answered['id']}", key,
          json={"upload_id": upload["upload_id"], "media_type": "image"})

    def generations():
        return {g["id"]: g for g in gw.ok("GET", f"/api/orders/{oid}/generations", buyer)["items"]}
    # the media worker renders the result's watermarked preview; the buyer gets only that
    result = _wait_for(lambda: (r := generations()[answered["id"]]["result"])["preview_status"] == "ready" and r,
                       timeout=30)
    assert result and result["url"] is None
    assert gw.http.get(stack["base"] + result["preview_url"], timeout=30).status_code == 200
    assert _wait_for(lambda: generations()[ignored["id"]]["status"] == "timed_out", timeout=10)
    workspace = gw.ok("GET", f"/api/orders/{oid}", buyer)["workspace"]
    assert (workspace["quota_used"], workspace["generations_pending"]) == (1, 0)  # the timed-out unit is back

    delivered = _wait_for(lambda: (o := gw.ok("GET", f"/api/orders/{oid}", buyer))["status"] == "delivered" and o,
                          timeout=WEEK + 15)
    assert delivered, "beat and the worker did not close the workspace"
    [item] = delivered["deliveries"][0]["items"]
    assert (item["id"], item["url"], item["preview_status"]) == (result["id"], None, "ready")
    assert delivered["timeline"][-1]["action"] == "close_workspace"
    assert gw.ok("PATCH", f"/api/orders/{oid}", buyer, json={"action": "approve"})["status"] == "completed"
    original = gw.ok("GET", f"/api/orders/{oid}", buyer)["deliveries"][0]["items"][0]["url"]
    assert gw.http.get(stack["base"] + original, timeout=30).content == picture.getvalue()


def test_webhooks_and_buyer_notifications_with_the_real_workers(stack):
    """The webhooks worker POSTs each event, signed, to the agent's endpoint (retrying a 503); the
    default worker turns the quote into the buyer's notification."""
    from tests.support.receiver import Receiver
    from tests.test_webhooks import docs_verify
    receiver = Receiver(script=[503])
    try:
        gw = Gateway(stack["base"])
        created = gw.ok("POST", "/api/agents", expect=201, json={"name": "Hooked", "endpoint_url": receiver.url})
        key, secret = created["api_key"], created["webhook_secret"]
        service = gw.ok("POST", "/api/services", key, expect=201,
                        json={"title": "Logo", "description": "A logo", "price_type": "quote"})
        wallet, buyer = gw.buyer()
        oid = gw.ok("POST", "/api/orders", buyer, expect=201,
                    json={"service_id": service["id"], "brief": "A logo for a bakery."})["id"]
        gw.ok("POST", f"/api/orders/{oid}/quote", key, json={"price_usd": "80.00"})
        gw.pay(buyer, wallet, oid)
        assert _wait_for(lambda: {"order.created", "order.quoted", "order.paid"} <= set(receiver.events()), 20), \
            receiver.events()
        verify = docs_verify()
        assert all(verify(secret, r.body, r.headers["X-Webhook-Signature"]) for r in receiver.received)
        log = gw.ok("GET", "/api/agents/me/webhook-deliveries", key)["items"]
        assert _wait_for(lambda: {d["status"] for d in gw.ok("GET", "/api/agents/me/webhook-deliveries",
                                                              key)["items"]} == {"delivered"}, 20), log
        assert max(d["attempts"] for d in gw.ok("GET", "/api/agents/me/webhook-deliveries", key)["items"]) == 2
        feed = gw.ok("GET", "/api/agents/me/events", key)["items"]
        assert [e["position"] for e in feed] == sorted(e["position"] for e in feed)
        # positions follow the order the worker recorded them in (four at once here); the order's
        # own `sequence` is what puts its events in order, as docs/webhooks.md says
        assert [e["event"] for e in sorted(feed, key=lambda e: e["sequence"])][:3] == [
            "order.created", "order.quoted", "order.paid"]
        told = _wait_for(lambda: gw.ok("GET", "/api/notifications", buyer)["items"], 20)
        assert told and told[0]["kind"] == "quoted" and "80.00" in told[0]["text"]
    finally:
        receiver.close()
