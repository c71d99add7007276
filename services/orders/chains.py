"""On-chain payment verifiers: ask a Solana or Base JSON-RPC node whether a transaction paid an order.

A node that cannot answer is the network's problem, not the buyer's: that is 503 (retry later),
never a refusal of the payment."""
from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING

import base58
import requests
from sqlalchemy.orm import Session

from shared import errors
from shared.internal import ThreadSessions
from shared.settings import Settings

if TYPE_CHECKING:
    from .payments import Expected

log = logging.getLogger(__name__)

USDC_UNITS_PER_CENT = 10_000  # USDC has 6 decimals
TRANSFER_TOPIC = "0xddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef"

WRONG_PAYER = "sender is not the buyer's wallet"

_BASE58 = re.compile(r"[1-9A-HJ-NP-Za-km-z]{64,88}")
# lower case only (the pay action lowers a Base hash first), so "0xAB.." and "0xab.." are one hash
_EVM_TX_HASH = re.compile(r"0x[0-9a-f]{64}")


class JsonRpc:
    """The few JSON-RPC calls the verifiers make; any failure to get a result is ServiceUnavailable."""

    def __init__(self, url: str, chain: str, timeout: float):
        self.url, self.chain, self.timeout = url, chain, timeout
        self._sessions = ThreadSessions()

    def call(self, method: str, params: list):
        try:
            response = self._sessions.get().post(self.url, json={"jsonrpc": "2.0", "id": 1, "method": method,
                                                            "params": params}, timeout=self.timeout)
        except requests.RequestException as exc:
            raise self.unavailable(f"{method}: {exc.__class__.__name__}") from exc
        if response.status_code != 200:
            raise self.unavailable(f"{method}: HTTP {response.status_code}")
        try:
            body = response.json()
        except ValueError:
            raise self.unavailable(f"{method}: the answer is not JSON") from None
        if not isinstance(body, dict) or body.get("error") is not None or "result" not in body:
            raise self.unavailable(f"{method}: {str(body.get('error') if isinstance(body, dict) else body)[:200]}")
        return body["result"]

    def unavailable(self, why: str) -> errors.ServiceUnavailable:
        log.warning("%s RPC unavailable: %s", self.chain, why)
        return errors.ServiceUnavailable("The payment network could not be reached; retry later.",
                                         {"chain": self.chain})


def _refuse(message: str, reason: str, **details) -> errors.PaymentUnverified:
    return errors.PaymentUnverified(message, {"reason": reason, **details})


def _mismatch(problems: list[str]) -> errors.PaymentUnverified:
    return errors.PaymentUnverified("The transaction does not pay this order: " + "; ".join(problems) + ".",
                                    {"reason": "mismatch", "problems": problems})


class _ChainVerifier:
    """What both chains share: refuse what cannot be a payment of this order before asking a node."""

    name = ""

    def verify(self, session: Session, tx_hash: str, expected: Expected) -> None:
        if expected.chain != self.name:
            raise _mismatch([f"chain is {self.name}, expected {expected.chain}"])
        if not self._well_formed(tx_hash):
            raise _refuse(self.malformed_message, "malformed_hash")
        try:
            self._check(tx_hash, expected)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
            # the node answered something of another shape than its API's: not the buyer's fault
            raise self.rpc.unavailable(f"unexpected answer ({exc.__class__.__name__}: {exc})") from exc


class SolanaVerifier(_ChainVerifier):
    """A finalized transaction whose token balances show the treasury's USDC going up by the price,
    out of the buyer's own account. The treasury (TREASURY_SOLANA) is its wallet or its USDC token
    account: a transfer to either pays."""

    name = "solana"
    malformed_message = "That is not a Solana transaction signature."

    def __init__(self, settings: Settings):
        self.mint = settings.usdc_mint_solana
        self.rpc = JsonRpc(settings.solana_rpc_url, self.name, settings.chain_rpc_timeout_seconds)

    @staticmethod
    def _well_formed(tx_hash: str) -> bool:
        return isinstance(tx_hash, str) and bool(_BASE58.fullmatch(tx_hash)) and len(base58.b58decode(tx_hash)) == 64

    def _check(self, tx_hash: str, expected: Expected) -> None:
        tx = self.rpc.call("getTransaction", [tx_hash, {"encoding": "jsonParsed", "commitment": "finalized",
                                                        "maxSupportedTransactionVersion": 0}])
        if tx is None:
            status = self.rpc.call("getSignatureStatuses", [[tx_hash], {"searchTransactionHistory": True}])["value"][0]
            if status is None:
                raise _refuse("No such transaction on Solana.", "unknown_transaction")
            # finalized but not yet served by getTransaction is a moment away too
            raise _refuse("The transaction is not final yet; retry in a minute.", "not_final",
                          confirmation_status=status.get("confirmationStatus"))
        meta = tx["meta"]
        if meta["err"] is not None:
            raise _refuse("The transaction failed on Solana.", "failed_transaction")
        # the treasury may be configured as its wallet or as its USDC token account: each token
        # account's change counts for the account itself and for the wallet that owns it
        accounts = [key["pubkey"] if isinstance(key, dict) else key
                    for key in tx["transaction"]["message"]["accountKeys"]]
        received: dict[tuple[str, str], int] = {}  # (holder, mint) -> base units gained
        for sign, key in ((-1, "preTokenBalances"), (1, "postTokenBalances")):
            for entry in meta.get(key) or []:
                for holder in {entry.get("owner"), accounts[entry["accountIndex"]]}:
                    received[(holder, entry["mint"])] = (received.get((holder, entry["mint"]), 0)
                                                         + sign * int(entry["uiTokenAmount"]["amount"]))
        to_treasury = received.get((expected.destination, self.mint), 0)
        if to_treasury > 0:
            if to_treasury != expected.amount_cents * USDC_UNITS_PER_CENT:
                raise _mismatch(["amount does not match the quoted price"])
            if -received.get((expected.payer, self.mint), 0) < to_treasury:  # the USDC left someone else's account
                raise _mismatch([WRONG_PAYER])
            return
        if any(amount > 0 for (owner, _), amount in received.items() if owner == expected.destination):
            raise _mismatch([f"asset is not {expected.asset}"])
        if any(amount > 0 for (_, mint), amount in received.items() if mint == self.mint):
            raise _mismatch(["destination is not the escrow treasury"])
        raise _mismatch([f"no {expected.asset} transfer to the escrow treasury"])


class BaseVerifier(_ChainVerifier):
    """A successful transaction, deep enough, whose USDC Transfer logs from the buyer to the treasury
    sum to the price."""

    name = "base"
    malformed_message = "That is not a Base transaction hash (0x and 64 hex digits)."

    def __init__(self, settings: Settings):
        self.contract = settings.usdc_contract_base.lower()
        self.min_confirmations = settings.base_min_confirmations
        self.rpc = JsonRpc(settings.base_rpc_url, self.name, settings.chain_rpc_timeout_seconds)

    @staticmethod
    def _well_formed(tx_hash: str) -> bool:
        return isinstance(tx_hash, str) and bool(_EVM_TX_HASH.fullmatch(tx_hash))

    def _check(self, tx_hash: str, expected: Expected) -> None:
        receipt = self.rpc.call("eth_getTransactionReceipt", [tx_hash])
        if receipt is None:
            if self.rpc.call("eth_getTransactionByHash", [tx_hash]) is None:
                raise _refuse("No such transaction on Base.", "unknown_transaction")
            raise _refuse("The transaction is not final yet; retry in a minute.", "not_final", confirmations=0,
                          required=self.min_confirmations)
        if receipt["status"] != "0x1":
            raise _refuse("The transaction failed on Base.", "failed_transaction")
        confirmations = int(self.rpc.call("eth_blockNumber", []), 16) - int(receipt["blockNumber"], 16) + 1
        if confirmations < self.min_confirmations:
            raise _refuse("The transaction is not final yet; retry in a minute.", "not_final",
                          confirmations=max(confirmations, 0), required=self.min_confirmations)
        treasury_topic, payer_topic = _address_topic(expected.destination), _address_topic(expected.payer)
        # only the buyer's own USDC transfers to the treasury count
        to_treasury, from_others, other_token_to_treasury, usdc_elsewhere = 0, False, False, False
        for entry in receipt["logs"]:
            topics = [t.lower() for t in entry["topics"]]
            if entry.get("removed") or len(topics) != 3 or topics[0] != TRANSFER_TOPIC:
                continue
            is_usdc, to_us = entry["address"].lower() == self.contract, topics[2] == treasury_topic
            if is_usdc and to_us:
                if topics[1] == payer_topic:
                    to_treasury += int(entry["data"], 16)
                else:
                    from_others = True
            other_token_to_treasury |= to_us and not is_usdc
            usdc_elsewhere |= is_usdc and not to_us
        if to_treasury > 0:
            if to_treasury != expected.amount_cents * USDC_UNITS_PER_CENT:
                raise _mismatch(["amount does not match the quoted price"])
            return
        if from_others:
            raise _mismatch([WRONG_PAYER])
        if other_token_to_treasury:
            raise _mismatch([f"asset is not {expected.asset}"])
        if usdc_elsewhere:
            raise _mismatch(["destination is not the escrow treasury"])
        raise _mismatch([f"no {expected.asset} transfer to the escrow treasury"])


def _address_topic(address: str) -> str:
    """An EVM address as a log topic: 32 bytes, lower-case hex."""
    return "0x" + address.lower().removeprefix("0x").rjust(64, "0")
