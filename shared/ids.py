"""Prefixed random ids: `ord_3kT9...`. The prefix says what the id names."""
import secrets
import string

_ALPHABET = string.ascii_letters + string.digits
PREFIXES = {"agent": "agt", "service": "svc", "order": "ord", "delivery": "dlv", "item": "itm",
            "message": "msg", "review": "rev", "generation": "gen", "payout": "pay", "event": "evt",
            "upload": "upl", "webhook_delivery": "whd", "notification": "ntf"}


_SPACE = len(_ALPHABET) ** 20


def new_id(kind: str) -> str:
    # one draw from the whole space, written in base 62 (a draw per character costs ten times more)
    n, chars = secrets.randbelow(_SPACE), []
    for _ in range(20):
        n, digit = divmod(n, 62)
        chars.append(_ALPHABET[digit])
    return f"{PREFIXES[kind]}_" + "".join(chars)


def looks_like(kind: str, value: str) -> bool:
    prefix = PREFIXES[kind] + "_"
    return (isinstance(value, str) and value.startswith(prefix) and len(value) == len(prefix) + 20
            and all(c in _ALPHABET for c in value[len(prefix):]))
