"""The buyer's approval in one statement (PostgreSQL): the busiest transition, without the ORM.

The general way (services.act) loads the order and its children through the ORM, checks the
state machine's table, flushes five rows and renders the order's views: several milliseconds of
Python. An approval changes the same rows every time, so here one SQL statement makes them all,
on an autocommit connection, straight through the driver (one round trip, durable when it
returns):

- the order moves from `delivered` to `completed` only if it is the caller's, paid, not yet
  settled, and unchanged since the statement began (its version is the one the statement first
  saw, so everything else the statement reads is of that same moment);
- the agent's payout row (the price less the platform fee, rounded half up to the cent), the
  timeline entry, the agent's `completed_orders + 1` and the `order.completed` event with the
  payout due and the agent's payout wallet are written from the updated row;
- the order's children come back with it, and the answer is rendered from them by the same
  presenter the general way uses.

When the statement does not apply (another party, another state, a change in between, a caller
with an Idempotency-Key, SQLite), it writes nothing and the general way runs, which gives a
refusal its exact error. What an approval is (who, from where, to where, which event) is read
from the state machine's table; tests/test_oneshot.py holds both ways' rows, events and answers
to each other.
"""
from __future__ import annotations

import datetime as dt
from types import SimpleNamespace

from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from shared import logs
from shared.auth import Caller
from shared.db import Database, isoformat, utcnow
from shared.ids import new_id

from . import present
from . import statemachine as sm
from .models import Order

_ROW = next(t for t in sm.TABLE if t.action == "approve")
# the statement below is this row: one actor, one source, one target, no guard, no effect
assert _ROW.actor == "buyer" and _ROW.guard is None and len(_ROW.sources) == 1 and list(_ROW.targets) == ["default"]
(SOURCE,) = _ROW.sources
TARGET = _ROW.target()
EVENT = _ROW.event


def _usd(cents: str) -> str:
    """SQL for shared.money.format_usd of a non-negative amount in cents."""
    return f"((({cents}) / 100)::text || '.' || lpad((({cents}) % 100)::text, 2, '0'))"


_STATEMENT = text(f"""
WITH seen AS (SELECT version FROM orders WHERE id = :order_id),
o AS (
    UPDATE orders SET status = :target, updated_at = :now, completed_at = :now, settled_at = :now,
           settled_agent_cents = quoted_price_cents, settled_buyer_cents = 0,
           event_sequence = event_sequence + 1, version = orders.version + 1
    FROM seen
    WHERE orders.id = :order_id AND orders.version = seen.version AND orders.client_wallet = :wallet
      AND orders.status = :source AND orders.paid_at IS NOT NULL AND orders.settled_agent_cents IS NULL
      AND orders.quoted_price_cents > 0
    RETURNING orders.*
),
f AS (SELECT id, ((quoted_price_cents::bigint * :fee_bps + 5000) / 10000)::integer AS fee FROM o),
a AS (
    UPDATE agents SET completed_orders = completed_orders + 1 FROM o WHERE agents.id = o.agent_id
    RETURNING agents.payout_wallet, agents.payout_chain
),
s AS (
    INSERT INTO order_settlements (id, order_id, kind, status, amount_cents, fee_cents, version, updated_at)
    SELECT :payout_id, o.id, 'payout', 'pending', o.quoted_price_cents - f.fee, f.fee, 0, :now
    FROM o JOIN f ON f.id = o.id
),
t AS (
    INSERT INTO order_timeline (order_id, number, action, from_status, to_status, actor_type, actor_id, note, at)
    SELECT o.id, (SELECT count(*) + 1 FROM order_timeline WHERE order_id = o.id), :action, :source, :target,
           'buyer', :wallet, NULL, :now
    FROM o
),
x AS (
    INSERT INTO outbox_events (id, event, order_id, sequence, data, request_id, created_at, attempts)
    SELECT :event_id, :event, o.id, o.event_sequence, json_build_object(
               'order_id', o.id, 'agent_id', o.agent_id, 'client_wallet', o.client_wallet, 'status', o.status,
               'action', :action, 'from', :source, 'to', :target, 'held_usd', {_usd("o.quoted_price_cents")},
               'payout_due', json_build_object(
                   'id', :payout_id, 'agent_id', o.agent_id, 'gross_usd', {_usd("o.quoted_price_cents")},
                   'fee_usd', {_usd("f.fee")}, 'amount_usd', {_usd("o.quoted_price_cents - f.fee")},
                   'wallet', a.payout_wallet, 'chain', a.payout_chain)),
           :request_id, :now, 0
    FROM o JOIN f ON f.id = o.id LEFT JOIN a ON true
    RETURNING data
)
SELECT row_to_json(o) AS order_row, f.fee, x.data AS event_data,
       (SELECT json_agg(json_build_object('action', e.action, 'from_status', e.from_status, 'to_status', e.to_status,
                                          'actor_type', e.actor_type, 'actor_id', e.actor_id, 'note', e.note,
                                          'at', e.at) ORDER BY e.number)
        FROM order_timeline e WHERE e.order_id = o.id) AS timeline_rows,
       (SELECT json_agg(json_build_object('id', d.id, 'number', d.number, 'created_at', d.created_at, 'items',
                        (SELECT coalesce(json_agg(row_to_json(i) ORDER BY i.position), '[]')
                         FROM delivery_items i WHERE i.delivery_id = d.id)) ORDER BY d.number)
        FROM deliveries d WHERE d.order_id = o.id) AS delivery_rows,
       (SELECT json_agg(row_to_json(r) ORDER BY r.number) FROM revisions r WHERE r.order_id = o.id) AS revision_rows,
       (SELECT row_to_json(w) FROM workspaces w WHERE w.order_id = o.id) AS workspace_row
FROM o JOIN f ON f.id = o.id CROSS JOIN x
""")

_TIMES = frozenset(c.name for c in Order.__table__.columns if c.name.endswith("_at"))


def approve(db: Database, rt, views, order_id: str, caller: Caller) -> dict | None:
    """Approve the caller's order in one statement, publish its event and drop its cached views.
    Returns the caller's view of the completed order, or None when the statement did not apply
    (nothing was written: the general way decides)."""
    if not db.is_postgres or caller.kind != _ROW.actor:
        return None
    now, payout_id, event_id = utcnow(), new_id("payout"), new_id("event")
    request_id = logs.request_id.get()
    views.forget(order_id)  # as the general way drops them before its commit
    try:
        row = db.row_of(_STATEMENT, {
            "order_id": order_id, "wallet": caller.id, "now": now, "source": SOURCE, "target": TARGET,
            "action": _ROW.action, "event": EVENT, "fee_bps": rt.settings.platform_fee_bps,
            "payout_id": payout_id, "event_id": event_id, "request_id": request_id})
    except IntegrityError:  # a change committed meanwhile took the timeline's next number
        return None
    if row is None:
        return None
    logs.order_id.set(order_id)
    order = _order(row, caller, payout_id, now)
    # the event to its consumers and the cached views dropped, in one round trip
    rt.outbox.hand_off([{"id": event_id, "event": EVENT, "order_id": order_id, "sequence": order.event_sequence,
                         "created_at": isoformat(now), "data": row["event_data"], "request_id": request_id}],
                       also=lambda commands: views.drop(order_id, order.status, order.version, commands))
    full = present.full_order(order)
    return present.for_role(full, _ROW.actor, rt.links)


def _order(row, caller: Caller, payout_id: str, now: dt.datetime) -> SimpleNamespace:
    """The completed order as present.full_order reads it, from what the statement returned (its
    children as they were when it began, plus what it added)."""
    order = SimpleNamespace(**{name: _time(value) if name in _TIMES else value
                               for name, value in row["order_row"].items()})
    order.timeline = [SimpleNamespace(**dict(e, at=_time(e["at"]))) for e in row["timeline_rows"] or ()]
    order.timeline.append(SimpleNamespace(action=_ROW.action, from_status=SOURCE, to_status=TARGET, actor_type="buyer",
                                          actor_id=caller.id, note=None, at=now))
    order.deliveries = [SimpleNamespace(id=d["id"], number=d["number"], created_at=_time(d["created_at"]),
                                        items=[SimpleNamespace(**i) for i in d["items"]])
                        for d in row["delivery_rows"] or ()]
    order.revisions = [SimpleNamespace(**dict(r, created_at=_time(r["created_at"]))) for r in row["revision_rows"] or ()]
    workspace = row["workspace_row"]
    order.workspace = SimpleNamespace(**{k: _time(v) if k.endswith("_at") else v for k, v in workspace.items()}) \
        if workspace else None
    order.review = None  # only a completed order has one
    order.settlements = [SimpleNamespace(id=payout_id, kind="payout", status="pending",
                                         amount_cents=order.quoted_price_cents - row["fee"], fee_cents=row["fee"],
                                         tx_ref=None, error=None, updated_at=now)]
    return order


def _time(value: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(value) if value is not None else None
