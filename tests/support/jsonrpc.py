"""A local JSON-RPC node for tests: canned answers of the shapes real Solana and Base nodes give,
served over real HTTP, with a record of the calls it got.

    with JsonRpcServer({"eth_blockNumber": "0x10"}) as node:
        node.answers[("eth_getTransactionReceipt", tx_hash)] = base_receipt(...)
        ... point the verifier at node.url ...
        assert node.methods() == [...]

A slow node: set `node.hold` to a threading.Event; answers wait until it is set, and `node.asked`
tells when the first call came in.

An answer is looked up by (method, the transaction it is about), then by method alone; it is a
result (None included), an RpcError, or an HttpReply. A call with no answer gets a JSON-RPC
"method not found" error, so a test that forgot one fails loudly."""
from __future__ import annotations

import json
import secrets
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import base58

SPL_TOKEN_PROGRAM = "TokenkegQfeZyiNwAJbNbGKPFXCWuBvf9Ss623VQ5DA"
TRANSFER_TOPIC = "0xddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef"


@dataclass
class RpcError:
    code: int
    message: str


@dataclass
class HttpReply:
    status: int
    body: bytes


class JsonRpcServer:
    def __init__(self, answers: dict | None = None):
        self.answers = dict(answers or {})
        self.calls: list[tuple[str, list]] = []
        self.asked = threading.Event()  # set by the first call
        self.hold: threading.Event | None = None  # when set to an Event, every answer waits for it
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def methods(self) -> list[str]:
        return [method for method, _ in self.calls]

    def __enter__(self) -> "JsonRpcServer":
        node = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                node.calls.append((request["method"], request["params"]))
                node.asked.set()
                if node.hold is not None:
                    node.hold.wait(30)
                status, body = node._reply(request)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)

    def _reply(self, request: dict) -> tuple[int, bytes]:
        method, params = request["method"], request["params"]
        subject = params[0] if params else None
        if isinstance(subject, list):  # getSignatureStatuses: [[signature, ...], config]
            subject = subject[0]
        key = (method, subject) if (method, subject) in self.answers else method
        if key not in self.answers:
            answer = RpcError(-32601, "Method not found")
        else:
            answer = self.answers[key]
        if isinstance(answer, HttpReply):
            return answer.status, answer.body
        envelope = {"jsonrpc": "2.0", "id": request.get("id")}
        if isinstance(answer, RpcError):
            envelope["error"] = {"code": answer.code, "message": answer.message}
        else:
            envelope["result"] = answer
        return 200, json.dumps(envelope).encode()


# --- Solana ---------------------------------------------------------------------------------------

def solana_signature() -> str:
    return base58.b58encode(secrets.token_bytes(64)).decode()


def solana_address() -> str:
    return base58.b58encode(secrets.token_bytes(32)).decode()


def token_balance(account_index: int, mint: str, owner: str, amount: int, decimals: int = 6) -> dict:
    """One entry of meta.preTokenBalances / meta.postTokenBalances."""
    ui = amount / 10 ** decimals
    return {"accountIndex": account_index, "mint": mint, "owner": owner, "programId": SPL_TOKEN_PROGRAM,
            "uiTokenAmount": {"amount": str(amount), "decimals": decimals, "uiAmount": ui,
                              "uiAmountString": f"{ui:g}"}}


def solana_transfer(signature: str, mint: str, payer: str, to_owner: str, amount: int,
                    payer_had: int = 500_000_000, to_had: int = 0, err: dict | None = None,
                    to_account: str | None = None) -> dict:
    """getTransaction (jsonParsed) for a transferChecked of `amount` base units of `mint` from
    `payer`'s token account (index 1) to `to_owner`'s (index 2; its address `to_account`, or a new one)."""
    payer_ata, to_ata = solana_address(), to_account or solana_address()
    pre = [token_balance(1, mint, payer, payer_had), token_balance(2, mint, to_owner, to_had)]
    post = pre if err else [token_balance(1, mint, payer, payer_had - amount),
                            token_balance(2, mint, to_owner, to_had + amount)]
    return {
        "blockTime": 1_718_000_000,
        "slot": 272_000_000,
        "version": 0,
        "meta": {
            "computeUnitsConsumed": 6_200,
            "err": err,
            "fee": 5_000,
            "innerInstructions": [],
            "loadedAddresses": {"readonly": [], "writable": []},
            "logMessages": [f"Program {SPL_TOKEN_PROGRAM} invoke [1]", "Program log: Instruction: TransferChecked",
                            f"Program {SPL_TOKEN_PROGRAM} " + ("failed" if err else "success")],
            "postBalances": [994_995_000, 2_039_280, 2_039_280, 934_087_680, 1_009_200],
            "postTokenBalances": post,
            "preBalances": [995_000_000, 2_039_280, 2_039_280, 934_087_680, 1_009_200],
            "preTokenBalances": pre,
            "rewards": [],
            "status": {"Err": err} if err else {"Ok": None},
        },
        "transaction": {
            "signatures": [signature],
            "message": {
                "accountKeys": [
                    {"pubkey": payer, "signer": True, "source": "transaction", "writable": True},
                    {"pubkey": payer_ata, "signer": False, "source": "transaction", "writable": True},
                    {"pubkey": to_ata, "signer": False, "source": "transaction", "writable": True},
                    {"pubkey": SPL_TOKEN_PROGRAM, "signer": False, "source": "transaction", "writable": False},
                    {"pubkey": mint, "signer": False, "source": "transaction", "writable": False},
                ],
                "addressTableLookups": [],
                "instructions": [{
                    "parsed": {"type": "transferChecked", "info": {
                        "authority": payer, "source": payer_ata, "destination": to_ata, "mint": mint,
                        "tokenAmount": token_balance(0, mint, to_owner, amount)["uiTokenAmount"]}},
                    "program": "spl-token", "programId": SPL_TOKEN_PROGRAM, "stackHeight": None}],
                "recentBlockhash": solana_address(),
            },
        },
    }


def signature_statuses(confirmation_status: str | None, err: dict | None = None) -> dict:
    """getSignatureStatuses for one signature: None means the node has never seen it."""
    status = None if confirmation_status is None else {
        "slot": 272_000_000, "confirmations": None if confirmation_status == "finalized" else 3, "err": err,
        "status": {"Err": err} if err else {"Ok": None}, "confirmationStatus": confirmation_status}
    return {"context": {"apiVersion": "2.0.15", "slot": 272_000_010}, "value": [status]}


# --- Base (EVM) -----------------------------------------------------------------------------------

def evm_tx_hash() -> str:
    return "0x" + secrets.token_hex(32)


def evm_address() -> str:
    return "0x" + secrets.token_hex(20)


def _topic(address: str) -> str:
    return "0x" + address.lower().removeprefix("0x").rjust(64, "0")


def transfer_log(contract: str, sender: str, to: str, amount: int, tx_hash: str, block_number: int,
                 log_index: int = 0) -> dict:
    """An ERC-20 Transfer(from, to, value) log as eth_getTransactionReceipt lists it."""
    return {"address": contract.lower(), "topics": [TRANSFER_TOPIC, _topic(sender), _topic(to)],
            "data": "0x" + f"{amount:064x}", "blockNumber": hex(block_number), "blockHash": "0x" + "ab" * 32,
            "transactionHash": tx_hash, "transactionIndex": "0x5", "logIndex": hex(log_index), "removed": False}


def base_receipt(tx_hash: str, block_number: int, logs: list[dict], sender: str, contract: str,
                 status: str = "0x1") -> dict:
    return {"blockHash": "0x" + "ab" * 32, "blockNumber": hex(block_number), "contractAddress": None,
            "cumulativeGasUsed": "0x2dc6c0", "effectiveGasPrice": "0x10c8e0", "from": sender,
            "gasUsed": "0xfde8", "logs": logs if status == "0x1" else [], "logsBloom": "0x" + "00" * 256,
            "status": status, "to": contract.lower(), "transactionHash": tx_hash, "transactionIndex": "0x5",
            "type": "0x2", "l1Fee": "0x2a5c3f", "l1GasPrice": "0x3b9aca00", "l1GasUsed": "0x640"}


def base_transaction(tx_hash: str, sender: str, contract: str, block_number: int | None) -> dict:
    """eth_getTransactionByHash: block fields are null while the transaction is pending."""
    mined = block_number is not None
    return {"blockHash": "0x" + "ab" * 32 if mined else None, "blockNumber": hex(block_number) if mined else None,
            "transactionIndex": "0x5" if mined else None, "chainId": "0x2105", "from": sender,
            "gas": "0x186a0", "gasPrice": "0x10c8e0", "maxFeePerGas": "0x1e8480", "maxPriorityFeePerGas": "0x0",
            "hash": tx_hash, "input": "0xa9059cbb" + "00" * 64, "nonce": "0x7", "to": contract.lower(),
            "type": "0x2", "value": "0x0", "accessList": [], "v": "0x1", "r": "0x" + "11" * 32,
            "s": "0x" + "22" * 32, "yParity": "0x1"}
