"""What each viewer sees of a resource: plain dicts for the envelope's `data`."""
from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

from shared.auth import Caller
from shared.db import isoformat
from shared.money import format_usd

from .files import Links, original_allowed
from .models import Agent, DeliveryItem, Generation, Order, Review, Service, Settlement, Workspace
from .services import WORKSPACE_TYPES, party_of


def agent(a: Agent, private: bool = False) -> dict:
    avg = None
    if a.review_count:
        avg = str((Decimal(a.rating_sum) / a.review_count).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP))
    out = {"id": a.id, "name": a.name, "avg_rating": avg, "review_count": a.review_count,
           "rating_histogram": {str(n): getattr(a, f"rating_{n}") for n in range(1, 6)},
           "completed_orders": a.completed_orders, "total_orders": a.total_orders,
           "created_at": isoformat(a.created_at)}
    if private:  # the agent's own payout and webhook settings
        out.update(payout_wallet=a.payout_wallet, payout_chain=a.payout_chain, endpoint_url=a.endpoint_url)
    return out


def service(s: Service) -> dict:
    return {"id": s.id, "agent_id": s.agent_id, "title": s.title, "description": s.description,
            "price_type": s.price_type, "price_usd": format_usd(s.price_cents),
            "turnaround_hours": s.turnaround_hours, "max_revisions": s.max_revisions,
            "quota_limit": s.quota_limit, "created_at": isoformat(s.created_at)}


def review(r: Review | None) -> dict | None:
    if r is None:
        return None
    return {"id": r.id, "order_id": r.order_id, "rating": r.rating, "comment": r.comment,
            "created_at": isoformat(r.created_at)}


def order(o: Order, viewer: Caller, links: Links) -> dict:
    return for_role(full_order(o), party_of(o, viewer), links)


def for_role(full: dict, role: str, links: Links) -> dict:
    """What one party (buyer, agent, admin) sees of the full view of an order."""
    out = dict(full)
    # the agent follows its payout, the buyer its refund (DESIGN.md §4)
    if role == "buyer":
        out["payout"] = None
    elif role == "agent":
        out["refund"] = None
    out["deliveries"] = [dict(d, items=[_item(i, role, full["status"], links) for i in d["items"]])
                         for d in full["deliveries"]]
    return out


def _item(item: dict, role: str, status: str, links: Links) -> dict:
    """A delivered item as this viewer may see it: files only through signed links, and an
    image's original withheld from the buyer until the order is completed (DESIGN.md §3)."""
    shown = {k: v for k, v in item.items() if not k.startswith("_")}
    if not original_allowed(role, item["media_type"], status):
        shown["url"] = None
    elif item["_stored"]:
        shown["url"] = links.url(item["id"], "original", role)
    shown["preview_url"] = links.url(item["id"], "preview", role) if item["_preview"] else None
    if role == "buyer":
        shown["preview_error"] = None  # the reason is for the agent to act on
    return shown


def settlement(row: Settlement) -> dict:
    out = {"id": row.id, "status": row.status, "amount_usd": format_usd(row.amount_cents), "tx_ref": row.tx_ref,
           "error": row.error, "updated_at": isoformat(row.updated_at)}
    if row.kind == "payout":
        out["fee_usd"] = format_usd(row.fee_cents)
    return out


def _full_item(i: DeliveryItem) -> dict:
    """Everything about a delivered item; `_item` cuts it down for one viewer."""
    return {"id": i.id, "media_type": i.media_type, "title": i.title, "url": i.url,
            "content_type": i.content_type, "size": i.size, "sha256": i.sha256,
            "preview_url": None, "preview_status": i.preview_status, "preview_error": i.preview_error,
            "_stored": i.storage_key is not None, "_preview": i.preview_key is not None}


def workspace(w: Workspace | None) -> dict | None:
    if w is None:
        return None
    return {"opened_at": isoformat(w.opened_at), "expires_at": isoformat(w.expires_at),
            "closed_at": isoformat(w.closed_at), "quota_total": w.quota_total, "quota_used": w.quota_used,
            "generations_pending": w.generations_pending}


def generation(g: Generation, role: str, order_status: str, links: Links) -> dict:
    """A generation as one viewer sees it: an image result through the same gate as deliveries."""
    return {"id": g.id, "order_id": g.order_id, "prompt": g.prompt, "status": g.status,
            "created_at": isoformat(g.created_at), "dispatched_at": isoformat(g.dispatched_at),
            "deadline_at": isoformat(g.deadline_at), "answered_at": isoformat(g.answered_at), "error": g.error,
            "result": _item(_full_item(g.item), role, order_status, links) if g.item is not None else None}


def full_order(o: Order) -> dict:
    settlements = {row.kind: settlement(row) for row in (o.settlements if o.settled_at else ())}
    deliveries = [{
        "id": d.id, "number": d.number, "created_at": isoformat(d.created_at),
        "items": [_full_item(i) for i in d.items],
    } for d in (o.deliveries if o.delivery_count else ())]
    return {
        "id": o.id, "status": o.status, "service_id": o.service_id, "agent_id": o.agent_id,
        "client_wallet": o.client_wallet, "price_type": o.price_type, "brief": o.brief,
        "reference_urls": o.reference_urls or [], "quoted_price_usd": format_usd(o.quoted_price_cents),
        "escrow_tx_hash": o.escrow_tx_hash, "revision_count": o.revision_count,
        "max_revisions": o.max_revisions, "due_at": isoformat(o.due_at),
        "review_deadline_at": isoformat(o.review_deadline_at), "deliveries": deliveries,
        "revisions": [{"number": r.number, "feedback": r.feedback, "is_extra": r.is_extra,
                       "created_at": isoformat(r.created_at)} for r in (o.revisions if o.revision_count else ())],
        "workspace": workspace(o.workspace) if o.price_type in WORKSPACE_TYPES else None,
        "previous_order_id": o.previous_order_id, "next_order_id": o.next_order_id, "review": review(o.review),
        "payout": settlements.get("payout"), "refund": settlements.get("refund"),
        "timeline": [{"action": t.action, "from": t.from_status, "to": t.to_status, "actor_type": t.actor_type,
                      "actor_id": t.actor_id, "at": isoformat(t.at), "note": t.note} for t in o.timeline],
        "created_at": isoformat(o.created_at), "updated_at": isoformat(o.updated_at),
    }
