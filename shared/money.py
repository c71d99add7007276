"""Money: integer cents inside, 2-decimal strings at the edge."""
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
import re

MAX_CENTS = 100_000_000  # 1,000,000.00 USDC
_PATTERN = re.compile(r"[0-9]{1,7}(\.[0-9]{1,2})?")  # ASCII digits only, matched whole


def parse_usd(value) -> int:
    """'45.5' → 4550. Refuses floats, negatives, more than 2 decimals and exponent forms."""
    if not isinstance(value, str) or not _PATTERN.fullmatch(value):
        raise ValueError("must be a string amount with at most 2 decimals, e.g. \"45.00\"")
    try:
        return int((Decimal(value) * 100).to_integral_exact())
    except InvalidOperation as exc:  # pragma: no cover - the pattern already guards this
        raise ValueError("not an amount") from exc


def format_usd(cents: int | None) -> str | None:
    if cents is None:
        return None
    sign = "-" if cents < 0 else ""
    cents = abs(cents)
    return f"{sign}{cents // 100}.{cents % 100:02d}"


def fee_cents(price_cents: int, fee_bps: int) -> int:
    """Platform fee in cents, rounded half up to the cent."""
    return int((Decimal(price_cents) * fee_bps / Decimal(10_000)).quantize(Decimal(1), rounding=ROUND_HALF_UP))
