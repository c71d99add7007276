"""Agent webhooks (DESIGN.md §4-§5): every order event an agent is party to is recorded once per
agent (its catch-up feed and delivery log), then POSTed to the agent's endpoint, signed, with
retries and backoff until it is delivered or its retry window closes. The order flow never waits:
this runs in the webhooks worker, after the events' transactions committed.

An attempt claims its delivery row first (its next attempt moves a lease ahead), so two workers,
or a worker and the sweep, never send the same attempt twice; a worker killed mid-request leaves
the lease to expire and the sweep to try again. Receivers deduplicate by `X-Webhook-Delivery`.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import http.client
import json
import logging
import random
import socket
import time
from dataclasses import dataclass

from sqlalchemy import case, literal, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shared import errors, events, netguard
from shared.auth import new_webhook_secret
from shared.db import UTCDateTime, isoformat, utcnow
from shared.ids import new_id
from shared.settings import Settings

from .models import Agent, Order, WebhookDelivery

log = logging.getLogger(__name__)

USER_AGENT = "OrderDesk-Webhooks/1"
SIGNATURE_TOLERANCE_SECONDS = 300  # what docs/webhooks.md tells receivers to accept
RESPONSE_PREVIEW = 500  # characters of a failed response kept for the agent to read


# --- endpoints and secrets -------------------------------------------------------------------------

def check_endpoint(url: str, settings: Settings, resolve=socket.getaddrinfo):
    """An endpoint must be https and resolve only to public addresses, unless its host is in
    WEBHOOK_ALLOWED_HOSTS (then plain http is fine too). Returns the target and the checked
    addresses to connect to; raises netguard.Refused."""
    target = netguard.Target.parse(url)
    allowed = target.allowed_by(settings.webhook_allowed_hosts)
    if not allowed and target.scheme != "https":
        raise netguard.Refused("A webhook endpoint must use https.")
    found = netguard.addresses(target, resolve)
    if not allowed:
        netguard.refuse_internal(target, found, "The webhook endpoint is refused")
    return target, found


def validate_endpoint(url: str, settings: Settings) -> None:
    """check_endpoint for a request: a refusal is a 400 on `endpoint_url`."""
    try:
        check_endpoint(url, settings)
    except netguard.Refused as exc:
        raise errors.ValidationError(str(exc), {"fields": {"endpoint_url": [str(exc)]}}) from None


def rotate_secret(agent: Agent, settings: Settings, now: dt.datetime) -> str:
    """A new signing secret; the old one keeps signing alongside it for the overlap period."""
    if not agent.endpoint_url:
        raise errors.InvalidTransition("Set an endpoint_url first: it comes with its signing secret.")
    agent.previous_webhook_secret = agent.webhook_secret
    agent.previous_secret_expires_at = now + dt.timedelta(seconds=settings.webhook_secret_overlap_seconds)
    agent.webhook_secret = new_webhook_secret()
    agent.updated_at = now
    return agent.webhook_secret


def signing_secrets(agent: Agent, now: dt.datetime) -> list[str]:
    secrets = [agent.webhook_secret] if agent.webhook_secret else []
    if agent.previous_webhook_secret and agent.previous_secret_expires_at and now < agent.previous_secret_expires_at:
        secrets.append(agent.previous_webhook_secret)
    return secrets


def signature(secrets: list[str], body: bytes, timestamp: int) -> str:
    """`t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`, one v1 per valid secret."""
    signed = str(timestamp).encode() + b"." + body
    return ",".join([f"t={timestamp}"] + [f"v1={hmac.new(s.encode(), signed, hashlib.sha256).hexdigest()}"
                                          for s in secrets])


# --- recording: one row per (agent, event) ---------------------------------------------------------

def record(session: Session, settings: Settings, message: dict, now: dt.datetime | None = None) -> Claim | None:
    """Record an order event for its agent (once: a repeated message finds the row). Returns the
    first attempt, already claimed, when the agent has an endpoint, else None."""
    data = message.get("data") or {}
    order_id = message.get("order_id")
    if order_id is None or not events.agents_news(message["event"], data):
        return None
    agent_id = data.get("agent_id") or session.scalar(select(Order.agent_id).where(Order.id == order_id))
    if agent_id is None:
        return None
    # the agent's row is the lock that makes feed positions follow commit order, and a repeated
    # message wait for the first to commit
    agent = session.scalar(select(Agent).where(Agent.id == agent_id).with_for_update())
    if agent is None or session.scalar(select(WebhookDelivery.id).where(WebhookDelivery.agent_id == agent_id,
                                                                        WebhookDelivery.event_id == message["id"])):
        return None  # a repeated message: the first one's attempts (and the sweep) see to it
    sequence = message.get("sequence") or _next_sequence(session, order_id)
    # the feed's next position (the agent's profile is not changed: updated_at stays)
    position = session.execute(update(Agent).where(Agent.id == agent_id)
                               .values(event_count=Agent.event_count + 1, updated_at=Agent.updated_at)
                               .returning(Agent.event_count), execution_options={"synchronize_session": False}).scalar()
    endpoint, now = agent.endpoint_url, now or utcnow()
    body = {"id": message["id"], "event": message["event"], "order_id": order_id, "sequence": sequence,
            "created_at": message["created_at"], "data": data}
    # with an endpoint, the row is born claimed for its first attempt (no second transaction)
    row = WebhookDelivery(id=new_id("webhook_delivery"), agent_id=agent_id, position=position,
                          event_id=message["id"], event=message["event"], order_id=order_id, sequence=sequence,
                          body=json.dumps(body, separators=(",", ":")),
                          status="pending" if endpoint else "no_endpoint", attempts=1 if endpoint else 0,
                          next_attempt_at=_lease(now, settings) if endpoint else None, created_at=now,
                          retry_until=now + dt.timedelta(seconds=settings.webhook_retry_window_seconds))
    try:
        with session.begin_nested():
            session.add(row)
    except IntegrityError:  # SQLite takes no row lock: a duplicate message got there first
        return None
    if not endpoint:
        return None
    return Claim(row.id, row.body, row.event, endpoint, signing_secrets(agent, now), 1)


def _next_sequence(session: Session, order_id: str) -> int:
    """A per-order sequence for an event another service wrote (messages): the orders service
    owns the counter."""
    return session.execute(update(Order).where(Order.id == order_id)
                           .values(event_sequence=Order.event_sequence + 1).returning(Order.event_sequence),
                           execution_options={"synchronize_session": False}).scalar() or 0


# --- attempts ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Claim:
    id: str
    body: str
    event: str
    url: str
    secrets: list
    attempt: int


@dataclass(frozen=True)
class Outcome:
    delivered: bool
    retry: bool
    status_code: int | None
    error: str | None


def _lease(now: dt.datetime, settings: Settings) -> dt.datetime:
    """Until when a claimed attempt is its worker's: after twice the request timeout it counts as
    lost (the worker died) and the sweep hands it out again."""
    return now + dt.timedelta(seconds=2 * settings.webhook_timeout_seconds + 5)


def claim(session: Session, settings: Settings, delivery_id: str, now: dt.datetime) -> Claim | None:
    """Take the next attempt of a due delivery, or None (not due, done, or taken by another)."""
    lease = _lease(now, settings)
    taken = session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == delivery_id, WebhookDelivery.status == "pending",
               WebhookDelivery.next_attempt_at <= now)
        .values(next_attempt_at=lease, attempts=WebhookDelivery.attempts + 1)
        .returning(WebhookDelivery.agent_id, WebhookDelivery.body, WebhookDelivery.event, WebhookDelivery.attempts),
        execution_options={"synchronize_session": False}).first()
    if taken is None:
        return None
    agent = session.get(Agent, taken.agent_id)
    return Claim(delivery_id, taken.body, taken.event, agent.endpoint_url or "", signing_secrets(agent, now),
                 taken.attempts)


def post(claim: Claim, settings: Settings, resolve=socket.getaddrinfo) -> Outcome:
    """POST one attempt to the endpoint (checked again now: DNS may have changed since it was set)."""
    if not claim.url:
        return Outcome(False, False, None, "The agent has no endpoint_url any more.")
    try:
        target, found = check_endpoint(claim.url, settings, resolve)
    except netguard.Unresolvable as exc:  # DNS may answer later
        return Outcome(False, True, None, str(exc))
    except netguard.Refused as exc:  # not https, or not a public address: no use retrying
        return Outcome(False, False, None, str(exc))
    body = claim.body.encode()
    headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT, "X-Webhook-Event": claim.event,
               "X-Webhook-Delivery": claim.id, "X-Webhook-Signature": signature(claim.secrets, body, int(time.time())),
               "Connection": "close"}
    deadline = time.monotonic() + settings.webhook_timeout_seconds
    try:
        sock = netguard.connect(target, found, deadline)
    except netguard.Refused as exc:
        return Outcome(False, True, None, str(exc))
    response = None
    try:
        response = netguard.send(sock, target, deadline, "POST", headers, body)
        sock.settimeout(netguard.remaining(deadline, target))
        text = response.read(RESPONSE_PREVIEW).decode("utf-8", "replace")
        status = response.status
    except (OSError, http.client.HTTPException, netguard.Refused) as exc:
        message = str(exc) if isinstance(exc, netguard.Refused) else netguard.failure(target, exc)
        return Outcome(False, True, None, message)
    finally:
        if response is not None:
            response.close()
        sock.close()
    if 200 <= status < 300:
        return Outcome(True, False, status, None)
    retry = status == 429 or status >= 500
    return Outcome(False, retry, status, f"HTTP {status}: {text}".strip())


def finish(session: Session, settings: Settings, claim: Claim, outcome: Outcome, now: dt.datetime) -> str:
    """Record an attempt's outcome, in one statement; returns the delivery's status. Only the
    latest attempt records: one that outlived its lease (its worker stalled) while the sweep
    handed out the next leaves the row to that one."""
    values = {"last_status_code": outcome.status_code, "last_error": outcome.error}
    if outcome.delivered:
        values.update(status="delivered", delivered_at=now, next_attempt_at=None)
    elif outcome.retry:  # again after the backoff, if that is still inside the retry window
        retry_at = now + dt.timedelta(seconds=backoff(claim.attempt, settings))
        in_window = WebhookDelivery.retry_until >= retry_at
        # (the time bound as the column's type, so SQLite stores it the way it stores the others)
        values.update(status=case((in_window, "pending"), else_="failed"),
                      next_attempt_at=case((in_window, literal(retry_at, UTCDateTime())), else_=None))
    else:
        values.update(status="failed", next_attempt_at=None)
    status = session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == claim.id, WebhookDelivery.attempts == claim.attempt,
               WebhookDelivery.status == "pending")
        .values(**values).returning(WebhookDelivery.status),
        execution_options={"synchronize_session": False}).scalar()
    if status is None:
        return session.scalar(select(WebhookDelivery.status).where(WebhookDelivery.id == claim.id))
    return status


def backoff(attempt: int, settings: Settings) -> float:
    """Seconds before the next attempt: exponential, capped, with full jitter above half (the
    first retry comes within WEBHOOK_RETRY_BASE_SECONDS)."""
    ceiling = min(settings.webhook_retry_max_seconds, settings.webhook_retry_base_seconds * 2 ** (attempt - 1))
    return random.uniform(ceiling / 2, ceiling)


def due_ids(session: Session, now: dt.datetime, limit: int = 500) -> list[str]:
    return list(session.scalars(select(WebhookDelivery.id).where(WebhookDelivery.status == "pending",
                                                                  WebhookDelivery.next_attempt_at <= now)
                                .order_by(WebhookDelivery.next_attempt_at).limit(limit)))


def redeliver(session: Session, settings: Settings, agent_id: str, delivery_id: str) -> WebhookDelivery:
    """The agent asks for a delivery again (delivered or failed): a fresh retry window from now."""
    row = session.scalar(select(WebhookDelivery).where(WebhookDelivery.id == delivery_id,
                                                       WebhookDelivery.agent_id == agent_id).with_for_update())
    if row is None:
        raise errors.NotFound("No such webhook delivery.")
    if not session.scalar(select(Agent.endpoint_url).where(Agent.id == agent_id)):
        raise errors.InvalidTransition("Set an endpoint_url first.")
    now = utcnow()
    row.status, row.next_attempt_at = "pending", now
    row.retry_until = now + dt.timedelta(seconds=settings.webhook_retry_window_seconds)
    return row


def present(row: WebhookDelivery) -> dict:
    return {"id": row.id, "event_id": row.event_id, "event": row.event, "order_id": row.order_id,
            "sequence": row.sequence, "status": row.status, "attempts": row.attempts,
            "last_status_code": row.last_status_code, "last_error": row.last_error,
            "next_attempt_at": isoformat(row.next_attempt_at) if row.status == "pending" else None,
            "created_at": isoformat(row.created_at), "delivered_at": isoformat(row.delivered_at)}


def feed_item(row: WebhookDelivery) -> dict:
    """An event as the catch-up feed replays it: the webhook's body, plus its place in the feed."""
    return {"position": row.position, **json.loads(row.body)}
