"""The Solana and Base payment verifiers against a local JSON-RPC node answering like a real one:
first the verifiers alone, then a buyer paying an order through the API."""
from __future__ import annotations

import threading
from decimal import Decimal

import pytest

from services.orders.chains import BaseVerifier, SolanaVerifier
from services.orders.payments import Expected
from shared import errors
from shared.settings import load
from tests.support.api import ApiClient
from tests.support.jsonrpc import (HttpReply, JsonRpcServer, RpcError, base_receipt, base_transaction,
                                   evm_address, evm_tx_hash, signature_statuses, solana_address,
                                   solana_signature, solana_transfer, transfer_log)
from tests.support.net import free_port

USDC_SOL = "EPjFWdd5AufqSSqeM2qN1xzybapC8G4wEGGkZwyTDt1v"
USDT_SOL = "Es9vMFrzaCERmJfrF4H2FYD4KCoNkY11McCe8BenwNYB"
USDC_BASE = "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"
DAI_BASE = "0x50c5725949A6F0c72E6C4a641F24049A917DB0Cb"
TREASURY_SOL = "9WzDXwBbmkg8ZTbNMqUxvQRAyrZzDsGYdLVL9zYtAWWM"
TREASURY_BASE = "0x4E8a1c1A0bC7fB7E2b1C9b1a6E3b8dD0cAfE0001"  # mixed case, as an operator may paste it
MIN_CONFIRMATIONS = 12
PRICE_CENTS = 4_500
PRICE_UNITS = PRICE_CENTS * 10_000
BUYER_SOL = solana_address()  # the order's buyer, as they signed in
BUYER_BASE = evm_address()


@pytest.fixture
def node():
    with JsonRpcServer() as server:
        yield server


def chain_settings(rpc_url: str, **overrides):
    return load({}, solana_rpc_url=rpc_url, base_rpc_url=rpc_url, treasury_solana=TREASURY_SOL,
                treasury_base=TREASURY_BASE, usdc_mint_solana=USDC_SOL, usdc_contract_base=USDC_BASE,
                base_min_confirmations=MIN_CONFIRMATIONS, chain_rpc_timeout_seconds=3.0, **overrides)


def refusal(call) -> errors.PaymentUnverified:
    with pytest.raises(errors.PaymentUnverified) as caught:
        call()
    assert caught.value.status == 402
    return caught.value


def closed_port_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


# --- Solana ---------------------------------------------------------------------------------------

SOL_EXPECTED = Expected(PRICE_CENTS, TREASURY_SOL, "USDC", "solana", BUYER_SOL)
FINALIZED = {"encoding": "jsonParsed", "commitment": "finalized", "maxSupportedTransactionVersion": 0}


def solana(node) -> SolanaVerifier:
    return SolanaVerifier(chain_settings(node.url))


@pytest.mark.parametrize("treasury_had", [0, 7_250_000_000], ids=["new-token-account", "treasury-already-held-usdc"])
def test_solana_accepts_a_finalized_usdc_transfer_of_the_price_to_the_treasury(node, treasury_had):
    sig = solana_signature()
    node.answers[("getTransaction", sig)] = solana_transfer(sig, USDC_SOL, BUYER_SOL, TREASURY_SOL,
                                                            PRICE_UNITS, to_had=treasury_had)
    solana(node).verify(None, sig, SOL_EXPECTED)
    assert node.calls == [("getTransaction", [sig, FINALIZED])]


def test_solana_treasury_may_be_its_usdc_token_account(node):
    """TREASURY_SOLANA set to the treasury's token account instead of its wallet: a transfer into
    that account pays; one into another token account of the same wallet does not."""
    treasury_account = solana_address()
    expected = Expected(PRICE_CENTS, treasury_account, "USDC", "solana", BUYER_SOL)
    sig = solana_signature()
    node.answers[("getTransaction", sig)] = solana_transfer(sig, USDC_SOL, BUYER_SOL, TREASURY_SOL, PRICE_UNITS,
                                                            to_account=treasury_account)
    solana(node).verify(None, sig, expected)
    other = solana_signature()
    node.answers[("getTransaction", other)] = solana_transfer(other, USDC_SOL, BUYER_SOL, TREASURY_SOL, PRICE_UNITS)
    error = refusal(lambda: solana(node).verify(None, other, expected))
    assert error.details == {"reason": "mismatch", "problems": ["destination is not the escrow treasury"]}


@pytest.mark.parametrize("mint, owner, amount, problem", [
    (USDC_SOL, TREASURY_SOL, PRICE_UNITS - 10_000, "amount does not match the quoted price"),
    (USDC_SOL, TREASURY_SOL, PRICE_UNITS + 1, "amount does not match the quoted price"),
    (USDT_SOL, TREASURY_SOL, PRICE_UNITS, "asset is not USDC"),
    (USDC_SOL, solana_address(), PRICE_UNITS, "destination is not the escrow treasury"),
], ids=["one-cent-short", "one-base-unit-over", "other-mint", "other-destination"])
def test_solana_refuses_a_transfer_that_does_not_pay_the_order(node, mint, owner, amount, problem):
    sig = solana_signature()
    node.answers[("getTransaction", sig)] = solana_transfer(sig, mint, BUYER_SOL, owner, amount)
    error = refusal(lambda: solana(node).verify(None, sig, SOL_EXPECTED))
    assert error.details == {"reason": "mismatch", "problems": [problem]}
    assert problem in error.message


def test_solana_refuses_the_price_paid_to_the_treasury_from_another_wallet(node):
    """Anyone can read a transfer to the treasury on chain; its hash pays only the sender's order."""
    sig = solana_signature()
    node.answers[("getTransaction", sig)] = solana_transfer(sig, USDC_SOL, solana_address(), TREASURY_SOL, PRICE_UNITS)
    error = refusal(lambda: solana(node).verify(None, sig, SOL_EXPECTED))
    assert error.details == {"reason": "mismatch", "problems": ["sender is not the buyer's wallet"]}


def test_solana_refuses_a_failed_transaction(node):
    sig = solana_signature()
    node.answers[("getTransaction", sig)] = solana_transfer(sig, USDC_SOL, BUYER_SOL, TREASURY_SOL,
                                                            PRICE_UNITS, err={"InstructionError": [0, {"Custom": 1}]})
    assert refusal(lambda: solana(node).verify(None, sig, SOL_EXPECTED)).details["reason"] == "failed_transaction"


@pytest.mark.parametrize("status, reason", [(None, "unknown_transaction"), ("processed", "not_final"),
                                            ("confirmed", "not_final")])
def test_solana_tells_an_unknown_transaction_from_one_not_final_yet(node, status, reason):
    sig = solana_signature()
    node.answers[("getTransaction", sig)] = None
    node.answers[("getSignatureStatuses", sig)] = signature_statuses(status)
    assert refusal(lambda: solana(node).verify(None, sig, SOL_EXPECTED)).details["reason"] == reason
    assert node.calls[1] == ("getSignatureStatuses", [[sig], {"searchTransactionHistory": True}])


@pytest.mark.parametrize("tx_hash", [
    "", "not a signature", "0x" + "ab" * 32, solana_address(), solana_signature() + "0",
    solana_signature()[:-1] + "l", " " + solana_signature(), "2" * 70, "z" * 88],
    ids=["empty", "words", "evm-hash", "32-bytes", "non-base58-0", "non-base58-l", "leading-space", "51-bytes",
         "65-bytes"])
def test_solana_refuses_a_malformed_signature_without_asking_the_node(node, tx_hash):
    assert refusal(lambda: solana(node).verify(None, tx_hash, SOL_EXPECTED)).details == {"reason": "malformed_hash"}
    assert node.calls == []


def test_solana_verifier_refuses_an_order_expecting_payment_on_base(node):
    error = refusal(lambda: solana(node).verify(None, solana_signature(), Expected(PRICE_CENTS, TREASURY_BASE,
                                                                                   "USDC", "base", BUYER_BASE)))
    assert error.details == {"reason": "mismatch", "problems": ["chain is solana, expected base"]}
    assert node.calls == []


# --- Base -----------------------------------------------------------------------------------------

BASE_EXPECTED = Expected(PRICE_CENTS, TREASURY_BASE.lower(), "USDC", "base", BUYER_BASE)
MINED_AT = 30_000_000


def base(node, **overrides) -> BaseVerifier:
    return BaseVerifier(chain_settings(node.url, **overrides))


def mined(node, logs, status="0x1", confirmations=MIN_CONFIRMATIONS) -> str:
    tx = evm_tx_hash()
    node.answers[("eth_getTransactionReceipt", tx)] = base_receipt(
        tx, MINED_AT, [dict(entry, transactionHash=tx) for entry in logs], evm_address(), USDC_BASE, status)
    node.answers["eth_blockNumber"] = hex(MINED_AT + confirmations - 1)
    return tx


def usdc_to(to, amount, contract=USDC_BASE, index=0, sender=BUYER_BASE):
    return transfer_log(contract, sender, to, amount, "0x", MINED_AT, index)


@pytest.mark.parametrize("logs", [
    [usdc_to(TREASURY_BASE, PRICE_UNITS)],
    [usdc_to(TREASURY_BASE, PRICE_UNITS - 1_000_000), usdc_to(TREASURY_BASE, 1_000_000, index=1)],
    [usdc_to(evm_address(), 10 ** 9), usdc_to(TREASURY_BASE, PRICE_UNITS, index=1)],
    [usdc_to(TREASURY_BASE, 10 ** 6, sender=evm_address()), usdc_to(TREASURY_BASE, PRICE_UNITS, index=1)],
], ids=["one-transfer", "two-transfers-summing-to-the-price", "alongside-a-transfer-elsewhere",
        "alongside-someone-elses-transfer-to-the-treasury"])
def test_base_accepts_usdc_transfers_of_the_price_to_the_treasury(node, logs):
    tx = mined(node, logs)
    base(node).verify(None, tx, BASE_EXPECTED)
    assert node.calls == [("eth_getTransactionReceipt", [tx]), ("eth_blockNumber", [])]


@pytest.mark.parametrize("logs, problem", [
    ([usdc_to(TREASURY_BASE, PRICE_UNITS - 10_000)], "amount does not match the quoted price"),
    ([usdc_to(TREASURY_BASE, PRICE_UNITS), usdc_to(TREASURY_BASE, 1, index=1)],
     "amount does not match the quoted price"),
    ([usdc_to(TREASURY_BASE, PRICE_UNITS, contract=DAI_BASE)], "asset is not USDC"),
    ([usdc_to(evm_address(), PRICE_UNITS)], "destination is not the escrow treasury"),
    ([], "no USDC transfer to the escrow treasury"),
    ([usdc_to(TREASURY_BASE, PRICE_UNITS, sender=evm_address())], "sender is not the buyer's wallet"),
    ([usdc_to(TREASURY_BASE, PRICE_UNITS - 10_000), usdc_to(TREASURY_BASE, 10_000, index=1, sender=evm_address())],
     "amount does not match the quoted price"),
], ids=["one-cent-short", "one-base-unit-over", "other-token", "other-destination", "no-transfer",
        "from-another-wallet", "topped-up-by-another-wallet"])
def test_base_refuses_a_transaction_that_does_not_pay_the_order(node, logs, problem):
    tx = mined(node, logs)
    error = refusal(lambda: base(node).verify(None, tx, BASE_EXPECTED))
    assert error.details == {"reason": "mismatch", "problems": [problem]}


def test_base_refuses_a_reverted_transaction(node):
    tx = mined(node, [usdc_to(TREASURY_BASE, PRICE_UNITS)], status="0x0")
    assert refusal(lambda: base(node).verify(None, tx, BASE_EXPECTED)).details["reason"] == "failed_transaction"


def test_base_tells_an_unknown_transaction_from_a_pending_one(node):
    unknown, pending = evm_tx_hash(), evm_tx_hash()
    node.answers["eth_getTransactionReceipt"] = None
    node.answers[("eth_getTransactionByHash", unknown)] = None
    node.answers[("eth_getTransactionByHash", pending)] = base_transaction(pending, evm_address(), USDC_BASE, None)
    assert refusal(lambda: base(node).verify(None, unknown, BASE_EXPECTED)).details["reason"] == "unknown_transaction"
    assert refusal(lambda: base(node).verify(None, pending, BASE_EXPECTED)).details["reason"] == "not_final"


def test_base_waits_for_the_configured_confirmations(node):
    shallow = mined(node, [usdc_to(TREASURY_BASE, PRICE_UNITS)], confirmations=MIN_CONFIRMATIONS - 1)
    error = refusal(lambda: base(node).verify(None, shallow, BASE_EXPECTED))
    assert error.details == {"reason": "not_final", "confirmations": MIN_CONFIRMATIONS - 1,
                             "required": MIN_CONFIRMATIONS}
    node.answers["eth_blockNumber"] = hex(MINED_AT + MIN_CONFIRMATIONS - 1)
    base(node).verify(None, shallow, BASE_EXPECTED)


@pytest.mark.parametrize("tx_hash", [
    "", "0x" + "ab" * 31, "0x" + "ab" * 33, "ab" * 32, "0x" + "AB" * 32, "0x" + "zz" * 32, solana_signature()],
    ids=["empty", "short", "long", "no-0x", "upper-case", "not-hex", "solana-signature"])
def test_base_refuses_a_malformed_hash_without_asking_the_node(node, tx_hash):
    assert refusal(lambda: base(node).verify(None, tx_hash, BASE_EXPECTED)).details == {"reason": "malformed_hash"}
    assert node.calls == []


# --- the node failing is not a refusal ----------------------------------------------------------

VERIFIERS = {"solana": (SolanaVerifier, solana_signature), "base": (BaseVerifier, evm_tx_hash)}
FIRST_CALL = {"solana": "getTransaction", "base": "eth_getTransactionReceipt"}


@pytest.mark.parametrize("chain", VERIFIERS)
def test_an_unreachable_node_is_service_unavailable(chain):
    make, new_hash = VERIFIERS[chain]
    with pytest.raises(errors.ServiceUnavailable) as caught:
        make(chain_settings(closed_port_url())).verify(None, new_hash(), SOL_EXPECTED if chain == "solana"
                                                       else BASE_EXPECTED)
    assert caught.value.status == 503 and caught.value.details == {"chain": chain}


@pytest.mark.parametrize("answer", [
    RpcError(-32005, "Node is behind by 1337 slots"),
    RpcError(-32000, "header not found"),
    HttpReply(502, b"<html>Bad Gateway</html>"),
    HttpReply(429, b'{"jsonrpc":"2.0","error":{"code":429,"message":"Too many requests"},"id":1}'),
    HttpReply(200, b"not json"),
    HttpReply(200, b'{"jsonrpc":"2.0","id":1}'),
], ids=["rpc-error-behind", "rpc-error-header", "http-502", "http-429", "garbage", "no-result"])
@pytest.mark.parametrize("chain", VERIFIERS)
def test_a_node_answering_an_error_is_service_unavailable(node, chain, answer):
    make, new_hash = VERIFIERS[chain]
    node.answers[FIRST_CALL[chain]] = answer
    with pytest.raises(errors.ServiceUnavailable) as caught:
        make(chain_settings(node.url)).verify(None, new_hash(), SOL_EXPECTED if chain == "solana" else BASE_EXPECTED)
    assert caught.value.details == {"chain": chain}
    assert node.methods() == [FIRST_CALL[chain]]


def test_a_node_answering_another_shape_is_service_unavailable(node):
    sig = solana_signature()
    node.answers[("getTransaction", sig)] = {"slot": 1, "meta": None}
    with pytest.raises(errors.ServiceUnavailable):
        solana(node).verify(None, sig, SOL_EXPECTED)


# --- through the API ----------------------------------------------------------------------------

def app_settings(chain: str, rpc_url: str) -> dict:
    return {"payment_verifier": chain, f"{chain}_rpc_url": rpc_url, "treasury_solana": TREASURY_SOL,
            "treasury_base": TREASURY_BASE, "base_min_confirmations": MIN_CONFIRMATIONS}


def accepted_order(api: ApiClient, chain: str):
    """A buyer on `chain` with an accepted order, and the payment instructions they are shown."""
    agent = api.agent()
    buyer = api.buyer(chain)
    order = api.walk(agent, buyer, api.order(buyer, api.service(agent, price_usd="45.00")), "accepted")
    payment = api.ok("GET", f"/api/orders/{order['id']}/payment", buyer)
    assert payment["chain"] == chain and payment["asset"] == "USDC"
    return buyer, order, payment


def pay_on_chain(node, chain: str, buyer, payment, units_off: int = 0) -> str:
    """Put on the node the transfer the buyer's wallet made following `payment`; return its hash."""
    units = int(Decimal(payment["amount_usd"]) * 100) * 10_000 + units_off
    if chain == "solana":
        sig = solana_signature()
        node.answers[("getTransaction", sig)] = solana_transfer(sig, USDC_SOL, buyer.id, payment["destination"], units)
        return sig
    tx = evm_tx_hash()
    logs = [transfer_log(USDC_BASE, buyer.id, payment["destination"], units, tx, MINED_AT)]
    node.answers[("eth_getTransactionReceipt", tx)] = base_receipt(tx, MINED_AT, logs, buyer.id, USDC_BASE)
    node.answers["eth_blockNumber"] = hex(MINED_AT + 40)
    return tx


def pay(api, buyer, order_id, tx, headers=None):
    return api.patch(f"/api/orders/{order_id}", buyer, json={"action": "pay", "escrow_tx_hash": tx}, headers=headers)


CHAINS = ["solana", "base"]


@pytest.mark.parametrize("chain", CHAINS)
def test_a_buyer_pays_an_order_with_a_chain_transfer(make_app, node, chain):
    api = ApiClient(make_app(**app_settings(chain, node.url)))
    buyer, order, payment = accepted_order(api, chain)
    assert payment["destination"] == (TREASURY_SOL if chain == "solana" else TREASURY_BASE)
    tx = pay_on_chain(node, chain, buyer, payment)

    status, body = pay(api, buyer, order["id"], tx)
    assert status == 200, body
    assert body["data"]["status"] == "paid" and body["data"]["escrow_tx_hash"] == tx
    # asked once, before the order was locked; the locked pay took that answer
    assert node.methods() == (["getTransaction"] if chain == "solana" else ["eth_getTransactionReceipt", "eth_blockNumber"])
    assert api.ok("GET", f"/api/orders/{order['id']}", buyer)["status"] == "paid"


@pytest.mark.parametrize("chain", CHAINS)
def test_a_transfer_that_does_not_pay_the_order_is_refused_and_changes_nothing(make_app, node, chain):
    api = ApiClient(make_app(**app_settings(chain, node.url)))
    buyer, order, payment = accepted_order(api, chain)
    short = pay_on_chain(node, chain, buyer, payment, units_off=-10_000)

    status, body = pay(api, buyer, order["id"], short)
    assert status == 402, body
    assert body["success"] is False and body["code"] == "payment_unverified"
    assert body["details"] == {"reason": "mismatch", "problems": ["amount does not match the quoted price"]}
    after = api.ok("GET", f"/api/orders/{order['id']}", buyer)
    assert (after["status"], after["escrow_tx_hash"], after["timeline"]) == ("accepted", None, order["timeline"])

    status, body = pay(api, buyer, order["id"], "0xnot-a-hash")
    assert (status, body["code"], body["details"]) == (402, "payment_unverified", {"reason": "malformed_hash"})

    status, body = pay(api, buyer, order["id"], pay_on_chain(node, chain, buyer, payment))
    assert status == 200 and body["data"]["status"] == "paid", body


def test_a_base_hash_pays_in_any_case_and_only_once(make_app, node):
    api = ApiClient(make_app(**app_settings("base", node.url)))
    buyer, order, payment = accepted_order(api, "base")
    tx = pay_on_chain(node, "base", buyer, payment)

    status, body = pay(api, buyer, order["id"], "0x" + tx[2:].upper())  # as some tools show it
    assert status == 200 and body["data"]["escrow_tx_hash"] == tx, body

    agent = api.agent()
    other = api.walk(agent, buyer, api.order(buyer, api.service(agent, price_usd="45.00")), "accepted")
    status, body = pay(api, buyer, other["id"], tx)
    assert (status, body["code"]) == (409, "payment_reused"), body


@pytest.mark.parametrize("chain", CHAINS)
def test_a_transfer_seen_on_chain_pays_only_its_senders_order(make_app, node, chain):
    api = ApiClient(make_app(**app_settings(chain, node.url)))
    alice, alices_order, alices_payment = accepted_order(api, chain)
    mallory, mallorys_order, mallorys_payment = accepted_order(api, chain)
    assert (alices_payment["from_wallet"], mallorys_payment["from_wallet"]) == (alice.id, mallory.id)
    alices_tx = pay_on_chain(node, chain, alice, alices_payment)

    status, body = pay(api, mallory, mallorys_order["id"], alices_tx)
    assert status == 402, body
    assert body["details"] == {"reason": "mismatch", "problems": ["sender is not the buyer's wallet"]}
    assert api.ok("GET", f"/api/orders/{mallorys_order['id']}", mallory)["status"] == "accepted"

    status, body = pay(api, alice, alices_order["id"], alices_tx)
    assert status == 200 and body["data"]["status"] == "paid", body


@pytest.mark.parametrize("headers", [None, {"Idempotency-Key": "pay-once"}], ids=["plain", "with-idempotency-key"])
@pytest.mark.parametrize("chain", CHAINS)
def test_a_slow_node_does_not_hold_the_order_locked(make_app, node, chain, headers):
    """While a pay waits for the node, the order can still change; the pay then finds it changed."""
    app = make_app(**app_settings(chain, node.url))
    api = ApiClient(app)
    buyer, order, payment = accepted_order(api, chain)
    tx = pay_on_chain(node, chain, buyer, payment)
    node.hold = threading.Event()
    answers = []
    paying = threading.Thread(target=lambda: answers.append(pay(ApiClient(app), buyer, order["id"], tx, headers)))
    paying.start()
    try:
        assert node.asked.wait(10), "the pay never asked the node"
        cancelled = api.ok("PATCH", f"/api/orders/{order['id']}", buyer, json={"action": "cancel"})
        assert cancelled["status"] == "cancelled"
        assert paying.is_alive()  # the cancel did not wait for the pay's answer from the node
    finally:
        node.hold.set()
        paying.join(30)
    (status, body), = answers
    assert (status, body["code"]) == (409, "invalid_transition"), body
    after = api.ok("GET", f"/api/orders/{order['id']}", buyer)
    assert (after["status"], after["escrow_tx_hash"]) == ("cancelled", None)


@pytest.mark.parametrize("chain", CHAINS)
def test_an_unreachable_node_is_503_and_the_buyer_can_retry_later(make_app, node, chain):
    down = ApiClient(make_app(**app_settings(chain, closed_port_url())))
    buyer, order, payment = accepted_order(down, chain)
    tx = pay_on_chain(node, chain, buyer, payment)

    status, body = pay(down, buyer, order["id"], tx)
    assert status == 503, body
    assert body["success"] is False and body["code"] == "service_unavailable" and body["details"] == {"chain": chain}
    after = down.ok("GET", f"/api/orders/{order['id']}", buyer)
    assert (after["status"], after["escrow_tx_hash"]) == ("accepted", None)

    back = ApiClient(make_app(**app_settings(chain, node.url)))  # the same database, the node reachable again
    status, body = pay(back, buyer, order["id"], tx)
    assert status == 200 and body["data"]["status"] == "paid", body


@pytest.mark.parametrize("chain", CHAINS)
def test_sandbox_transfers_do_not_exist_with_a_chain_verifier(make_app, node, chain):
    api = ApiClient(make_app(**app_settings(chain, node.url)))
    buyer, order, payment = accepted_order(api, chain)
    status, body = api.post("/api/sandbox/transfers", json={
        "from_wallet": buyer.id, "to": payment["destination"], "amount_usd": payment["amount_usd"],
        "asset": "USDC", "chain": chain})
    assert status == 404 and body["code"] == "not_found", body
    assert node.calls == []
