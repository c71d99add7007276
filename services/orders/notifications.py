"""Buyer notifications: what happened on a buyer's orders that the buyer should see — a quote, a
delivery, a workspace's close, a dispute's resolution, a refund sent, a message from the agent.
Made from the order events (once per event; which events: shared/events.py) by the default
worker; read and marked read through `/api/notifications`."""
from __future__ import annotations

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shared import events
from shared.db import isoformat, utcnow
from shared.ids import new_id
from shared.money import format_usd

from .models import Notification, Order

PREVIEW = 200  # characters of a message shown in its notification


def kind_and_text(event: str, data: dict, order: Order) -> tuple[str, str] | None:
    """What the buyer is told about this event, or None if it is not the buyer's news
    (events.buyers_news says which completions, cancellations and messages are)."""
    if not events.buyers_news(event, data):
        return None
    if event == "order.quoted":
        return "quoted", f"The agent quoted {format_usd(order.quoted_price_cents)} USDC for your order."
    if event == "order.delivered":
        if data.get("action") == "close_workspace":
            return "workspace_closed", (f"Your workspace closed: {data.get('generations', 0)} generation(s) are "
                                        "the delivery. Review it, approve it or ask for a revision.")
        return "delivered", "The agent delivered your order. Review it, approve it or ask for a revision."
    if event in ("order.completed", "order.cancelled"):
        return "dispute_resolved", (f"Your dispute was resolved: {format_usd(order.settled_agent_cents or 0)} USDC "
                                    f"to the agent, {format_usd(order.settled_buyer_cents or 0)} USDC back to you.")
    if event == "order.refund_sent":
        return "refund_sent", f"Your refund of {data.get('amount_usd')} USDC was sent."
    if event == "order.message":
        content = data.get("content") or ""
        return "message", "The agent wrote: " + (content if len(content) <= PREVIEW else content[:PREVIEW - 1] + "…")
    return None


def record(session: Session, message: dict) -> bool:
    """A notification for the order's buyer, once per event."""
    order = session.get(Order, message.get("order_id") or "")
    if order is None:
        return False
    told = kind_and_text(message["event"], message.get("data") or {}, order)
    if told is None:
        return False
    kind, text = told
    try:
        with session.begin_nested():
            session.add(Notification(id=new_id("notification"), wallet=order.client_wallet, order_id=order.id,
                                     kind=kind, text=text, event_id=message["id"], created_at=utcnow()))
    except IntegrityError:  # a repeated message
        return False
    return True


def unread_count(session: Session, wallet: str) -> int:
    return session.scalar(select(func.count()).select_from(Notification)
                          .where(Notification.wallet == wallet, Notification.read_at.is_(None)))


def mark_read(session: Session, wallet: str, ids: list[str] | None) -> int:
    """Mark the buyer's own notifications read (these ids, or all); others' ids are ignored."""
    query = update(Notification).where(Notification.wallet == wallet, Notification.read_at.is_(None))
    if ids is not None:
        query = query.where(Notification.id.in_(ids))
    return session.execute(query.values(read_at=utcnow()), execution_options={"synchronize_session": False}).rowcount


def present(row: Notification) -> dict:
    return {"id": row.id, "kind": row.kind, "order_id": row.order_id, "text": row.text,
            "created_at": isoformat(row.created_at), "read_at": isoformat(row.read_at)}
