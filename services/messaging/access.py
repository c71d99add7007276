"""Who may talk on an order, and in which state: the orders service's answer, kept in Redis.

Messaging owns no order data. It asks the orders service (`GET /internal/orders/<id>`, with the
service credential) and keeps the answer in Redis, shared by every messaging process:

- an answer is *fresh* for `MESSAGING_ACCESS_TTL_SECONDS`, and kept, stale, for a day;
- every committed change of an order is announced on `orders:changed`; each messaging process
  runs one listener thread that marks that order's copy stale at once;
- a post needs a fresh copy (or the orders service's answer): unreachable orders is a 503;
  a read may fall back to a stale copy, so history stays readable while orders is down.

A fetch that raced an invalidation does not store what it read (a generation counter per order,
compared-and-set in Lua), so a stale state is never stored as fresh.

Agents' API keys live in the orders service's table too: a key is resolved through
`GET /internal/agents/by-key` and the answer kept for a minute under the key's SHA-256.
"""
from __future__ import annotations

import json
import logging
import re
import threading
from dataclasses import dataclass

import redis

from shared import errors
from shared.auth import Caller, hash_secret
from shared.internal import InternalClient, InternalError, Unavailable

log = logging.getLogger(__name__)

# Messaging is open in these states; a cancelled order that was paid stays readable (DESIGN §3).
OPEN_STATES = frozenset({"paid", "in_progress", "delivered", "revision_requested", "completed", "disputed"})
# The orders service announces every committed order change here (services/orders/cache.py).
ORDERS_CHANGED = "orders:changed"
AGENT_KEY_HEADER = "X-Agent-Key"
AGENT_KEY = re.compile(r"atl_[A-Za-z0-9_-]{20,100}")
STALE_SECONDS = 24 * 3600  # how long a copy is kept for reads while orders is unreachable
AGENT_KEY_SECONDS = 60
ORDERS_TIMEOUT = 3.0
MISSING = {"missing": True}

_STORE = """
if (redis.call('GET', KEYS[3]) or '') ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[4])
redis.call('SET', KEYS[2], '1', 'EX', ARGV[3])
return 1
"""


@dataclass(frozen=True)
class OrderAccess:
    order_id: str
    status: str
    client_wallet: str
    agent_id: str
    paid: bool
    fresh: bool = True

    def party(self, caller: Caller) -> str | None:
        """`client` or `agent` when the caller is that party of the order, else None."""
        if caller.kind == "buyer" and caller.id == self.client_wallet:
            return "client"
        if caller.kind == "agent" and caller.id == self.agent_id:
            return "agent"
        return None

    @property
    def open(self) -> bool:
        return self.status in OPEN_STATES

    @property
    def readable(self) -> bool:
        return self.open or self.paid


class OrdersClient(InternalClient):
    def order(self, order_id: str) -> dict | None:
        """{status, client_wallet, agent_id, paid}, or None for no such order."""
        try:
            return self.get(f"/internal/orders/{order_id}")
        except InternalError as exc:
            if exc.status == 404:
                return None
            raise Unavailable(f"orders answered {exc}", ambiguous=False) from exc

    def agent_for_key(self, api_key: str) -> str | None:
        try:
            # the key goes in a header of its own: never in a URL, so never in an access log
            return self._call("GET", "/internal/agents/by-key", headers={AGENT_KEY_HEADER: api_key})["id"]
        except InternalError as exc:
            if exc.status == 404:
                return None
            raise Unavailable(f"orders answered {exc}", ambiguous=False) from exc


def _keys(order_id: str) -> list[str]:
    return [f"messaging:access:{order_id}", f"messaging:access-fresh:{order_id}",
            f"messaging:access-gen:{order_id}"]


class Access:
    def __init__(self, cache: redis.Redis, orders: OrdersClient, ttl_seconds: int):
        self.cache = cache
        self.orders = orders
        self.ttl = max(1, int(ttl_seconds))
        self._store = cache.register_script(_STORE)

    # --- orders --------------------------------------------------------------------------------

    def order(self, order_id: str, for_post: bool) -> OrderAccess:
        """The order's parties and state; NotFound for no such order, ServiceUnavailable when
        orders cannot answer and no usable copy is kept."""
        data, fresh, generation = self._cached(order_id)
        if data is not None and fresh:
            return self._access(order_id, data, True)
        try:
            answer = self.orders.order(order_id)
        except Unavailable:
            log.warning("orders unavailable for access to %s", order_id, exc_info=True)
            if not for_post and data is not None and not data.get("missing"):
                return self._access(order_id, data, False)
            raise errors.ServiceUnavailable("The orders service is unavailable; retry shortly.") from None
        if generation is not None:
            self._remember(order_id, answer or MISSING, generation)
        return self._access(order_id, answer or MISSING, True)

    def _cached(self, order_id: str) -> tuple[dict | None, bool, str | None]:
        """(copy, fresh, generation); generation None means the cache is unusable just now."""
        try:
            raw, fresh, generation = self.cache.mget(_keys(order_id))
        except redis.RedisError:
            log.warning("access cache unavailable", exc_info=True)
            return None, False, None
        try:
            data = json.loads(raw) if raw else None
        except ValueError:
            data = None
        return data, bool(fresh), (generation or b"").decode()

    def _remember(self, order_id: str, data: dict, generation: str) -> None:
        try:
            self._store(keys=_keys(order_id), args=[generation, json.dumps(data), self.ttl, STALE_SECONDS])
        except redis.RedisError:
            log.warning("could not keep the access of %s", order_id, exc_info=True)

    @staticmethod
    def _access(order_id: str, data: dict, fresh: bool) -> OrderAccess:
        if data.get("missing"):
            raise errors.NotFound("No such order.")
        return OrderAccess(order_id, data["status"], data["client_wallet"], data["agent_id"], bool(data["paid"]), fresh)

    def invalidate(self, order_id: str) -> None:
        """The order changed: its copy is stale from now on (still kept for reads)."""
        _, fresh_key, generation_key = _keys(order_id)
        with self.cache.pipeline(transaction=True) as pipe:
            pipe.delete(fresh_key)
            pipe.incr(generation_key)
            pipe.expire(generation_key, STALE_SECONDS)
            pipe.execute()

    # --- agents' keys --------------------------------------------------------------------------

    def agent_for_key(self, api_key: str) -> str | None:
        """The agent id an `atl_` key belongs to, or None for an unknown key."""
        if not AGENT_KEY.fullmatch(api_key):
            return None  # no key of ours looks like this: not worth a call
        key = f"messaging:agent-key:{hash_secret(api_key)}"
        try:
            cached = self.cache.get(key)
        except redis.RedisError:
            cached = None
        if cached is not None:
            return cached.decode() or None  # "" remembers an unknown key
        try:
            agent_id = self.orders.agent_for_key(api_key)
        except Unavailable:
            log.warning("orders unavailable to resolve an agent key", exc_info=True)
            raise errors.ServiceUnavailable("The orders service is unavailable; retry shortly.") from None
        try:
            self.cache.set(key, agent_id or "", ex=AGENT_KEY_SECONDS)
        except redis.RedisError:
            pass
        return agent_id


class ChangeListener:
    """One thread per process: marks an order's copy stale as soon as the orders service announces
    a change. It resubscribes after a lost connection; changes announced meanwhile are covered by
    the freshness TTL."""

    def __init__(self, redis_url: str, access: Access, stop: threading.Event):
        self.client = redis.Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=2,
                                           health_check_interval=15)
        self.access = access
        self.stop = stop
        self.subscribed = threading.Event()  # for tests and readiness: listening right now

    def run(self) -> None:
        backoff = 0.2
        while not self.stop.is_set():
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(ORDERS_CHANGED)
                self.subscribed.set()
                backoff = 0.2
                while not self.stop.is_set():
                    message = pubsub.get_message(timeout=0.5)
                    if message is not None:
                        self._on_change(message["data"])
            except redis.RedisError:
                log.warning("orders:changed listener lost Redis; resubscribing", exc_info=True)
                self.stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
            except Exception:  # a bug must not end the thread: stale copies would live their TTL
                log.exception("orders:changed listener failed; resubscribing")
                self.stop.wait(1.0)
            finally:
                self.subscribed.clear()
                try:
                    pubsub.close()
                except Exception:
                    pass

    def _on_change(self, raw) -> None:
        try:
            order_id = json.loads(raw)["order_id"]
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring a malformed orders:changed message: %r", raw[:200])
            return
        if isinstance(order_id, str):
            self.access.invalidate(order_id)
