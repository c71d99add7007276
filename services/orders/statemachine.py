"""The order state machine: one declared table that the code reads (DESIGN.md §3).

Each row: an action, who may take it, the states it starts from, where it goes, an optional
guard (a named rule about time), and the event it emits. Effects (money, timers, deliveries)
live in services.py, keyed by action. Anything not in the table is refused.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Callable

from shared import errors

STATES = ("pending_quote", "quoted", "accepted", "paid", "in_progress", "delivered",
          "revision_requested", "completed", "disputed", "cancelled")
TERMINAL = frozenset({"completed", "cancelled"})
ACTORS = ("buyer", "agent", "admin", "system")
# states in which the buyer has paid and the money is held
MONEY_HELD = frozenset({"paid", "in_progress", "delivered", "revision_requested", "disputed"})
# messaging is open here (DESIGN.md §3)
MESSAGING_OPEN = frozenset({"paid", "in_progress", "delivered", "revision_requested", "completed", "disputed"})


def _overdue_without_delivery(order, now: dt.datetime, settings) -> str | None:
    if order.delivery_count:
        return "the agent has already delivered"
    if order.due_at is None or now < order.due_at:
        return "the turnaround time (due_at) has not passed yet"
    return None


def _review_window_over(order, now, settings) -> str | None:
    if order.review_deadline_at is None or now < order.review_deadline_at:
        return "the review deadline has not passed"
    return None


def _quote_stale(order, now, settings) -> str | None:
    if now < order.created_at + dt.timedelta(seconds=settings.quote_expiry_seconds):
        return "the quote is not old enough to expire"
    return None


def _workspace_period_over(order, now, settings) -> str | None:
    workspace = order.workspace if order.price_type in ("weekly", "monthly") else None
    if workspace is None:
        return "the order has no workspace"
    if now < workspace.expires_at:
        return "the workspace's period has not ended"
    return None


Guard = Callable[[object, dt.datetime, object], "str | None"]  # returns why not, or None


@dataclass(frozen=True)
class Transition:
    action: str
    actor: str
    sources: frozenset
    targets: dict  # variant → target state; "default" unless the effect picks another
    event: str
    guard: Guard | None = None

    def target(self, variant: str = "default") -> str:
        return self.targets[variant]


def T(action, actor, sources, target, event, guard=None) -> Transition:
    targets = target if isinstance(target, dict) else {"default": target}
    return Transition(action, actor, frozenset(sources), targets, event, guard)


TABLE: tuple[Transition, ...] = (
    T("quote", "agent", {"pending_quote"}, "quoted", "order.quoted"),
    T("accept", "buyer", {"quoted"}, "accepted", "order.accepted"),
    T("pay", "buyer", {"quoted", "accepted"}, {"default": "paid", "workspace": "in_progress"}, "order.paid"),
    T("start", "agent", {"paid"}, "in_progress", "order.started"),
    T("deliver", "agent", {"paid", "in_progress", "revision_requested", "disputed", "delivered"},
      "delivered", "order.delivered"),
    T("approve", "buyer", {"delivered"}, "completed", "order.completed"),
    T("revision", "buyer", {"delivered"}, "revision_requested", "order.revision_requested"),
    T("dispute", "buyer", {"delivered"}, "disputed", "order.disputed"),
    T("dispute", "buyer", {"paid", "in_progress"}, "disputed", "order.disputed", _overdue_without_delivery),
    T("cancel", "buyer", {"pending_quote", "quoted", "accepted", "paid"}, "cancelled", "order.cancelled"),
    T("cancel", "buyer", {"in_progress"}, "cancelled", "order.cancelled", _overdue_without_delivery),
    T("decline", "agent", {"pending_quote", "quoted", "accepted", "paid", "in_progress"},
      "cancelled", "order.cancelled"),
    T("resolve", "admin", {"disputed"},
      {"release": "completed", "split": "completed", "refund": "cancelled"}, "order.resolved"),
    T("auto_complete", "system", {"delivered"}, "completed", "order.completed", _review_window_over),
    T("expire_quote", "system", {"pending_quote", "quoted", "accepted"}, "cancelled", "order.cancelled",
      _quote_stale),
    T("close_workspace", "system", {"in_progress"}, "delivered", "order.delivered", _workspace_period_over),
)

ACTIONS = tuple(dict.fromkeys(t.action for t in TABLE))


def find(action: str, actor: str, order, now: dt.datetime, settings) -> Transition:
    """The row that allows `actor` to take `action` on `order` now, or the refusal."""
    rows = [t for t in TABLE if t.action == action]
    if not rows:
        raise errors.ValidationError(f"Unknown action '{action}'.")
    mine = [t for t in rows if t.actor == actor]
    if not mine:
        raise errors.Forbidden(f"Only the {rows[0].actor} can {action} this order.")
    reasons = []
    for row in mine:
        if order.status not in row.sources:
            continue
        why_not = row.guard(order, now, settings) if row.guard else None
        if why_not is None:
            return row
        reasons.append(why_not)
    details = {"status": order.status, "action": action}
    if reasons:
        details["reason"] = reasons[0]
    raise errors.InvalidTransition(
        f"Cannot {action} an order that is {order.status}" + (f": {reasons[0]}." if reasons else "."), details)


def allowed_pairs() -> set[tuple[str, str, str]]:
    """Every (state, action, actor) the table can allow, ignoring guards."""
    return {(s, t.action, t.actor) for t in TABLE for s in t.sources}
