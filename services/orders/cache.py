"""Rendered order views in Redis, so reading an order costs one Redis call and no database query.

Written through: every transaction that changes an order renders its views (buyer, agent, admin)
and drops the cached ones before commit, and stores the new ones right after, with the order's
version. A store only replaces an older version (compare-and-set in Lua), so a slow reader can
never put back a stale view. An approval made in one statement (oneshot.py) renders nothing: it
drops the views and holds the new version, and the first reader of that version stores them.
Any Redis failure falls back to the database; entries expire.
"""
from __future__ import annotations

import json
import logging

import redis
from sqlalchemy import event
from sqlalchemy.orm import Session, sessionmaker

from shared.auth import Caller
from shared.db import after_commit
from shared.redisconn import Commands

from .models import Order

log = logging.getLogger(__name__)
TTL_SECONDS = 600

# a version held with no views (a change made outside the ORM dropped them) is filled by the
# first reader of that version or later
_STORE = """
local current = redis.call('HGET', KEYS[1], 'version')
if current and tonumber(current) > tonumber(ARGV[1]) then return 0 end
if current and tonumber(current) == tonumber(ARGV[1]) and redis.call('HEXISTS', KEYS[1], 'buyer') == 1 then
  return 0
end
redis.call('HSET', KEYS[1], 'version', ARGV[1], 'client_wallet', ARGV[2], 'agent_id', ARGV[3],
           'buyer', ARGV[4], 'agent', ARGV[5], 'admin', ARGV[6])
redis.call('EXPIRE', KEYS[1], ARGV[7])
return 1
"""

# drop an order's views and hold its new version, so no reader can put back an older one
_DROP = """
local current = redis.call('HGET', KEYS[1], 'version')
if current and tonumber(current) >= tonumber(ARGV[1]) then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'version', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""

STRANGER = b"none"
# every committed change of an order is announced here, {"order_id", "status", "version"}, for
# other services' short-lived copies (messaging's who-may-talk cache) to drop theirs
CHANGES_CHANNEL = "orders:changed"


def _key(order_id: str) -> str:
    return f"orders:view:{order_id}"


class OrderViews:
    def __init__(self, client: redis.Redis, links):
        self.client = client
        self.commands = Commands.of(client)  # the busy round trips (shared with the rate limits' on this client)
        self.links = links
        self._store = client.register_script(_STORE)

    def fetch(self, order_id: str, caller: Caller) -> bytes | None:
        """The caller's view as JSON bytes, STRANGER if they may not see it, None on a miss.
        One round trip: the order's parties and the view of the caller's role."""
        if caller.kind not in ("buyer", "agent", "admin"):
            return STRANGER
        try:
            wallet, agent_id, view = self.commands("HMGET", _key(order_id), "client_wallet", "agent_id", caller.kind)
        except redis.RedisError:
            log.warning("order view cache unavailable", exc_info=True)
            return None
        if wallet is None or view is None:
            return None
        party = {"buyer": wallet, "agent": agent_id}.get(caller.kind)
        if caller.kind == "admin" or party == (caller.id or "").encode():
            return view
        return STRANGER

    def _render(self, order: Order, full: dict | None = None) -> list:
        from . import present
        full = full or present.full_order(order)
        views = [json.dumps(present.for_role(full, role, self.links), separators=(",", ":"))
                 for role in ("buyer", "agent", "admin")]
        # views with file links are kept only a third of a link's life, so served links stay good
        ttl = min(TTL_SECONDS, self.links.view_ttl_seconds) if order.delivery_count else TTL_SECONDS
        return [order.version, order.client_wallet, order.agent_id, *views, ttl]

    def store(self, order: Order, full: dict) -> None:
        """Store the views of an order as read from committed state (a miss being filled)."""
        self._write(order.id, self._render(order, full))

    def _write(self, order_id: str, args: list) -> None:
        try:
            self._store(keys=[_key(order_id)], args=args)
        except redis.RedisError:
            log.warning("could not store the view of %s; dropping it", order_id, exc_info=True)
            try:
                self.client.delete(_key(order_id))
            except redis.RedisError:
                pass

    def forget(self, order_id: str) -> None:
        """Drop an order's views before a change made outside the ORM (services/orders/oneshot.py):
        should this process die before drop(), readers go to the database meanwhile."""
        self._forget([order_id])

    def drop(self, order_id: str, status: str, version: int, commands: list | None = None) -> None:
        """After such a change committed: drop the views again, holding the new version so that
        no slower reader can put back an older view, and announce the change. The next read of
        the new version renders and stores the views. With `commands`, the commands are
        appended to that list, for its owner to send to this same Redis in its round trip."""
        news = json.dumps({"order_id": order_id, "status": status, "version": version})
        # EVAL, not EVALSHA: a script the server lost would fail its whole round trip's drop
        own = [("EVAL", _DROP, 1, _key(order_id), version, TTL_SECONDS), ("PUBLISH", CHANGES_CHANNEL, news)]
        if commands is not None:
            commands.extend(own)
            return
        try:
            self.commands.run(own)
        except redis.RedisError:  # views of an older version may be served until they expire
            log.error("could not drop the cached views of %s after a change", order_id, exc_info=True)

    def _forget(self, order_ids: list[str]) -> None:
        try:
            self.commands("DEL", *[_key(oid) for oid in order_ids])
        except redis.RedisError:
            log.warning("could not drop cached order views", exc_info=True)

    def watch(self, factory: sessionmaker) -> None:
        """Render the views of every order a transaction changed, and store them once it commits."""

        @event.listens_for(factory, "before_commit")
        def _render_changed(session: Session):
            changed = session.info.pop("changed_orders", None)
            if not changed:
                return
            session.flush()  # the version is final now
            known = session.info.pop("rendered_orders", {})
            rendered = {order.id: self._render(order, known.get((order.id, order.version)))
                        for order in changed.values()}
            # drop the old views first: if this process dies between commit and store, readers
            # fall back to the database instead of serving the old view until it expires
            self._forget(list(rendered))
            news = [json.dumps({"order_id": o.id, "status": o.status, "version": o.version}) for o in changed.values()]
            after_commit(session, lambda: self._after_commit(rendered, news))

    def _after_commit(self, rendered: dict, news: list[str]) -> None:
        for order_id, args in rendered.items():
            self._write(order_id, args)
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for message in news:
                    pipe.publish(CHANGES_CHANNEL, message)
                pipe.execute()
        except redis.RedisError:  # listeners' copies expire by themselves
            log.warning("could not announce order changes", exc_info=True)


def changed(session: Session, order: Order) -> None:
    session.info.setdefault("changed_orders", {})[order.id] = order


def rendered(session: Session, order: Order, full: dict) -> None:
    """Offer a full view the request already built, so the commit need not build it again."""
    session.info.setdefault("rendered_orders", {})[(order.id, order.version)] = full
