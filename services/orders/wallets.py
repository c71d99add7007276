"""Verify buyer wallet-login signatures for Solana (Ed25519) and Base (EIP-191)."""

import re

import base58
from coincurve import PublicKey
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from Crypto.Hash import keccak

SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141

_BASE58 = re.compile(r"[1-9A-HJ-NP-Za-km-z]+")
_EVM_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")
_EVM_SIGNATURE = re.compile(r"0x[0-9a-fA-F]{130}")


def _keccak256(data: bytes) -> bytes:
    return keccak.new(digest_bits=256, data=data).digest()


def _b58decode(value: str) -> bytes:
    # Check the alphabet ourselves: base58.b58decode silently strips trailing whitespace.
    if not isinstance(value, str) or not _BASE58.fullmatch(value):
        raise ValueError("not base58")
    return base58.b58decode(value)


def normalize_wallet(chain: str, wallet: str) -> str:
    """Return the canonical form of `wallet` on `chain`, or raise ValueError."""
    if chain == "solana":
        try:
            raw = _b58decode(wallet)
        except ValueError:
            raise ValueError("not a valid Solana address") from None
        if len(raw) != 32:
            raise ValueError("not a valid Solana address")
        return wallet
    if chain == "base":
        if not isinstance(wallet, str) or not _EVM_ADDRESS.fullmatch(wallet):
            raise ValueError("not a valid Base address")
        return wallet.lower()
    raise ValueError("unsupported chain")


def _verify_solana(wallet: str, message: bytes, signature: str) -> bool:
    public_key = Ed25519PublicKey.from_public_bytes(base58.b58decode(wallet))
    sig = _b58decode(signature)
    if len(sig) != 64:
        return False
    try:
        public_key.verify(sig, message)
    except InvalidSignature:
        return False
    return True


def _verify_base(wallet: str, message: bytes, signature: str) -> bool:
    if not isinstance(signature, str) or not _EVM_SIGNATURE.fullmatch(signature):
        return False
    sig = bytes.fromhex(signature[2:])
    r, s, v = int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:64], "big"), sig[64]
    recid = v - 27 if v in (27, 28) else v
    if recid not in (0, 1):
        return False
    # High-s signatures are malleable twins of valid ones; Ethereum rejects them (EIP-2).
    if not (0 < r < SECP256K1_N and 0 < s <= SECP256K1_N // 2):
        return False
    prefix = b"\x19Ethereum Signed Message:\n" + str(len(message)).encode()
    digest = _keccak256(prefix + message)
    public_key = PublicKey.from_signature_and_message(sig[:64] + bytes([recid]), digest, hasher=None)
    address = "0x" + _keccak256(public_key.format(compressed=False)[1:])[-20:].hex()
    return address == wallet


def verify_signature(chain: str, wallet: str, message: str, signature: str) -> bool:
    """True only if `signature` over the UTF-8 bytes of `message` was made by `wallet`."""
    # Any malformed input means "not verified": callers must never see an exception here.
    try:
        wallet = normalize_wallet(chain, wallet)
        if not isinstance(message, str):
            return False
        data = message.encode("utf-8")
        if chain == "solana":
            return _verify_solana(wallet, data, signature)
        return _verify_base(wallet, data, signature)
    except ValueError:
        return False
