"""Wallet login, sessions, rate limits and Idempotency-Key, as a client experiences them."""
import time

import pytest

from shared.auth import sign_session
from tests.support.api import ApiClient, Party
from tests.support.wallets import BaseWallet, SolanaWallet


@pytest.mark.parametrize("wallet_cls", [SolanaWallet, BaseWallet])
def test_wallet_login_gives_a_session_that_places_orders(api, wallet_cls):
    wallet = wallet_cls.generate()
    challenge = api.ok("POST", "/api/auth/challenge", json={"wallet": wallet.address, "chain": wallet.chain})
    assert challenge["nonce"] in challenge["message"] and wallet.address.lower() in challenge["message"].lower()
    session = api.ok("POST", "/api/auth/session", json={
        "wallet": wallet.address, "chain": wallet.chain, "nonce": challenge["nonce"],
        "signature": wallet.sign(challenge["message"])})
    assert session["token"] and session["expires_at"].endswith("Z")
    agent, service, _ = api.setup()
    order = api.ok("POST", "/api/orders", Party(session["token"], wallet.address),
                   json={"service_id": service["id"], "brief": "A drawing of a fox."})
    assert order["client_wallet"] == wallet.address.lower() if wallet.chain == "base" else wallet.address


def test_a_nonce_works_once(api):
    wallet = SolanaWallet.generate()
    challenge = api.ok("POST", "/api/auth/challenge", json={"wallet": wallet.address, "chain": "solana"})
    body = {"wallet": wallet.address, "chain": "solana", "nonce": challenge["nonce"],
            "signature": wallet.sign(challenge["message"])}
    assert api.post("/api/auth/session", json=body)[0] == 201
    status, err = api.post("/api/auth/session", json=body)
    assert (status, err["code"]) == (401, "unauthenticated")


def test_a_wrong_signature_is_refused_and_burns_the_nonce(api):
    wallet, other = SolanaWallet.generate(), SolanaWallet.generate()
    challenge = api.ok("POST", "/api/auth/challenge", json={"wallet": wallet.address, "chain": "solana"})
    body = {"wallet": wallet.address, "chain": "solana", "nonce": challenge["nonce"],
            "signature": other.sign(challenge["message"])}
    assert api.post("/api/auth/session", json=body)[0] == 401
    body["signature"] = wallet.sign(challenge["message"])
    assert api.post("/api/auth/session", json=body)[0] == 401


def test_a_nonce_expires(make_app):
    api = ApiClient(make_app(nonce_ttl_seconds=1))
    wallet = SolanaWallet.generate()
    challenge = api.ok("POST", "/api/auth/challenge", json={"wallet": wallet.address, "chain": "solana"})
    time.sleep(2.1)
    status, _ = api.post("/api/auth/session", json={"wallet": wallet.address, "chain": "solana",
                                                    "nonce": challenge["nonce"],
                                                    "signature": wallet.sign(challenge["message"])})
    assert status == 401


def test_another_wallets_nonce_is_refused(api):
    wallet, thief = SolanaWallet.generate(), SolanaWallet.generate()
    challenge = api.ok("POST", "/api/auth/challenge", json={"wallet": wallet.address, "chain": "solana"})
    status, _ = api.post("/api/auth/session", json={"wallet": thief.address, "chain": "solana",
                                                    "nonce": challenge["nonce"],
                                                    "signature": thief.sign(challenge["message"])})
    assert status == 401


def test_expired_and_tampered_session_tokens_are_refused(api, settings):
    expired, _ = sign_session(settings.session_secret, "SomeWallet", "solana", ttl=-10)
    status, body = api.get("/api/orders", Party(expired, "SomeWallet"))
    assert (status, body["code"]) == (401, "unauthenticated")
    good, _ = sign_session(settings.session_secret, "SomeWallet", "solana", ttl=600)
    prefix, payload, mac = good.split(".")
    forged, _ = sign_session("another-secret", "VictimWallet", "solana", ttl=600)
    assert api.get("/api/orders", Party(forged, "VictimWallet"))[0] == 401
    assert api.get("/api/orders", Party(f"{prefix}.{forged.split('.')[1]}.{mac}", "x"))[0] == 401
    assert api.get("/api/orders", Party(good, "SomeWallet"))[0] == 200


def test_agent_keys_are_stored_hashed(api, db):
    from sqlalchemy import select
    from services.orders.models import Agent
    agent = api.agent()
    with db.transaction() as session:
        stored = session.scalars(select(Agent.api_key_hash)).all()
    assert agent.token not in stored and all(len(h) == 64 for h in stored)
    assert api.get("/api/agents/me", agent)[0] == 200


# --- rate limits ------------------------------------------------------------------------------

def test_rate_limit_per_caller_with_headers(make_app, frozen_window):
    api = ApiClient(make_app(rate_limits=True, rate_limit_per_minute=5, rate_limit_anonymous_per_minute=3))
    agent = api.agent()  # anonymous call 1
    seen = [api.get("/api/agents/me", agent) for _ in range(6)]
    assert [s for s, _ in seen] == [200] * 5 + [429]
    assert seen[-1][1]["code"] == "rate_limited"
    headers = api.last.headers
    assert headers["X-RateLimit-Limit"] == "5" and headers["X-RateLimit-Remaining"] == "0"
    assert headers["Retry-After"] == headers["X-RateLimit-Reset"] == "40"  # the window ends in 40 s
    # another caller has its own count
    other = api.agent("Other")
    assert api.get("/api/agents/me", other)[0] == 200
    assert api.last.headers["X-RateLimit-Remaining"] == "4"


def test_refused_credentials_count_against_the_address_and_end_in_429(make_app, frozen_window):
    """Guessing agent keys, session tokens or admin keys is limited like any anonymous caller."""
    api = ApiClient(make_app(rate_limits=True, rate_limit_per_minute=50, rate_limit_anonymous_per_minute=5))
    agent = api.agent()  # anonymous call 1 of 5
    guesses = [{"Authorization": "Bearer atl_" + "A" * 43}, {"Authorization": "Bearer ses.e30.bad"},
               {"Authorization": "Bearer not-an-admin-key"}, {"Authorization": "Basic Zm94OmZveA=="}]
    seen = [api.call("GET", "/api/agents/me", headers=headers) for headers in guesses]
    assert [(status, body["code"]) for status, body in seen] == [(401, "unauthenticated")] * 4
    assert api.last.headers["X-RateLimit-Remaining"] == "0"
    status, body = api.call("GET", "/api/agents/me", headers={"Authorization": "Bearer atl_" + "B" * 43})
    assert (status, body["code"]) == (429, "rate_limited") and api.last.headers["Retry-After"] == "40"
    assert api.get("/api/services")[0] == 429  # the address's anonymous calls share that budget
    assert api.get("/api/agents/me", agent)[0] == 200  # a caller with good credentials has its own


def test_rate_limits_are_shared_between_processes(make_app, frozen_window):
    """Two app instances (as two processes) share one count in Redis."""
    first = ApiClient(make_app(rate_limits=True, rate_limit_per_minute=4))
    second = ApiClient(make_app(rate_limits=True, rate_limit_per_minute=4))
    agent = first.agent()
    assert [first.get("/api/agents/me", agent)[0] for _ in range(2)] == [200, 200]
    assert [second.get("/api/agents/me", agent)[0] for _ in range(3)] == [200, 200, 429]


def test_a_windows_count_expires_with_the_window(redis_url, frozen_window):
    import redis

    from shared import ratelimit
    client = redis.Redis.from_url(redis_url)
    bucket = "ratelimit:agent:counted:1800000000"  # the frozen window's start
    client.delete(bucket)
    verdicts = [ratelimit.hit(client, "agent:counted", 2) for _ in range(3)]
    assert [(v.allowed, v.remaining) for v in verdicts] == [(True, 1), (True, 0), (False, 0)]
    assert int(client.get(bucket)) == 3
    assert 0 < client.ttl(bucket) <= 61  # gone once the window is over, whatever the count
    client.delete(bucket)


def test_rate_limits_off(make_app):
    api = ApiClient(make_app(rate_limits=False, rate_limit_anonymous_per_minute=1))
    assert all(api.get("/api/services")[0] == 200 for _ in range(5))


# --- idempotency ------------------------------------------------------------------------------

def test_same_key_same_body_replays_the_first_response(api):
    agent, service, buyer = api.setup()
    headers = {"Idempotency-Key": "order-1"}
    body = {"service_id": service["id"], "brief": "A drawing of a fox."}
    first = api.call("POST", "/api/orders", buyer, json=body, headers=headers)
    again = api.call("POST", "/api/orders", buyer, json=body, headers=headers)
    assert first[0] == again[0] == 201
    assert first[1]["data"]["id"] == again[1]["data"]["id"]
    assert api.last.headers.get("Idempotent-Replayed") == "true"
    assert len(api.ok("GET", "/api/orders", buyer)["items"]) == 1


def test_same_key_other_body_is_a_conflict(api):
    agent, service, buyer = api.setup()
    headers = {"Idempotency-Key": "order-2"}
    api.call("POST", "/api/orders", buyer, json={"service_id": service["id"], "brief": "A drawing of a fox."},
             headers=headers)
    status, body = api.call("POST", "/api/orders", buyer,
                            json={"service_id": service["id"], "brief": "A drawing of a cat."}, headers=headers)
    assert (status, body["code"]) == (409, "idempotency_conflict")
    assert len(api.ok("GET", "/api/orders", buyer)["items"]) == 1


def test_an_expired_key_starts_afresh(make_app):
    api = ApiClient(make_app(idempotency_ttl_seconds=1))
    agent, service, buyer = api.setup()
    headers = {"Idempotency-Key": "order-3"}
    body = {"service_id": service["id"], "brief": "A drawing of a fox."}
    first = api.call("POST", "/api/orders", buyer, json=body, headers=headers)
    time.sleep(1.2)
    again = api.call("POST", "/api/orders", buyer, json=body, headers=headers)
    assert first[0] == again[0] == 201
    assert first[1]["data"]["id"] != again[1]["data"]["id"] and "Idempotent-Replayed" not in api.last.headers
    replay = api.call("POST", "/api/orders", buyer, json=body, headers=headers)  # the new record replays now
    assert replay[1]["data"]["id"] == again[1]["data"]["id"] and api.last.headers.get("Idempotent-Replayed") == "true"
    assert len(api.ok("GET", "/api/orders", buyer)["items"]) == 2


def test_keys_are_per_caller(api):
    agent, service, buyer = api.setup()
    other = api.buyer()
    body = {"service_id": service["id"], "brief": "A drawing of a fox."}
    a = api.call("POST", "/api/orders", buyer, json=body, headers={"Idempotency-Key": "k"})
    b = api.call("POST", "/api/orders", other, json=body, headers={"Idempotency-Key": "k"})
    assert a[1]["data"]["id"] != b[1]["data"]["id"]


def test_a_replayed_transition_is_not_applied_twice(api):
    agent, buyer, order = api.order_in("delivered")
    headers = {"Idempotency-Key": "approve-1"}
    first = api.call("PATCH", f"/api/orders/{order['id']}", buyer, json={"action": "approve"}, headers=headers)
    second = api.call("PATCH", f"/api/orders/{order['id']}", buyer, json={"action": "approve"}, headers=headers)
    assert first[0] == second[0] == 200 and first[1] == second[1]
    assert api.ok("GET", f"/api/agents/{agent.id}")["completed_orders"] == 1


def test_a_session_checked_once_still_expires_and_still_needs_its_secret():
    """Verified tokens are remembered per process; the expiry and the secret still decide."""
    from shared.auth import verify_session
    token, expires = sign_session("secret-one", "WalletA", "solana", 60, now=1_000)
    assert verify_session("secret-one", token, now=1_010).id == "WalletA"
    assert verify_session("secret-one", token, now=1_010).id == "WalletA"  # from the cache
    assert verify_session("secret-one", token, now=expires + 1) is None
    assert verify_session("secret-two", token, now=1_010) is None  # a rotated secret ends it
    assert verify_session("secret-one", token + "x" * 600, now=1_010) is None
