"""Workspaces of weekly and monthly orders: `generate` up to the quota, the agent's answers, the
workspaces worker's dispatch, timeouts and period ends, and renewal (DESIGN.md §3-§5).

Every writer of an order locks the order's row first (PostgreSQL), then the workspace and
generation rows, so they never deadlock. The quota counters change only in conditional SQL
UPDATEs: a unit is reserved only while `quota_used < quota_total`, re-checked by the database
under the row lock, so N concurrent calls in any number of processes reserve exactly
min(N, quota) units. Domain logic only: no `request`, no commit.
"""
from __future__ import annotations

import datetime as dt

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from shared import errors
from shared.auth import Caller
from shared.db import isoformat, utcnow
from shared.ids import new_id

from . import cache
from .models import Generation, Order, Service, Workspace
from .services import (WORKSPACE_TYPES, Runtime, _emit, _media_item, _uploads_for, act, get_order, keyset_page,
                       new_item, party_of, place_order)

STATUSES = ("pending", "completed", "failed", "timed_out", "expired")
# a generation the workspaces worker has not dispatched this long after it was asked for (its
# message was lost) is dispatched by the sweep
DISPATCH_GRACE_SECONDS = 30


def generate(session: Session, rt: Runtime, order_id: str, caller: Caller, prompt: str):
    """Reserve one unit of the workspace's quota and record the buyer's generation request.
    Returns (generation, workspace, order)."""
    now = utcnow()
    locked = None
    if caller.kind == "buyer":
        # lock the order row and bump its version in one statement: the order's view changes
        locked = session.execute(
            update(Order).where(Order.id == order_id, Order.client_wallet == caller.id,
                                Order.status == "in_progress", Order.price_type.in_(WORKSPACE_TYPES))
            .values(version=Order.version + 1, updated_at=now).returning(Order.version),
            execution_options={"synchronize_session": False}).scalar()
    if locked is None:
        raise _why_not(session, order_id, caller)
    reserved = session.execute(
        update(Workspace).where(Workspace.order_id == order_id, Workspace.closed_at.is_(None),
                                Workspace.expires_at > now,
                                or_(Workspace.quota_total == 0, Workspace.quota_used < Workspace.quota_total))
        .values(quota_used=Workspace.quota_used + 1, generations_pending=Workspace.generations_pending + 1),
        execution_options={"synchronize_session": False}).rowcount
    order = session.get(Order, order_id, populate_existing=True)
    workspace = session.get(Workspace, order_id, populate_existing=True)
    set_committed_value(order, "workspace", workspace)  # the view renders it without loading it again
    if not reserved:
        if workspace.closed_at is not None or workspace.expires_at <= now:
            raise errors.WorkspaceClosed(details={"status": order.status, "expires_at": isoformat(workspace.expires_at)})
        raise errors.QuotaExhausted(
            f"The workspace's quota of {workspace.quota_total} generations is used up.",
            {"quota_total": workspace.quota_total, "quota_used": workspace.quota_used,
             "expires_at": isoformat(workspace.expires_at)})
    generation = Generation(id=new_id("generation"), order_id=order_id, agent_id=order.agent_id, prompt=prompt,
                            status="pending", created_at=now)
    session.add(generation)
    # the workspaces worker dispatches it to the agent
    rt.outbox.record(session, "generation.created", {"order_id": order_id, "generation_id": generation.id,
                                                     "agent_id": order.agent_id}, order_id=order_id)
    cache.changed(session, order)
    return generation, workspace, order


def _why_not(session: Session, order_id: str, caller: Caller) -> errors.DomainError:
    """Why `generate` was refused, for a caller whose order did not qualify."""
    order = get_order(session, order_id, caller)  # strangers: 404
    if party_of(order, caller) != "buyer":
        return errors.Forbidden("Only the buyer can generate in this workspace.")
    if order.price_type not in WORKSPACE_TYPES:
        return errors.InvalidTransition("This order has no workspace: only weekly and monthly services have one.",
                                        {"status": order.status, "price_type": order.price_type})
    if order.workspace is None:
        return errors.InvalidTransition("The workspace opens once the order is paid.", {"status": order.status})
    return errors.WorkspaceClosed(details={"status": order.status,
                                           "expires_at": isoformat(order.workspace.expires_at)})


# --- the agent's side ---------------------------------------------------------------------------

def answer(session: Session, rt: Runtime, order: Order, caller: Caller, generation_id: str, data: dict) -> Generation:
    """The agent's result for a pending generation, or its failure (which gives the unit back).
    `order` is locked by the caller."""
    if party_of(order, caller) != "agent":
        raise errors.Forbidden("Only the agent answers generations.")
    generation = session.scalar(select(Generation).where(Generation.id == generation_id,
                                                         Generation.order_id == order.id)
                                .with_for_update(of=Generation).execution_options(populate_existing=True))
    if generation is None:
        raise errors.NotFound("No such generation.")
    if generation.status != "pending":
        raise errors.InvalidTransition(f"This generation is already {generation.status}.",
                                       {"status": generation.status})
    now = utcnow()
    if data.get("status") == "failed":
        generation.status, generation.error = "failed", data["error"]
        _release(order.workspace, units=1)
    else:
        item = new_item(data, 0, _uploads_for(session, order.agent_id, [data]).get(0))
        session.add(item)
        generation.item, generation.status = item, "completed"
        order.workspace.generations_pending = Workspace.generations_pending - 1
        if item.media_type == "image":  # the same watermark gate as deliveries
            rt.outbox.record(session, "generation.completed",
                             {"order_id": order.id, "generation_id": generation.id, "items": [_media_item(item)]},
                             order_id=order.id)
    generation.answered_at = now
    order.updated_at = now
    cache.changed(session, order)
    return generation


def _release(workspace: Workspace, units: int) -> None:
    """Pending generations that will not complete give their units of quota back."""
    workspace.quota_used = Workspace.quota_used - units
    workspace.generations_pending = Workspace.generations_pending - units


# --- the workspaces worker ------------------------------------------------------------------------

def _locked(session: Session, order_id: str) -> Order:
    return session.scalar(select(Order).where(Order.id == order_id).with_for_update(of=Order)
                          .execution_options(populate_existing=True))


def _pending(session: Session, generation_id: str, *conditions) -> Generation | None:
    return session.scalar(select(Generation).where(Generation.id == generation_id, Generation.status == "pending",
                                                   *conditions)
                          .with_for_update(of=Generation).execution_options(populate_existing=True))


def dispatch(session: Session, rt: Runtime, generation_id: str, now: dt.datetime | None = None) -> bool:
    """Tell the agent about a generation: it shows in the agent's pending list from now, its
    time limit starts, and an `order.generation_requested` event goes out (for webhooks).
    Safe to run twice: a dispatched generation is left alone."""
    order_id = session.scalar(select(Generation.order_id).where(Generation.id == generation_id,
                                                                Generation.dispatched_at.is_(None)))
    if order_id is None:
        return False
    order = _locked(session, order_id)
    generation = _pending(session, generation_id, Generation.dispatched_at.is_(None))
    if generation is None:
        return False
    now = now or utcnow()
    generation.dispatched_at = now
    generation.deadline_at = now + dt.timedelta(seconds=rt.settings.generation_timeout_seconds)
    _emit(session, rt, order, "order.generation_requested", {
        "generation_id": generation.id, "prompt": generation.prompt, "answer_by": isoformat(generation.deadline_at),
        "workspace_expires_at": isoformat(order.workspace.expires_at)})
    return True


def time_out(session: Session, rt: Runtime, generation_id: str, now: dt.datetime) -> bool:
    """A generation with no answer by its deadline: timed out, its unit given back."""
    order_id = session.scalar(select(Generation.order_id).where(Generation.id == generation_id))
    if order_id is None:
        return False
    order = _locked(session, order_id)
    generation = _pending(session, generation_id, Generation.deadline_at <= now)
    if generation is None:
        return False
    generation.status, generation.answered_at = "timed_out", now
    generation.error = (f"The agent did not answer within {rt.settings.generation_timeout_seconds} seconds; "
                        "the unit of quota was given back.")
    _release(order.workspace, units=1)
    order.updated_at = now
    cache.changed(session, order)
    return True


def undispatched_ids(session: Session, now: dt.datetime, limit: int = 500) -> list[str]:
    return list(session.scalars(
        select(Generation.id).where(Generation.status == "pending", Generation.dispatched_at.is_(None),
                                    Generation.created_at < now - dt.timedelta(seconds=DISPATCH_GRACE_SECONDS))
        .order_by(Generation.created_at).limit(limit)))


def overdue_ids(session: Session, now: dt.datetime, limit: int = 500) -> list[str]:
    return list(session.scalars(
        select(Generation.id).where(Generation.status == "pending", Generation.deadline_at <= now)
        .order_by(Generation.deadline_at).limit(limit)))


def expired_workspace_ids(session: Session, now: dt.datetime, limit: int = 500) -> list[str]:
    return list(session.scalars(
        select(Workspace.order_id).where(Workspace.closed_at.is_(None), Workspace.expires_at <= now)
        .order_by(Workspace.expires_at).limit(limit)))


def close(session: Session, rt: Runtime, order_id: str, now: dt.datetime) -> bool:
    """The period is over: the order becomes delivered with its generations as the delivery."""
    order = _locked(session, order_id)
    try:
        act(session, rt, order, "close_workspace", Caller("system", "workspaces"), {}, now=now)
    except errors.DomainError:
        return False  # closed already, or the order left in_progress (which closed it)
    return True


# --- reading and renewing ----------------------------------------------------------------------------

def list_for_order(session: Session, order: Order, statuses: list[str] | None, cursor, limit: int):
    query = select(Generation).where(Generation.order_id == order.id)
    if statuses:
        query = query.where(Generation.status.in_(statuses))
    return keyset_page(session, query, Generation, cursor, limit)


def list_for_agent(session: Session, agent_id: str, statuses: list[str] | None, cursor, limit: int):
    """An agent's generations across its orders; pending ones once they are dispatched."""
    query = select(Generation).where(Generation.agent_id == agent_id)
    if statuses:
        query = query.where(Generation.status.in_(statuses))
    if not statuses or "pending" in statuses:
        query = query.where(or_(Generation.status != "pending", Generation.dispatched_at.is_not(None)))
    return keyset_page(session, query, Generation, cursor, limit)


def renew(session: Session, rt: Runtime, order: Order, caller: Caller) -> Order:
    """The next period's order, at the service's current price, linked to this one. `order` is
    locked by the caller, so two renewals cannot both pass."""
    if party_of(order, caller) != "buyer":
        raise errors.Forbidden("Only the buyer can renew this order.")
    if order.price_type not in WORKSPACE_TYPES or order.workspace is None or order.status == "cancelled":
        raise errors.InvalidTransition("Only a paid weekly or monthly order that was not cancelled can be renewed.",
                                       {"status": order.status, "price_type": order.price_type})
    if order.next_order_id is not None:
        following = session.get(Order, order.next_order_id)
        if following.status != "cancelled":
            raise errors.InvalidTransition("This order is already renewed.",
                                           {"status": order.status, "next_order_id": following.id})
    service = session.get(Service, order.service_id)
    if not service.active:
        raise errors.InvalidTransition("The agent no longer offers this service.", {"status": order.status})
    renewal = place_order(session, rt, caller, {"service_id": service.id, "brief": order.brief,
                                                "reference_urls": order.reference_urls}, renews=order)
    order.next_order_id = renewal.id
    order.updated_at = utcnow()
    cache.changed(session, order)
    return renewal
