"""Domain logic of orders: no `request`, no commit. Raise to refuse; the wrapper rolls back."""
from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass

from sqlalchemy import func, select, tuple_, update
from sqlalchemy.orm import Session, object_session, selectinload
from sqlalchemy.orm.attributes import set_committed_value

from shared import errors, logs
from shared.auth import Caller, hash_secret, new_api_key, new_webhook_secret
from shared.db import isoformat, utcnow
from shared.filetypes import COMPATIBLE
from shared.ids import new_id
from shared.money import fee_cents, format_usd
from shared.outbox import Outbox
from shared.settings import Settings
from shared.storage import LocalStorage, make_storage

from . import cache, webhooks
from . import statemachine as sm
from .models import (Agent, Delivery, DeliveryItem, Generation, Order, OutboxEvent, Revision, Review, Service,
                     Settlement, TimelineEntry, Timer, Upload, Workspace)
from .files import Links
from .payments import ASSET, Expected, destination_for, make_verifier

log = logging.getLogger(__name__)

WORKSPACE_TYPES = frozenset({"weekly", "monthly"})


RELAY_TASK = "orders.relay_outbox"


@dataclass
class Runtime:
    """What the domain needs from the outside, built once per process."""
    settings: Settings
    outbox: Outbox
    verifier: object
    links: Links
    storage: LocalStorage


def build_runtime(settings: Settings, db, celery_app, cache_client) -> tuple[Runtime, cache.OrderViews]:
    """Wire the domain to this process's database, broker and cache (web app and workers alike)."""
    links = Links.from_settings(settings)
    views = cache.OrderViews(cache_client, links)
    views.watch(db.sessionmaker)
    return Runtime(settings, Outbox(OutboxEvent, celery_app, db, relay_task=RELAY_TASK),
                   make_verifier(settings), links, make_storage(settings)), views


# --- agents and services ---------------------------------------------------------------------

def register_agent(session: Session, rt: Runtime, data: dict) -> tuple[Agent, str, str | None]:
    if data.get("endpoint_url"):
        webhooks.validate_endpoint(data["endpoint_url"], rt.settings)
    api_key = new_api_key()
    secret = new_webhook_secret() if data.get("endpoint_url") else None
    agent = Agent(id=new_id("agent"), name=data["name"].strip(), api_key_hash=hash_secret(api_key),
                  payout_wallet=data.get("payout_wallet"), payout_chain=data.get("payout_chain"),
                  endpoint_url=data.get("endpoint_url"), webhook_secret=secret)
    session.add(agent)
    return agent, api_key, secret


def update_agent(session: Session, rt: Runtime, agent: Agent, data: dict) -> str | None:
    """Apply a profile change; returns a new webhook secret when an endpoint is first set."""
    if data.get("endpoint_url"):
        webhooks.validate_endpoint(data["endpoint_url"], rt.settings)
    secret = None
    if data.get("payout_wallet") and (data["payout_wallet"], data.get("payout_chain")) != (
            agent.payout_wallet, agent.payout_chain):
        # payouts waiting for a destination resume as soon as there is one
        rt.outbox.record(session, "agent.payout_wallet_set", {"agent_id": agent.id})
    for key in ("name", "payout_wallet", "payout_chain", "endpoint_url"):
        if key in data:
            setattr(agent, key, data[key].strip() if key == "name" else data[key])
    if data.get("endpoint_url") and not agent.webhook_secret:
        secret = agent.webhook_secret = new_webhook_secret()
    agent.updated_at = utcnow()
    return secret


def agent_by_key(session: Session, api_key: str) -> Agent | None:
    return session.scalar(select(Agent).where(Agent.api_key_hash == hash_secret(api_key)))


def create_service(session: Session, rt: Runtime, agent: Agent, data: dict) -> Service:
    service = Service(id=new_id("service"), agent_id=agent.id, title=data["title"].strip(),
                      description=data["description"], price_type=data["price_type"],
                      price_cents=data.get("price_cents"),
                      turnaround_hours=data.get("turnaround_hours") or rt.settings.default_turnaround_hours,
                      max_revisions=data.get("max_revisions", 3), quota_limit=data.get("quota_limit", 0),
                      active=True, created_at=utcnow())
    session.add(service)
    return service


# --- orders ----------------------------------------------------------------------------------

def place_order(session: Session, rt: Runtime, buyer: Caller, data: dict, renews: Order | None = None) -> Order:
    """A new order at the service's terms; `renews`: the previous period's order it continues."""
    service = session.get(Service, data["service_id"])
    if service is None or not service.active:
        raise errors.NotFound("No such service.")
    now = utcnow()
    listed = service.price_type != "quote"
    order = Order(id=new_id("order"), status="quoted" if listed else "pending_quote", service_id=service.id,
                  agent_id=service.agent_id, client_wallet=buyer.id, client_chain=buyer.chain,
                  price_type=service.price_type, brief=data["brief"],
                  reference_urls=data.get("reference_urls") or [],
                  quoted_price_cents=service.price_cents if listed else None,
                  max_revisions=service.max_revisions, turnaround_hours=service.turnaround_hours,
                  revision_count=0, delivery_count=0, event_sequence=0, created_at=now, updated_at=now,
                  previous_order_id=renews.id if renews else None)
    session.add(order)
    _timeline(order, "create", None, order.status, buyer, now, f"renews {renews.id}" if renews else None)
    _set_timer(session, order, "expire_quote", now + dt.timedelta(seconds=rt.settings.quote_expiry_seconds))
    _bump_agent(session, service.agent_id, total_orders=1)
    _emit(session, rt, order, "order.created", {"action": "create", "from": None, "to": order.status})
    return order


def get_order(session: Session, order_id: str, caller: Caller, for_update: bool = False) -> Order:
    """The order if the caller may see it; strangers get 404, never a hint that it exists."""
    query = select(Order).where(Order.id == order_id)
    if for_update:
        query = query.with_for_update(of=Order)  # lock the order row, not the joined review
    order = session.scalar(query)
    if order is None or not can_view(order, caller):
        raise errors.NotFound("No such order.")
    logs.order_id.set(order.id)
    return order


def can_view(order: Order, caller: Caller) -> bool:
    return caller.kind == "admin" or party_of(order, caller) is not None


def party_of(order: Order, caller: Caller) -> str | None:
    if caller.kind == "buyer" and caller.id == order.client_wallet:
        return "buyer"
    if caller.kind == "agent" and caller.id == order.agent_id:
        return "agent"
    if caller.kind == "admin":
        return "admin"
    return None


def list_orders(session: Session, *, client_wallet: str | None = None, agent_id: str | None = None,
                statuses: list[str] | None = None, cursor: tuple | None = None, limit: int = 20):
    query = select(Order)
    if client_wallet is not None:
        query = query.where(Order.client_wallet == client_wallet)
    if agent_id is not None:
        query = query.where(Order.agent_id == agent_id)
    if statuses:
        query = query.where(Order.status.in_(statuses))
    query = query.options(selectinload(Order.deliveries), selectinload(Order.revisions),
                          selectinload(Order.workspace))  # one query each per page
    return keyset_page(session, query, Order, cursor, limit)


def list_services(session: Session, *, agent_id: str | None = None, cursor: tuple | None = None,
                  limit: int = 20):
    query = select(Service).where(Service.active.is_(True))
    if agent_id:
        query = query.where(Service.agent_id == agent_id)
    return keyset_page(session, query, Service, cursor, limit)


def keyset_page(session: Session, query, model, cursor: tuple | None, limit: int):
    """Newest first: up to `limit` rows after `cursor` (created_at, id), and the row to continue
    from when more follow (else None)."""
    if cursor is not None:
        query = query.where(tuple_(model.created_at, model.id) < tuple_(*cursor))
    rows = session.scalars(query.order_by(model.created_at.desc(), model.id.desc()).limit(limit + 1)).unique().all()
    return rows[:limit], (rows[limit - 1] if len(rows) > limit else None)


def payment_instructions(order: Order, rt: Runtime) -> dict:
    if order.quoted_price_cents is None:
        raise errors.InvalidTransition("The order has no price yet: wait for the agent's quote.",
                                       {"status": order.status})
    return {"amount_usd": format_usd(order.quoted_price_cents), "asset": ASSET, "chain": order.client_chain,
            "destination": destination_for(order.client_chain, rt.settings), "from_wallet": order.client_wallet}


def act(session: Session, rt: Runtime, order: Order, action: str, caller: Caller, params: dict,
        now: dt.datetime | None = None) -> Order:
    """Take one action of the table on the order, with its effect, timeline entry and event."""
    now = now or utcnow()
    row = _allowed(order, action, caller, now, rt.settings)
    effect = EFFECTS.get(action)
    variant = effect(session, rt, order, caller, params, now) if effect else None
    source, target = order.status, row.target(variant or "default")
    if action == "pay" and source == "quoted":
        # paying a quote accepts it first, and the timeline says so
        _timeline(order, "accept", "quoted", "accepted", caller, now, None)
        source = "accepted"
    if source == "in_progress" and target != "in_progress" and order.price_type in WORKSPACE_TYPES:
        _end_workspace(session, order, now)
    order.status = target
    order.updated_at = now
    if target == "completed":
        order.completed_at = now
    elif target == "cancelled":
        order.cancelled_at = now
    _timeline(order, action, source, target, caller, now, params.get("note"))
    event = row.event
    if action == "resolve":
        event = "order.completed" if target == "completed" else "order.cancelled"
    data = {"action": action, "from": source, "to": target, **_settlement(session, order, target, rt.settings, now),
            **params.pop("_event", {})}
    if action == "pay":  # the payouts worker funds the order's escrow from this
        data["held_usd"] = format_usd(order.quoted_price_cents)
    _emit(session, rt, order, event, data)
    if target == "completed":  # last: this statement flushes the order's changes first, all in one UPDATE
        _bump_agent(session, order.agent_id, completed_orders=1)
    return order


def _allowed(order: Order, action: str, caller: Caller, now: dt.datetime, settings: Settings) -> sm.Transition:
    """The table's row for this action by this caller, or the error that refuses it."""
    actor = "system" if caller.kind == "system" else party_of(order, caller)
    if actor is None:
        raise errors.NotFound("No such order.")
    return sm.find(action, actor, order, now, settings)


def verify_payment(session: Session, rt: Runtime, order: Order, caller: Caller, params: dict) -> None:
    """Check a pay before the order's row is locked, with `act`'s refusals first (who, which state,
    a reused hash), then the payment network's answer. That answer can take a node's whole timeout,
    and the order's row lock (on SQLite the database's write lock) should not wait on it. What was
    verified goes into params: the locked pay asks again only if the order's price or wallet differ."""
    _allowed(order, "pay", caller, utcnow(), rt.settings)
    tx_hash, expected = _payment_of(order, rt, params["escrow_tx_hash"])
    rt.verifier.verify(session, tx_hash, expected)
    params["_verified"] = (tx_hash, expected)


def _payment_of(order: Order, rt: Runtime, tx_hash: str) -> tuple[str, Expected]:
    """The hash as stored, and the transfer it must be; a hash that paid an order already is refused."""
    if order.client_chain == "base":  # hex: one hash in any case, stored as nodes and explorers write it
        tx_hash = tx_hash.lower()
    if object_session(order).scalar(select(Order.id).where(Order.escrow_tx_hash == tx_hash)):
        raise errors.PaymentReused()
    return tx_hash, Expected(order.quoted_price_cents, destination_for(order.client_chain, rt.settings), ASSET,
                             order.client_chain, order.client_wallet)


# effects: run after the table allowed the action and before the state changes; may pick a variant

def _quote(session, rt, order, caller, params, now):
    order.quoted_price_cents = params["price_cents"]


def _pay(session, rt, order, caller, params, now):
    tx_hash, expected = _payment_of(order, rt, params["escrow_tx_hash"])
    if params.pop("_verified", None) != (tx_hash, expected):  # not verified before the lock, or for another price
        rt.verifier.verify(session, tx_hash, expected)
    order.escrow_tx_hash = tx_hash
    order.paid_at = now
    if order.price_type not in WORKSPACE_TYPES:
        order.due_at = now + dt.timedelta(hours=order.turnaround_hours)
        return None
    # a weekly or monthly order opens its workspace; the period's end is when its delivery is due
    period = rt.settings.workspace_weekly_seconds if order.price_type == "weekly" else rt.settings.workspace_monthly_seconds
    workspace = Workspace(order_id=order.id, opened_at=now, expires_at=now + dt.timedelta(seconds=period),
                          quota_total=session.get(Service, order.service_id).quota_limit, quota_used=0,
                          generations_pending=0)
    order.workspace = workspace
    order.due_at = workspace.expires_at
    params["_event"] = {"workspace": {"opened_at": isoformat(now), "expires_at": isoformat(workspace.expires_at),
                                      "quota_total": workspace.quota_total}}
    return "workspace"


def workspace_open(order: Order) -> bool:
    return order.price_type in WORKSPACE_TYPES and order.workspace is not None and order.workspace.closed_at is None


def _end_workspace(session: Session, order: Order, now: dt.datetime) -> None:
    """The order leaves in_progress (closed at period end, cancelled, declined, disputed): no more
    generate calls; generations still unanswered expire and give their units back."""
    workspace = order.workspace
    if workspace is None or workspace.closed_at is not None:
        return
    workspace.closed_at = now
    expired = session.execute(
        update(Generation).where(Generation.order_id == order.id, Generation.status == "pending")
        .values(status="expired", answered_at=now, error="The workspace closed before an answer came."),
        execution_options={"synchronize_session": False}).rowcount
    if expired:
        workspace.quota_used = Workspace.quota_used - expired
        workspace.generations_pending = Workspace.generations_pending - expired


def _close_workspace(session, rt, order, caller, params, now):
    """At the period's end the completed generations become the order's delivery."""
    items = list(session.scalars(
        select(DeliveryItem).join(Generation, Generation.item_id == DeliveryItem.id)
        .where(Generation.order_id == order.id, Generation.status == "completed")
        .order_by(Generation.created_at, Generation.id)))
    delivery = _new_delivery(session, rt, order, now)
    for position, item in enumerate(items):
        item.position = position
        delivery.items.append(item)
    params["note"] = f"{len(items)} generation(s) delivered"
    # previews still being rendered are asked for again under the delivery (harmless if ready)
    params["_event"] = {"delivery_id": delivery.id, "generations": len(items),
                        "items": [_media_item(i) for i in items if i.preview_status == "pending"]}


def _new_delivery(session: Session, rt: Runtime, order: Order, now: dt.datetime) -> Delivery:
    """The next numbered delivery, which opens the buyer's review window."""
    order.delivery_count += 1
    delivery = Delivery(id=new_id("delivery"), order_id=order.id, number=order.delivery_count, created_at=now)
    order.deliveries.append(delivery)
    order.review_deadline_at = now + dt.timedelta(seconds=rt.settings.review_window_seconds)
    _set_timer(session, order, "auto_complete", order.review_deadline_at)
    return delivery


def _deliver(session, rt, order, caller, params, now):
    if workspace_open(order):
        raise errors.InvalidTransition(
            "The workspace is open: its generations become the delivery when it closes.",
            {"status": order.status, "expires_at": isoformat(order.workspace.expires_at)})
    uploads = _uploads_for(session, order.agent_id, params["deliverables"])
    delivery = _new_delivery(session, rt, order, now)
    for position, spec in enumerate(params["deliverables"]):
        delivery.items.append(new_item(spec, position, uploads.get(position)))
    # what the media worker needs: where each item's bytes are
    params["_event"] = {"delivery_id": delivery.id, "items": [_media_item(i) for i in delivery.items]}


def new_item(spec: dict, position: int, upload: Upload | None) -> DeliveryItem:
    """A deliverable (a delivery's, or a generation's result): a URL, or an upload it now uses."""
    item = DeliveryItem(id=new_id("item"), position=position, media_type=spec["media_type"],
                        title=spec.get("title"), url=spec.get("url"),
                        # image previews are rendered by the media worker; until then the buyer waits
                        preview_status="pending" if spec["media_type"] == "image" else None)
    if upload is not None:
        item.upload_id, item.storage_key = upload.id, upload.storage_key
        item.content_type, item.size, item.sha256 = upload.content_type, upload.size, upload.sha256
        upload.item_id = item.id
    return item


def _media_item(item: DeliveryItem) -> dict:
    """Where an item's bytes are, as the media worker reads it."""
    return {"id": item.id, "media_type": item.media_type, "url": item.url, "storage_key": item.storage_key,
            "sha256": item.sha256}


def _uploads_for(session: Session, agent_id: str, deliverables: list[dict]) -> dict[int, Upload]:
    """The agent's own unused uploads named by the deliverables, each agreeing with its declared
    media type; any problem is a 400 naming the deliverable."""
    wanted = {i: d["upload_id"] for i, d in enumerate(deliverables) if "upload_id" in d}
    if not wanted:
        return {}
    query = select(Upload).where(Upload.id.in_(set(wanted.values())), Upload.agent_id == agent_id)
    found = {u.id: u for u in session.scalars(query.with_for_update())}
    problems, seen = {}, set()
    for index, upload_id in wanted.items():
        upload, declared = found.get(upload_id), deliverables[index]["media_type"]
        if upload is None:
            problems[str(index)] = {"upload_id": ["Unknown upload_id."]}
        elif upload.item_id is not None or upload_id in seen:
            problems[str(index)] = {"upload_id": ["This upload is already in a delivery."]}
        elif declared not in COMPATIBLE[upload.media_type]:
            problems[str(index)] = {"media_type": [
                f"The file is {upload.content_type} ({upload.media_type}), not {declared}."]}
        seen.add(upload_id)
    if problems:
        raise errors.ValidationError("Some deliverables do not match their uploads.",
                                     {"fields": {"deliverables": problems}})
    return {index: found[upload_id] for index, upload_id in wanted.items()}


def _revision(session, rt, order, caller, params, now):
    order.revision_count += 1
    order.revisions.append(Revision(order_id=order.id, number=order.revision_count, feedback=params["feedback"],
                                    is_extra=order.revision_count > order.max_revisions, created_at=now))
    params["note"] = params["feedback"]


def _with_reason(session, rt, order, caller, params, now):
    params["note"] = params.get("reason") or None


def _resolve(session, rt, order, caller, params, now):
    held = order.quoted_price_cents
    outcome = params["outcome"]
    if outcome == "split":
        agent_part = params.get("agent_amount_cents")
        if agent_part is None:
            raise errors.ValidationError("A split needs agent_amount_usd.",
                                         {"fields": {"agent_amount_usd": ["Required for a split."]}})
        if not 0 < agent_part < held:
            raise errors.ValidationError(
                f"agent_amount_usd must be more than 0.00 and less than the {format_usd(held)} held.",
                {"fields": {"agent_amount_usd": ["Out of range."]}})
        buyer_part = params.get("buyer_amount_cents")
        if buyer_part is not None and buyer_part + agent_part != held:
            raise errors.ValidationError(
                f"The parts must add up to the {format_usd(held)} held.",
                {"fields": {"buyer_amount_usd": ["agent part + buyer part must equal the amount held."]}})
        order.settled_agent_cents, order.settled_buyer_cents = agent_part, held - agent_part
    elif outcome == "release":
        order.settled_agent_cents, order.settled_buyer_cents = held, 0
    else:
        order.settled_agent_cents, order.settled_buyer_cents = 0, held
    params["note"] = f"{outcome}: {params['note']}"
    return outcome


EFFECTS = {"quote": _quote, "pay": _pay, "deliver": _deliver, "revision": _revision,
           "dispute": _with_reason, "decline": _with_reason, "resolve": _resolve,
           "close_workspace": _close_workspace}


def _settlement(session: Session, order: Order, target: str, settings: Settings, now: dt.datetime) -> dict:
    """Settle a paid order that reached its end: record the payout and/or refund due (pending until
    the payouts worker reports) and return what the event asks the payouts worker to move. The
    agent's payout wallet as of now goes with it, for the payouts worker's first attempt."""
    if target not in sm.TERMINAL or order.paid_at is None:
        return {}
    if order.settled_agent_cents is None:  # not resolved by an admin: all to one side
        if target == "completed":
            order.settled_agent_cents, order.settled_buyer_cents = order.quoted_price_cents, 0
        else:
            order.settled_agent_cents, order.settled_buyer_cents = 0, order.quoted_price_cents
    order.settled_at = now
    rows, wallet = [], None
    if order.settled_agent_cents:
        fee = fee_cents(order.settled_agent_cents, settings.platform_fee_bps)
        rows.append(Settlement(id=new_id("payout"), order_id=order.id, kind="payout", status="pending",
                               amount_cents=order.settled_agent_cents - fee, fee_cents=fee, version=0, updated_at=now))
        with session.no_autoflush:  # the order's changes flush later, in one UPDATE
            wallet = session.execute(select(Agent.payout_wallet, Agent.payout_chain)
                                     .where(Agent.id == order.agent_id)).one()
    if order.settled_buyer_cents:
        rows.append(Settlement(id=new_id("payout"), order_id=order.id, kind="refund", status="pending",
                               amount_cents=order.settled_buyer_cents, fee_cents=0, version=0, updated_at=now))
    # an order settles once: it had none, so these are all (and the collection needs no query)
    session.add_all(rows)
    set_committed_value(order, "settlements", rows)
    return settlement_of(order, wallet)


def settlement_of(order: Order, wallet: tuple[str | None, str | None] | None = None) -> dict:
    """The money a settled order moves, as the payouts worker reads it (event and catch-up alike);
    with the agent's payout `wallet` (address, chain) when it is known as of the settlement."""
    out = {"held_usd": format_usd(order.quoted_price_cents)}
    for row in order.settlements:
        if row.kind == "payout":
            out["payout_due"] = {"id": row.id, "agent_id": order.agent_id,
                                 "gross_usd": format_usd(row.amount_cents + row.fee_cents),
                                 "fee_usd": format_usd(row.fee_cents), "amount_usd": format_usd(row.amount_cents)}
            if wallet is not None:
                out["payout_due"]["wallet"], out["payout_due"]["chain"] = wallet
        else:
            out["refund_due"] = {"id": row.id, "wallet": order.client_wallet, "chain": order.client_chain,
                                 "amount_usd": format_usd(row.amount_cents)}
    return out


def _timeline(order: Order, action: str, source: str | None, target: str, caller: Caller, now, note) -> None:
    order.timeline.append(TimelineEntry(order_id=order.id, number=len(order.timeline) + 1, action=action,
                                        from_status=source, to_status=target, actor_type=caller.kind,
                                        actor_id=caller.id if caller.kind != "admin" else "admin",
                                        note=note, at=now))


def _set_timer(session: Session, order: Order, kind: str, due_at: dt.datetime) -> None:
    session.add(Timer(order_id=order.id, kind=kind, due_at=due_at))


def _emit(session: Session, rt: Runtime, order: Order, event: str, data: dict) -> None:
    cache.changed(session, order)
    order.event_sequence += 1
    rt.outbox.record(session, event, {"order_id": order.id, "agent_id": order.agent_id,
                                      "client_wallet": order.client_wallet, "status": order.status, **data},
                     order_id=order.id, sequence=order.event_sequence)


# --- settlements: the payouts worker's reports, the catch-up feed, admin retry ----------------

SETTLEMENT_EVENTS = {("payout", "sent"): "order.payout_sent", ("payout", "failed"): "order.payout_failed",
                     ("refund", "sent"): "order.refund_sent", ("refund", "failed"): "order.refund_failed"}


def apply_settlement_report(session: Session, rt: Runtime, order: Order, report: dict) -> bool:
    """Take the payouts worker's news of a payout or refund; an older report than the one held is
    ignored, so reports may arrive late, twice or out of order."""
    row = next((r for r in order.settlements if r.id == report["id"]), None)
    if row is None:
        raise errors.NotFound("No such payout on this order.")
    if report["version"] <= row.version:
        return False
    changed = row.status != report["status"]
    row.status, row.version = report["status"], report["version"]
    row.tx_ref, row.error = report.get("tx_ref"), report.get("error")
    row.updated_at = report["updated_at"]
    order.updated_at = utcnow()
    cache.changed(session, order)
    event = SETTLEMENT_EVENTS.get((row.kind, row.status))
    if changed and event:
        data = {"payout_id": row.id, "amount_usd": format_usd(row.amount_cents), "tx_ref": row.tx_ref}
        if row.error:
            data["error"] = row.error
        _emit(session, rt, order, event, data)
    return True


def settled_orders(session: Session, since: dt.datetime, after: tuple | None, limit: int) -> list[Order]:
    """Settled orders in (settled_at, id) order from `since` (then after the `after` key)."""
    query = select(Order).where(Order.settled_at.is_not(None), Order.settled_at >= since)
    if after is not None:
        query = query.where(tuple_(Order.settled_at, Order.id) > tuple_(*after))
    query = query.options(selectinload(Order.settlements)).order_by(Order.settled_at, Order.id).limit(limit)
    return list(session.scalars(query).unique())


def request_payout_retry(session: Session, rt: Runtime, payout_id: str) -> Settlement:
    """An admin asks for another round of attempts at a failed payout or refund."""
    row = session.scalar(select(Settlement).where(Settlement.id == payout_id).with_for_update())
    if row is None:
        raise errors.NotFound("No such payout.")
    if row.status != "failed":
        raise errors.InvalidTransition("Only a failed payout can be retried.", {"status": row.status})
    order = session.scalar(select(Order).where(Order.id == row.order_id).with_for_update(of=Order))
    row.status, row.error, row.updated_at = "pending", None, utcnow()
    order.updated_at = row.updated_at
    cache.changed(session, order)
    rt.outbox.record(session, "payout.retry_requested", {"payout_id": row.id, "order_id": row.order_id},
                     order_id=row.order_id)
    return row


# --- media: the media worker's reports -----------------------------------------------------

def apply_media_report(session: Session, order: Order, item: DeliveryItem, report: dict) -> bool:
    """A preview rendered (and, for an image URL, the fetched original stored), or why not.
    Reports may repeat; a ready item never goes back to failed."""
    if item.preview_status == "ready" or (item.preview_status == "failed" and report["status"] == "failed"):
        return False
    if report["status"] == "ready":
        item.preview_status, item.preview_key, item.preview_error = "ready", report["preview_key"], None
        if report.get("original_key") and item.storage_key is None:
            item.storage_key = report["original_key"]
            item.content_type, item.size = report.get("content_type"), report.get("size")
            item.sha256 = report.get("sha256")
    else:
        item.preview_status, item.preview_error = "failed", report["error"]
    order.updated_at = utcnow()
    cache.changed(session, order)
    return True


def request_stuck_previews(session: Session, rt: Runtime, older_than: dt.datetime, limit: int = 500) -> int:
    """Ask the media worker again for image items still pending after a while (its report never
    arrived, or its message was lost). Rendering is keyed by content, so asking twice is harmless."""
    # delivered items, and generations' results (which join a delivery when their workspace closes)
    rows = session.execute(
        select(DeliveryItem, func.coalesce(Generation.order_id, Delivery.order_id))
        .outerjoin(Generation, Generation.item_id == DeliveryItem.id)
        .outerjoin(Delivery, Delivery.id == DeliveryItem.delivery_id)
        .where(DeliveryItem.preview_status == "pending",
               func.coalesce(Generation.answered_at, Delivery.created_at) < older_than)
        .order_by(func.coalesce(Generation.answered_at, Delivery.created_at)).limit(limit)).all()
    by_order: dict[str, list[dict]] = {}
    for item, order_id in rows:
        by_order.setdefault(order_id, []).append(_media_item(item))
    for order_id, items in by_order.items():
        rt.outbox.record(session, "media.retry_requested", {"order_id": order_id, "items": items},
                         order_id=order_id)
    return len(rows)


# --- reviews and reputation -------------------------------------------------------------------

def add_review(session: Session, order: Order, caller: Caller, data: dict) -> Review:
    if party_of(order, caller) != "buyer":
        raise errors.Forbidden("Only the buyer can review this order.")
    if order.status != "completed":
        raise errors.InvalidTransition("Only a completed order can be reviewed.", {"status": order.status})
    if order.review is not None:
        raise errors.ReviewExists()
    review = Review(id=new_id("review"), order_id=order.id, agent_id=order.agent_id,
                    client_wallet=order.client_wallet, rating=data["rating"], comment=data.get("comment"),
                    created_at=utcnow())
    session.add(review)
    order.review = review
    order.updated_at = review.created_at
    cache.changed(session, order)
    _bump_agent(session, order.agent_id, review_count=1, rating_sum=data["rating"],
                **{f"rating_{data['rating']}": 1})
    return review


def _bump_agent(session: Session, agent_id: str, **increments: int) -> None:
    """Add to an agent's counters in SQL, so concurrent changes add up instead of overwriting."""
    session.execute(update(Agent).where(Agent.id == agent_id)
                    .values({getattr(Agent, k): getattr(Agent, k) + v for k, v in increments.items()}),
                    execution_options={"synchronize_session": False})


# --- timers ----------------------------------------------------------------------------------

def due_timer_ids(session: Session, now: dt.datetime, limit: int = 500) -> list[int]:
    return list(session.scalars(select(Timer.id).where(Timer.fired_at.is_(None), Timer.due_at <= now)
                                .order_by(Timer.due_at).limit(limit)))


def fire_timer(session: Session, rt: Runtime, timer_id: int, is_postgres: bool, now: dt.datetime) -> str | None:
    """Claim one due timer and take its system action if the order still qualifies."""
    query = select(Timer).where(Timer.id == timer_id, Timer.fired_at.is_(None))
    if is_postgres:
        query = query.with_for_update(skip_locked=True)  # another sweeper has it: leave it
    timer = session.scalar(query)
    if timer is None:
        return None
    timer.fired_at = now
    order = session.scalar(select(Order).where(Order.id == timer.order_id).with_for_update(of=Order))
    try:
        act(session, rt, order, timer.kind, Caller("system", "timer"), {}, now=now)
    except errors.DomainError:
        return None  # the order moved on (approved, paid, redelivered): nothing to do
    return order.status
