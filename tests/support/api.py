"""A thin client over the orders app for tests: real HTTP semantics through Flask's test client,
plus helpers that walk an order to a given state the way a user would."""
from __future__ import annotations

from dataclasses import dataclass

from tests.support.wallets import BaseWallet, SolanaWallet

ADMIN_KEY = "dev-admin-key-change-me"


@dataclass
class Party:
    token: str
    id: str  # wallet for buyers, agent id for agents
    chain: str | None = None

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"}


ADMIN = Party(ADMIN_KEY, "admin")


class ApiClient:
    def __init__(self, app):
        self.app = app
        self.client = app.test_client()

    # raw calls: return (status, json body)
    def call(self, method: str, path: str, who: Party | None = None, json=None, headers=None, **kw):
        all_headers = dict(who.headers) if who else {}
        all_headers.update(headers or {})
        response = self.client.open(path, method=method, json=json, headers=all_headers, **kw)
        self.last = response
        return response.status_code, response.get_json(silent=True)

    def get(self, path, who=None, **kw):
        return self.call("GET", path, who, **kw)

    def post(self, path, who=None, json=None, **kw):
        return self.call("POST", path, who, json=json if json is not None else {}, **kw)

    def patch(self, path, who=None, json=None, **kw):
        return self.call("PATCH", path, who, json=json, **kw)

    def ok(self, method, path, who=None, json=None, expect=(200, 201)):
        status, body = self.call(method, path, who, json=json)
        assert status in (expect if isinstance(expect, tuple) else (expect,)), (status, body)
        return body["data"]

    def internal(self, method, path, json=None, expect=(200, 201)):
        """A service-to-service call, with the service credential."""
        token = self.app.config["SETTINGS"].service_token
        status, body = self.call(method, path, json=json, headers={"X-Service-Token": token})
        assert status in (expect if isinstance(expect, tuple) else (expect,)), (status, body)
        return body["data"]

    def report_payout(self, order_id: str, kind: str, status: str, version: int, **extra) -> dict:
        """What the payouts worker tells the orders service about an order's payout or refund."""
        settlement = self.ok("GET", f"/api/orders/{order_id}", ADMIN)[kind]
        return self.internal("POST", f"/internal/orders/{order_id}/settlements", json={
            "id": settlement["id"], "status": status, "version": version,
            "updated_at": "2026-11-29T10:00:00Z", **extra})

    def upload(self, agent: Party, content: bytes, name: str = "file.bin", expect=201):
        """POST /api/uploads as the agent, the way a browser or curl -F sends a file."""
        import io
        status, body = self.call("POST", "/api/uploads", agent, data={"file": (io.BytesIO(content), name)},
                                 content_type="multipart/form-data")
        assert status == expect, (status, body)
        return body["data"] if status < 300 else body

    # actors
    def agent(self, name="Agent Smith", **extra) -> Party:
        data = self.ok("POST", "/api/agents", json={"name": name, **extra})
        return Party(data["api_key"], data["agent"]["id"])

    def buyer(self, chain="solana") -> Party:
        wallet = SolanaWallet.generate() if chain == "solana" else BaseWallet.generate()
        challenge = self.ok("POST", "/api/auth/challenge", json={"wallet": wallet.address, "chain": chain})
        session = self.ok("POST", "/api/auth/session", json={
            "wallet": wallet.address, "chain": chain, "nonce": challenge["nonce"],
            "signature": wallet.sign(challenge["message"])})
        return Party(session["token"], wallet.address.lower() if chain == "base" else wallet.address, chain)

    def service(self, agent: Party, price_type="fixed", price_usd=None, **extra) -> dict:
        body = {"title": "Poster", "description": "A poster.", "price_type": price_type, **extra}
        if price_usd or price_type != "quote":
            body["price_usd"] = price_usd or "45.00"
        return self.ok("POST", "/api/services", agent, json=body)

    def order(self, buyer: Party, service: dict, brief="Please draw a red fox.") -> dict:
        return self.ok("POST", "/api/orders", buyer, json={"service_id": service["id"], "brief": brief})

    def transfer(self, buyer: Party, order_id: str, amount_usd: str | None = None, **override) -> str:
        payment = self.ok("GET", f"/api/orders/{order_id}/payment", buyer)
        body = {"from_wallet": buyer.id, "to": payment["destination"],
                "amount_usd": amount_usd or payment["amount_usd"], "asset": payment["asset"],
                "chain": payment["chain"], **override}
        return self.ok("POST", "/api/sandbox/transfers", json=body)["tx_hash"]

    def pay(self, buyer: Party, order_id: str) -> dict:
        tx = self.transfer(buyer, order_id)
        return self.ok("PATCH", f"/api/orders/{order_id}", buyer, json={"action": "pay", "escrow_tx_hash": tx})

    def deliver(self, agent: Party, order_id: str, media_type="link", url="https://example.com/result") -> dict:
        return self.ok("POST", f"/api/orders/{order_id}/deliver", agent,
                       json={"deliverables": [{"url": url, "media_type": media_type}]})

    def action(self, buyer: Party, order_id: str, action: str, **extra):
        return self.patch(f"/api/orders/{order_id}", buyer, json={"action": action, **extra})

    def setup(self, price_type="fixed", price_usd=None, **service_extra):
        """A fresh agent, service and buyer."""
        agent = self.agent()
        service = self.service(agent, price_type, price_usd, **service_extra)
        return agent, service, self.buyer()

    def order_in(self, state: str, price_type="fixed", **service_extra):
        """(agent, buyer, order) with a fresh order walked to `state` through the public API."""
        agent, service, buyer = self.setup("quote" if state == "pending_quote" else price_type, **service_extra)
        return agent, buyer, self.walk(agent, buyer, self.order(buyer, service), state)

    def walk(self, agent: Party, buyer: Party, order: dict, state: str) -> dict:
        """Take a just-placed order to `state` the way its buyer and agent would."""
        oid = order["id"]
        for step in WALKS[state]:
            if step == "quote":
                if order["status"] == "pending_quote":
                    order = self.ok("POST", f"/api/orders/{oid}/quote", agent, json={"price_usd": "45.00"})
            elif step == "pay":
                order = self.pay(buyer, oid)
            elif step == "start":
                order = self.ok("POST", f"/api/orders/{oid}/start", agent)
            elif step == "deliver":
                order = self.deliver(agent, oid)
            elif step == "revision":
                order = self.ok("PATCH", f"/api/orders/{oid}", buyer,
                                json={"action": "revision", "feedback": "More red."})
            else:
                order = self.ok("PATCH", f"/api/orders/{oid}", buyer, json={"action": step})
        assert order["status"] == state, order
        return order


WALKS = {
    "pending_quote": [],
    "quoted": ["quote"],
    "accepted": ["quote", "accept"],
    "paid": ["quote", "pay"],
    "in_progress": ["quote", "pay", "start"],
    "delivered": ["quote", "pay", "deliver"],
    "revision_requested": ["quote", "pay", "deliver", "revision"],
    "completed": ["quote", "pay", "deliver", "approve"],
    "disputed": ["quote", "pay", "deliver", "dispute"],
    "cancelled": ["cancel"],
}
