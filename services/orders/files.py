"""Signed, expiring links to delivered files, and who may have which.

A link names the item, the variant (`original` or `preview`), the role it was minted for and its
expiry, and carries an HMAC of all four. The file route checks the MAC and the expiry on every
request, and, for a buyer's original, the order's state again: a link is never more than what
its holder could get by reading the order now (DESIGN.md §3: the buyer gets an image's original
only once the order is completed; a refunded buyer never does)."""
from __future__ import annotations

import hashlib
import hmac
import math
import re
import time
from dataclasses import dataclass
from urllib.parse import urlencode

from shared.settings import Settings

_EXPIRES = re.compile(r"[0-9]{1,12}")
_SIG = re.compile(r"[0-9a-f]{64}")
VARIANTS = ("original", "preview")
ROLES = ("buyer", "agent", "admin")


@dataclass(frozen=True)
class Links:
    secret: str
    ttl_seconds: int

    @classmethod
    def from_settings(cls, settings: Settings) -> "Links":
        return cls(settings.file_link_secret, settings.file_link_ttl_seconds)

    @property
    def view_ttl_seconds(self) -> int:
        """How long a rendered order view holding links may be served: a third of a link's life,
        so a link a client just received stays valid for at least two thirds of its TTL."""
        return max(1, self.ttl_seconds // 3)

    def _mac(self, item_id: str, variant: str, role: str, expires: int) -> str:
        message = f"{item_id}\n{variant}\n{role}\n{expires}".encode()
        return hmac.new(self.secret.encode(), message, hashlib.sha256).hexdigest()

    def url(self, item_id: str, variant: str, role: str, now: float | None = None) -> str:
        expires = math.ceil((now or time.time()) + self.ttl_seconds)
        query = urlencode({"role": role, "expires": expires, "sig": self._mac(item_id, variant, role, expires)})
        return f"/api/files/{item_id}/{variant}?{query}"

    def check(self, item_id: str, variant: str, role: str, expires: str, sig: str, now: float | None = None) -> str | None:
        """None if the link is good, else why it is refused."""
        # ASCII only: str.isdigit() also passes "¹²³", which int() refuses, and compare_digest()
        # refuses text that is not ASCII
        if variant not in VARIANTS or role not in ROLES or not _EXPIRES.fullmatch(expires) \
                or not _SIG.fullmatch(sig):
            return "malformed"
        if not hmac.compare_digest(self._mac(item_id, variant, role, int(expires)), sig):
            return "tampered"
        if int(expires) < (now or time.time()):
            return "expired"
        return None


def original_allowed(role: str | None, media_type: str, order_status: str) -> bool:
    """May this viewer have the original file? Images are gated for the buyer until completion."""
    if role in ("agent", "admin"):
        return True
    if role != "buyer":
        return False
    return media_type != "image" or order_status == "completed"
