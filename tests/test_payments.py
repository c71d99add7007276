"""Paying an order with the sandbox verifier: the buyer follows the payment instructions, and a
transfer that does not pay this order (wrong amount, destination, asset, sender) is refused and
changes nothing. The chain verifiers apply the same rules (tests/test_chain_verifiers.py)."""
from __future__ import annotations

import pytest

WRONG_PAYER = "sender is not the buyer's wallet"


def accepted(api, price_usd="45.00"):
    agent, service, buyer = api.setup(price_usd=price_usd)
    return buyer, api.order(buyer, service)


def pay(api, buyer, order_id, tx):
    return api.patch(f"/api/orders/{order_id}", buyer, json={"action": "pay", "escrow_tx_hash": tx})


def assert_unpaid(api, buyer, order):
    after = api.ok("GET", f"/api/orders/{order['id']}", buyer)
    assert (after["status"], after["escrow_tx_hash"], after["due_at"], after["timeline"]) == \
        (order["status"], None, None, order["timeline"])


def test_the_instructions_name_the_amount_the_treasury_and_the_buyers_own_wallet(api, settings):
    buyer, order = accepted(api, "120.50")
    payment = api.ok("GET", f"/api/orders/{order['id']}/payment", buyer)
    assert payment == {"amount_usd": "120.50", "asset": "USDC", "chain": "solana",
                       "destination": settings.treasury_solana, "from_wallet": buyer.id}

    status, body = pay(api, buyer, order["id"], api.transfer(buyer, order["id"]))
    assert status == 200 and body["data"]["status"] == "paid", body


@pytest.mark.parametrize("override, problem", [
    ({"amount_usd": "44.99"}, "amount does not match the quoted price"),
    ({"amount_usd": "45.01"}, "amount does not match the quoted price"),
    ({"to": "9WzDXwBbmkg8ZTbNMqUxvQRAyrZzDsGYdLVL9zYtAWWM"}, "destination is not the escrow treasury"),
    ({"asset": "USDT"}, "asset is USDT, expected USDC"),
    ({"from_wallet": "Cm3gHvBvU2VNyqVMxA8k7iWpkJ3m1fCkYpTXQz3fPzmR"}, WRONG_PAYER),
], ids=["a-cent-short", "a-cent-over", "another-destination", "another-asset", "another-sender"])
def test_a_transfer_that_does_not_pay_the_order_is_402_and_changes_nothing(api, override, problem):
    buyer, order = accepted(api)
    tx = api.transfer(buyer, order["id"], **override)

    status, body = pay(api, buyer, order["id"], tx)
    assert status == 402, body
    assert (body["success"], body["code"]) == (False, "payment_unverified")
    assert body["details"] == {"reason": "mismatch", "problems": [problem]}
    assert problem in body["error"]
    assert_unpaid(api, buyer, order)


def test_an_unknown_hash_is_402(api):
    buyer, order = accepted(api)
    status, body = pay(api, buyer, order["id"], "sbx_" + "0" * 64)
    assert (status, body["code"], body["details"]) == (402, "payment_unverified", {"reason": "unknown_transaction"})
    assert_unpaid(api, buyer, order)


def test_someone_elses_transfer_pays_only_their_order(api):
    """A transfer to the treasury is public on a chain: whoever sees its hash first must not be
    able to pay their own order of the same price with it."""
    alice, alices_order = accepted(api)
    mallory, mallorys_order = accepted(api)
    alices_tx = api.transfer(alice, alices_order["id"])

    status, body = pay(api, mallory, mallorys_order["id"], alices_tx)
    assert status == 402, body
    assert body["details"] == {"reason": "mismatch", "problems": [WRONG_PAYER]}
    assert_unpaid(api, mallory, mallorys_order)

    status, body = pay(api, alice, alices_order["id"], alices_tx)
    assert status == 200 and body["data"]["escrow_tx_hash"] == alices_tx, body
