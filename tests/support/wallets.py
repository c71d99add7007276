"""Throwaway wallets that sign login messages the way real Solana and Base wallets do."""

import base58
from coincurve import PrivateKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from Crypto.Hash import keccak


def _keccak256(data: bytes) -> bytes:
    return keccak.new(digest_bits=256, data=data).digest()


class SolanaWallet:
    chain = "solana"

    def __init__(self, private_key: Ed25519PrivateKey):
        self._key = private_key
        raw = private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.address = base58.b58encode(raw).decode()

    @classmethod
    def generate(cls) -> "SolanaWallet":
        return cls(Ed25519PrivateKey.generate())

    def sign(self, message: str) -> str:
        return base58.b58encode(self._key.sign(message.encode("utf-8"))).decode()


class BaseWallet:
    chain = "base"

    def __init__(self, private_key: PrivateKey):
        self._key = private_key
        uncompressed = private_key.public_key.format(compressed=False)
        self.address = "0x" + _keccak256(uncompressed[1:])[-20:].hex()

    @classmethod
    def generate(cls) -> "BaseWallet":
        return cls(PrivateKey())

    def sign(self, message: str) -> str:
        data = message.encode("utf-8")
        digest = _keccak256(b"\x19Ethereum Signed Message:\n" + str(len(data)).encode() + data)
        sig = self._key.sign_recoverable(digest, hasher=None)
        # coincurve appends recid 0/1; wallets such as MetaMask send v = 27/28.
        return "0x" + (sig[:64] + bytes([sig[64] + 27])).hex()
