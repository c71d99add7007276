
import base58
import pytest
from coincurve import PrivateKey, PublicKey
from Crypto.Hash import keccak
from hypothesis import given, settings, strategies as st

from services.orders.wallets import SECP256K1_N, normalize_wallet, verify_signature
from tests.support.wallets import BaseWallet, SolanaWallet

# --- Known-answer vectors produced outside this code base -------------------------------------

# EIP-191 vectors made with eth-account 0.14.0 (Account.sign_message(encode_defunct(text=...)))
# using the well-known web3 docs key below; the address is eth-account's EIP-55 checksum form.
EVM_KEY = "4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318"
EVM_ADDRESS = "0x2c7536E3605D9C16a7a3D7b1898e529396a65c23"
EVM_VECTORS = [
    (
        "Sign in to Order desk\nnonce: 8f3a2c",
        "0x0dfe3172047fdc65e4023ae8fd4d024ba0489f6006af4843d9bd94be047e831b"
        "056826ad55b66bd10113fc0f86d301e0323b566b64a9d38617883b135318fb6f1b",
    ),
    (
        # 41 characters but 47 UTF-8 bytes: the prefix must count bytes, not characters.
        "Connexion à Order desk — café ☕ nonce: 42",
        "0x0ced269308e6037562a8a488f7277f2a72cd413a20ba4850825e4b164d3776a0"
        "27a7b3c73479a266bfc1624d1d6fd6e20592fd2df6fcf03154807cbaf929d2f31c",
    ),
]

# RFC 8032 section 7.1 TEST 1 (empty message) and TEST 2 (message 0x72 = "r"), base58-encoded.
ED25519_VECTORS = [
    (
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
        "FVen3X669xLzsi6N2V91DoiyzHzg1uAgqiT8jZ9nS96Z",
        "",
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555f"
        "b8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
        "5awYiUvGiDFA33EJjj4TXJG44a5afJc8QjWRpGgQiu6b23jCr7yndW2fmp9ujwqJVe32J456wV3VF78Asb1obnTc",
    ),
    (
        "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
        "586Z7H2vpX9qNhN2T4e9Utugie3ogjbxzGaMtM3E6HR5",
        "r",
        "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da08"
        "5ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00",
        "3w2b4gJH2VXfrwycUgMiE3TZJTztazKppFVojCQ9NDMDHq8PVTHxQdQovxMFxqeqeQf1xaADvhkj2nMuB1kzouA7",
    ),
]

MESSAGE = "Sign in to Order desk\nwallet login\nnonce: 5b1f0e9a"


def _keccak256(data: bytes) -> bytes:
    return keccak.new(digest_bits=256, data=data).digest()


def _flip_base58(sig_b58: str, index: int) -> str:
    raw = bytearray(base58.b58decode(sig_b58))
    raw[index] ^= 0x01
    return base58.b58encode(bytes(raw)).decode()


def _flip_hex(sig_hex: str, index: int) -> str:
    raw = bytearray(bytes.fromhex(sig_hex[2:]))
    raw[index] ^= 0x01
    return "0x" + raw.hex()


@pytest.fixture(params=[SolanaWallet, BaseWallet], ids=["solana", "base"])
def wallet(request):
    return request.param.generate()


# --- Known answers ----------------------------------------------------------------------------


@pytest.mark.parametrize("message, signature", EVM_VECTORS)
def test_eip191_vectors_from_eth_account_verify(message, signature):
    assert verify_signature("base", EVM_ADDRESS, message, signature) is True
    assert verify_signature("base", EVM_ADDRESS.lower(), message, signature) is True
    assert verify_signature("base", EVM_ADDRESS, message + " ", signature) is False


@pytest.mark.parametrize("message, signature", EVM_VECTORS)
def test_eip191_vectors_accept_v_as_0_or_1(message, signature):
    raw = bytes.fromhex(signature[2:])
    zero_based = "0x" + (raw[:64] + bytes([raw[64] - 27])).hex()
    assert verify_signature("base", EVM_ADDRESS, message, zero_based) is True


@pytest.mark.parametrize("message, signature", EVM_VECTORS)
def test_base_helper_matches_eth_account_byte_for_byte(message, signature):
    helper = BaseWallet(PrivateKey(bytes.fromhex(EVM_KEY)))
    assert helper.address == EVM_ADDRESS.lower()
    assert helper.sign(message) == signature


@pytest.mark.parametrize("public_hex, address, message, signature_hex, signature", ED25519_VECTORS)
def test_rfc8032_vectors_verify(public_hex, address, message, signature_hex, signature):
    assert base58.b58decode(address).hex() == public_hex
    assert base58.b58decode(signature).hex() == signature_hex
    assert verify_signature("solana", address, message, signature) is True
    assert verify_signature("solana", address, message + "x", signature) is False


def test_rfc8032_signature_is_bound_to_its_key():
    (_, address_1, message_1, _, signature_1), (_, address_2, _, _, _) = ED25519_VECTORS
    assert verify_signature("solana", address_2, message_1, signature_1) is False
    assert verify_signature("solana", address_1, message_1, signature_1) is True


# --- Round trips and wrong signers ------------------------------------------------------------


@pytest.mark.parametrize("message", [MESSAGE, "", "ünïcödé ✓ 🚀", "x" * 5000])
def test_round_trip(wallet, message):
    assert verify_signature(wallet.chain, wallet.address, message, wallet.sign(message)) is True


def test_base_round_trip_with_mixed_case_wallet():
    w = BaseWallet.generate()
    mixed = "0x" + "".join(c.upper() if i % 2 else c for i, c in enumerate(w.address[2:]))
    assert verify_signature("base", mixed, MESSAGE, w.sign(MESSAGE)) is True


def test_wrong_message_is_rejected(wallet):
    assert verify_signature(wallet.chain, wallet.address, MESSAGE + "!", wallet.sign(MESSAGE)) is False


def test_signature_from_another_key_is_rejected(wallet):
    other = type(wallet).generate()
    assert verify_signature(wallet.chain, wallet.address, MESSAGE, other.sign(MESSAGE)) is False


def test_signature_for_other_chain_is_rejected():
    sol, evm = SolanaWallet.generate(), BaseWallet.generate()
    assert verify_signature("base", evm.address, MESSAGE, sol.sign(MESSAGE)) is False
    assert verify_signature("solana", sol.address, MESSAGE, evm.sign(MESSAGE)) is False
    assert verify_signature("solana", evm.address, MESSAGE, evm.sign(MESSAGE)) is False
    assert verify_signature("base", sol.address, MESSAGE, sol.sign(MESSAGE)) is False


@pytest.mark.parametrize("index", [0, 17, 31, 32, 50, 63])
def test_tampered_solana_signature_is_rejected(index):
    w = SolanaWallet.generate()
    assert verify_signature("solana", w.address, MESSAGE, _flip_base58(w.sign(MESSAGE), index)) is False


@pytest.mark.parametrize("index", [0, 17, 31, 32, 50, 63, 64])
def test_tampered_base_signature_is_rejected(index):
    w = BaseWallet.generate()
    assert verify_signature("base", w.address, MESSAGE, _flip_hex(w.sign(MESSAGE), index)) is False


def test_high_s_twin_of_a_valid_signature_is_rejected():
    message, signature = EVM_VECTORS[0]
    raw = bytes.fromhex(signature[2:])
    high_s = SECP256K1_N - int.from_bytes(raw[32:64], "big")
    twin = raw[:32] + high_s.to_bytes(32, "big") + bytes([55 - raw[64]])  # 27 <-> 28
    # The twin really is a valid ECDSA signature for the same signer...
    data = message.encode()
    digest = _keccak256(b"\x19Ethereum Signed Message:\n" + str(len(data)).encode() + data)
    recovered = PublicKey.from_signature_and_message(twin[:64] + bytes([twin[64] - 27]), digest, hasher=None)
    assert "0x" + _keccak256(recovered.format(compressed=False)[1:])[-20:].hex() == EVM_ADDRESS.lower()
    # ...but malleable, so the verifier refuses it.
    assert verify_signature("base", EVM_ADDRESS, message, "0x" + twin.hex()) is False


# --- Malformed input never raises -------------------------------------------------------------


def _evm_sig(r: int, s: int, v: int) -> str:
    return "0x" + (r.to_bytes(32, "big") + s.to_bytes(32, "big") + bytes([v])).hex()


@pytest.mark.parametrize(
    "signature",
    [
        "",
        "0x",
        "garbage",
        "not hex at all but long enough " * 5,
        "0x" + "zz" * 65,
        "0x" + "ab" * 64,  # 64 bytes: missing v
        "0x" + "ab" * 66,  # 66 bytes
        "0x" + "ab" * 65 + "a",  # odd length
        "ab" * 65,  # no 0x prefix
        "0X" + "ab" * 65,
        " 0x" + "ab" * 65,
        "0x" + "ab" * 65 + "\n",
        "0x" + "00" * 65,
        _evm_sig(1, 1, 29),
        _evm_sig(1, 1, 2),
        _evm_sig(0, 1, 27),
        _evm_sig(1, 0, 27),
        _evm_sig(SECP256K1_N, 1, 27),
        _evm_sig(2**256 - 1, 1, 28),
        _evm_sig(1, SECP256K1_N // 2 + 1, 27),
        None,
        b"\x00" * 65,
        12345,
    ],
)
def test_malformed_base_signature_is_false(signature):
    assert verify_signature("base", EVM_ADDRESS, EVM_VECTORS[0][0], signature) is False


@pytest.mark.parametrize(
    "signature",
    [
        "",
        "garbage!",
        "0OIl" * 20,  # characters outside the base58 alphabet
        base58.b58encode(b"\x01" * 63).decode(),
        base58.b58encode(b"\x01" * 65).decode(),
        base58.b58encode(b"\x00" * 64).decode(),
        "é" * 88,
        None,
        b"\x00" * 64,
    ],
)
def test_malformed_solana_signature_is_false(signature):
    _, address, message, _, _ = ED25519_VECTORS[1]
    assert verify_signature("solana", address, message, signature) is False


@pytest.mark.parametrize(
    "chain, wallet",
    [
        ("solana", ""),
        ("solana", "garbage!"),
        ("solana", base58.b58encode(b"\x01" * 31).decode()),
        ("solana", base58.b58encode(b"\x01" * 33).decode()),
        ("solana", None),
        ("base", ""),
        ("base", "0x"),
        ("base", "0x" + "ab" * 19),
        ("base", "0x" + "ab" * 21),
        ("base", "2c7536e3605d9c16a7a3d7b1898e529396a65c23"),
        ("base", None),
    ],
)
def test_malformed_wallet_is_false(chain, wallet):
    assert verify_signature(chain, wallet, MESSAGE, "0x" + "ab" * 65) is False


def test_sol_address_that_is_not_a_curve_point_is_false():
    # y = 2 is not on Ed25519; the key must be refused quietly rather than raise.
    address = base58.b58encode((2).to_bytes(32, "little")).decode()
    assert verify_signature("solana", address, "", ED25519_VECTORS[0][4]) is False


@pytest.mark.parametrize("chain", ["", "ethereum", "SOLANA", "Base", None])
def test_unknown_chain_is_false(chain):
    assert verify_signature(chain, EVM_ADDRESS, EVM_VECTORS[0][0], EVM_VECTORS[0][1]) is False


@pytest.mark.parametrize("message", [None, b"Sign in", "\ud800 lone surrogate", 42])
def test_malformed_message_is_false(wallet, message):
    assert verify_signature(wallet.chain, wallet.address, message, wallet.sign("Sign in")) is False


def test_all_empty_strings_are_false():
    for chain in ("solana", "base", ""):
        assert verify_signature(chain, "", "", "") is False


@settings(max_examples=200, deadline=None)
@given(chain=st.sampled_from(["solana", "base"]), wallet=st.text(), message=st.text(), signature=st.text())
def test_arbitrary_text_never_raises(chain, wallet, message, signature):
    assert verify_signature(chain, wallet, message, signature) is False


# --- normalize_wallet -------------------------------------------------------------------------


def test_normalize_solana_returns_address_unchanged():
    w = SolanaWallet.generate()
    assert normalize_wallet("solana", w.address) == w.address
    assert normalize_wallet("solana", ED25519_VECTORS[0][1]) == ED25519_VECTORS[0][1]


def test_normalize_base_lowercases():
    assert normalize_wallet("base", EVM_ADDRESS) == EVM_ADDRESS.lower()
    assert normalize_wallet("base", EVM_ADDRESS.upper().replace("0X", "0x")) == EVM_ADDRESS.lower()
    w = BaseWallet.generate()
    assert normalize_wallet("base", w.address) == w.address


@pytest.mark.parametrize(
    "wallet",
    [
        "",
        "0",
        "O" * 44,  # O, 0, I, l are not in the base58 alphabet
        "l" + ED25519_VECTORS[0][1][1:],
        ED25519_VECTORS[0][1] + " ",
        " " + ED25519_VECTORS[0][1],
        base58.b58encode(b"\x07" * 31).decode(),
        base58.b58encode(b"\x07" * 33).decode(),
        "1" + ED25519_VECTORS[0][1],  # a leading "1" adds a zero byte
        EVM_ADDRESS,
        None,
    ],
)
def test_normalize_rejects_bad_solana(wallet):
    with pytest.raises(ValueError, match="not a valid Solana address"):
        normalize_wallet("solana", wallet)


@pytest.mark.parametrize(
    "wallet",
    [
        "",
        "0x",
        EVM_ADDRESS[2:],
        "0X" + EVM_ADDRESS[2:],
        EVM_ADDRESS[:-1],
        EVM_ADDRESS + "0",
        EVM_ADDRESS[:-1] + "g",
        EVM_ADDRESS + "\n",
        " " + EVM_ADDRESS,
        ED25519_VECTORS[0][1],
        None,
    ],
)
def test_normalize_rejects_bad_base(wallet):
    with pytest.raises(ValueError, match="not a valid Base address"):
        normalize_wallet("base", wallet)


@pytest.mark.parametrize("chain", ["", "ethereum", "Solana", None])
def test_normalize_rejects_unknown_chain(chain):
    with pytest.raises(ValueError):
        normalize_wallet(chain, EVM_ADDRESS)
