"""Payout rails: how money leaves the platform. One interface; the `sandbox` rail ships.

Every call carries an idempotency key (derived from the payout id): the rail makes at most one
transfer per key, and can be asked what it did with a key. An outcome the caller could not see
(a timeout, a lost answer) is settled by asking, never by paying again."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterator, Protocol

import redis

from shared.internal import InternalClient, InternalError, Unavailable
from shared.money import format_usd, parse_usd
from shared.settings import Settings

ASSET = "USDC"


class RailError(Exception):
    pass


class RailUnavailable(RailError):
    """Nothing was done; trying again later is safe."""


class RailAmbiguous(RailError):
    """The transfer may or may not have been made: ask the rail about the key before anything else."""


class RailRejected(RailError):
    """The rail refuses this transfer for good (e.g. an invalid destination)."""


@dataclass(frozen=True)
class Transfer:
    key: str
    tx_ref: str
    destination: str
    amount_cents: int
    chain: str


class PayoutRail(Protocol):
    name: str

    def send(self, key: str, destination: str, amount_cents: int, chain: str) -> Transfer: ...

    def lookup(self, key: str) -> Transfer | None: ...

    def transfers(self) -> Iterator[Transfer]: ...


class Faults:
    """Test faults for the sandbox rail, from `SANDBOX_RAIL_FAULTS` ("fail=N,timeout=N,ambiguous=N"):
    the first N calls fail cleanly, the next N time out before the transfer, the next N make the
    transfer and lose the answer. Counted in Redis, so every worker process shares the count."""

    KINDS = ("fail", "timeout", "ambiguous")

    def __init__(self, spec: str, client: redis.Redis | None):
        self.counts = {kind: 0 for kind in self.KINDS}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            kind, _, number = part.partition("=")
            if kind.strip() not in self.counts or not number.strip().isdigit():
                raise ValueError(f"SANDBOX_RAIL_FAULTS: {part!r} is not one of fail=N, timeout=N, ambiguous=N")
            self.counts[kind.strip()] = int(number)
        self.client = client
        self.counter = "sandbox_rail:calls:" + hashlib.sha256(spec.encode()).hexdigest()[:16]

    def next(self) -> str | None:
        if not any(self.counts.values()) or self.client is None:
            return None
        call = self.client.incr(self.counter)
        for kind in self.KINDS:
            if call <= self.counts[kind]:
                return kind
            call -= self.counts[kind]
        return None


class SandboxRail:
    """Play-money transfers, recorded in the orders service's sandbox ledger (the same one
    `/api/sandbox/transfers` writes), through its internal API."""

    name = "sandbox"

    def __init__(self, orders: InternalClient, faults: Faults):
        self.orders = orders
        self.faults = faults

    def send(self, key: str, destination: str, amount_cents: int, chain: str) -> Transfer:
        fault = self.faults.next()
        if fault == "fail":
            raise RailUnavailable("sandbox fault: the rail refused the call (try again)")
        if fault == "timeout":
            raise RailAmbiguous("sandbox fault: the call timed out")
        try:
            data = self.orders.post("/internal/sandbox/rail", {
                "idempotency_key": key, "to": destination, "amount_usd": format_usd(amount_cents),
                "asset": ASSET, "chain": chain})
        except Unavailable as exc:
            raise (RailAmbiguous if exc.ambiguous else RailUnavailable)(str(exc)) from exc
        except InternalError as exc:
            if exc.status == 400:
                raise RailRejected(exc.message) from exc
            raise RailUnavailable(str(exc)) from exc
        if fault == "ambiguous":
            raise RailAmbiguous("sandbox fault: the transfer was made but its answer was lost")
        return _transfer(data)

    def lookup(self, key: str) -> Transfer | None:
        try:
            return _transfer(self.orders.get(f"/internal/sandbox/rail/{key}"))
        except InternalError as exc:
            if exc.status == 404:
                return None
            raise RailUnavailable(str(exc)) from exc
        except Unavailable as exc:
            raise RailUnavailable(str(exc)) from exc

    def transfers(self) -> Iterator[Transfer]:
        after = None
        while True:
            data = self.orders.get("/internal/sandbox/rail", {"after": after} if after else None)
            yield from (_transfer(item) for item in data["items"])
            after = data["next_cursor"]
            if after is None:
                return


def _transfer(data: dict) -> Transfer:
    return Transfer(key=data["idempotency_key"], tx_ref=data["tx_ref"], destination=data["to"],
                    amount_cents=parse_usd(data["amount_usd"]), chain=data["chain"])


def make_rail(settings: Settings, orders: InternalClient, redis_client: redis.Redis | None) -> PayoutRail:
    if settings.payout_rail != "sandbox":
        raise ValueError(f"PAYOUT_RAIL={settings.payout_rail!r}: only 'sandbox' ships")
    return SandboxRail(orders, Faults(settings.sandbox_rail_faults, redis_client))
