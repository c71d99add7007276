"""Log in as a demo buyer through the gateway: a fresh Solana wallet signs the challenge.

    .venv/bin/python scripts/demo_buyer.py [--gateway http://127.0.0.1:8080]

Prints the wallet and a session token to send as `Authorization: Bearer <token>`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.support.wallets import SolanaWallet  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gateway", default="http://127.0.0.1:8080")
    args = parser.parse_args()
    wallet = SolanaWallet.generate()
    challenge = requests.post(f"{args.gateway}/api/auth/challenge",
                              json={"wallet": wallet.address, "chain": "solana"}, timeout=10).json()["data"]
    session = requests.post(f"{args.gateway}/api/auth/session", timeout=10, json={
        "wallet": wallet.address, "chain": "solana", "nonce": challenge["nonce"],
        "signature": wallet.sign(challenge["message"])}).json()["data"]
    print(json.dumps({"wallet": wallet.address, "chain": "solana", "token": session["token"],
                      "expires_at": session["expires_at"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
