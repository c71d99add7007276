"""The messaging HTTP API (DESIGN.md §4): an order's messages, for its buyer and its agent.

Views parse, authorize and present; the domain work is in services.py, the order's parties and
state come from access.py, live delivery from stream.py.
"""
from __future__ import annotations

import logging

import redis
from flask import Response, current_app, g, request
from marshmallow import RAISE

from shared import errors, logs, ratelimit
from shared.auth import Caller
from shared.ids import looks_like
from shared.web import Blueprint, ok, page, storable

from . import schemas as s
from . import services
from .access import OrderAccess
from .stream import MessageStream

log = logging.getLogger(__name__)
IDEMPOTENCY_HEADER = "Idempotency-Key"
LAST_EVENT_ID_HEADER = "Last-Event-ID"

messages_bp = Blueprint(
    "messages", __name__, url_prefix="/api/orders",
    description="Messages between an order's buyer and agent, once the order is paid.")


def _rt():
    return current_app.extensions["messaging"]


def _db():
    return _rt().db.session()


# --- who, and on which order -------------------------------------------------------------------

def _authenticated() -> Caller:
    caller: Caller = g.caller
    if caller.kind == "anonymous":
        raise errors.Unauthenticated()
    return caller


def _order(order_id: str, caller: Caller, for_post: bool = False) -> tuple[OrderAccess, str | None]:
    """The order's access and the caller's party in it (None for an admin). A stranger gets
    exactly what an unknown order gets."""
    if not looks_like("order", order_id):
        raise errors.NotFound("No such order.")
    access = _rt().access.order(order_id, for_post=for_post)
    party = access.party(caller)
    if party is None and caller.kind != "admin":
        raise errors.NotFound("No such order.")
    logs.order_id.set(order_id)
    return access, party


def _require_readable(access: OrderAccess) -> None:
    if not access.readable:
        raise errors.MessagingClosed("Messaging opens once the order is paid.")


def _write_session():
    """This GET writes (it marks what it returns as read): trade the request's read-only session
    for a write session, which the request wrapper commits like any other."""
    session = g.pop("db_session", None)
    if session is not None:
        session.close()
    g.db_session = _rt().db.sessionmaker()
    return g.db_session


# --- routes ----------------------------------------------------------------------------------

@messages_bp.route("/<order_id>/messages", methods=["GET"])
@messages_bp.arguments(s.MessageListQuery, location="query", unknown=RAISE)
@messages_bp.response(200, s.MessagePageEnvelope)
def list_messages(query, order_id):
    """A page of the order's messages, oldest first; marks the other party's messages in it read."""
    caller = _authenticated()
    access, party = _order(order_id, caller)
    _require_readable(access)
    items = services.page(_db(), order_id, query["after_seq"], query["limit"])
    seqs = services.to_mark(items, party)
    if seqs:
        unread = services.mark_read(_write_session(), order_id, party, seqs, items)
    else:
        unread = services.unread_count(_db(), order_id, party)
    cursor = services.encode_cursor(items[-1].seq) if items else None
    return ok(page([services.present(m) for m in items], cursor, unread_count=unread))


@messages_bp.route("/<order_id>/messages", methods=["POST"])
@messages_bp.arguments(s.MessageIn)
@messages_bp.response(201, s.MessageEnvelope)
def post_message(data, order_id):
    """Post a message (the order's buyer or agent, while the order is paid and not cancelled)."""
    caller = _authenticated()
    access, party = _order(order_id, caller, for_post=caller.kind != "admin")
    if party is None:
        raise errors.Forbidden("Admins can read an order's messages but not post them.")
    content = data["content"]
    key = _idempotency_key()
    if key is not None:
        first = services.find_by_idempotency_key(_db(), party, caller.id, key)
        if first is not None:
            if (first.order_id, first.fingerprint) != (order_id, services.fingerprint(order_id, content)):
                raise errors.IdempotencyConflict()
            return ok(services.present(first), 201, headers={"Idempotent-Replayed": "true"})
    if not access.open:
        raise errors.MessagingClosed("Messages can be posted once the order is paid, and not after it "
                                     "is cancelled." if access.paid else "Messaging opens once the order is paid.")
    _limit_posts(caller)
    rt = _rt()
    message = services.post_message(_db(), rt.outbox, order_id, party, caller.id, content, key,
                                    announce=rt.announcer.announce)
    return ok(services.present(message), 201)


@messages_bp.route("/<order_id>/messages/stream", methods=["GET"])
@messages_bp.arguments(s.StreamQuery, location="query", unknown=RAISE)
@messages_bp.doc(responses={200: {
    "description": "Server-Sent Events: each message as `id: <seq>`, `event: message`, `data: <message JSON>`; "
                   "a comment every 15 s; the stream ends after 5 minutes (reconnect with Last-Event-ID).",
    "content": {"text/event-stream": {"schema": {"type": "string"}}}}})
def stream_messages(query, order_id):
    """New messages as they are posted; resumes after `Last-Event-ID`."""
    caller = _authenticated()
    access, _party = _order(order_id, caller)
    _require_readable(access)
    after = query.get("last_event_id")
    header = request.headers.get(LAST_EVENT_ID_HEADER, "").strip()
    if header:
        try:
            after = services.parse_event_id(header) if storable(header) else None
        except ValueError:
            after = None
        if after is None:
            raise errors.ValidationError("Last-Event-ID is not an event id of this stream.",
                                         {"fields": {LAST_EVENT_ID_HEADER: ["Not an event id."]}})
    rt = _rt()
    settings = rt.settings
    try:
        stream = MessageStream(rt.db, rt.pubsub, order_id, after, settings.messaging_stream_heartbeat_seconds,
                               settings.messaging_stream_max_seconds).open()
    except redis.RedisError:
        log.warning("cannot subscribe to the messages of %s", order_id, exc_info=True)
        raise errors.ServiceUnavailable("Live messages are unavailable; retry shortly.") from None
    return Response(iter(stream), mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# --- helpers ---------------------------------------------------------------------------------

def _idempotency_key() -> str | None:
    key = request.headers.get(IDEMPOTENCY_HEADER)
    if key is None:
        return None
    if not 1 <= len(key) <= 255 or not storable(key):
        raise errors.ValidationError("Idempotency-Key must be 1-255 characters.",
                                     {"fields": {IDEMPOTENCY_HEADER: ["Must be 1-255 characters."]}})
    return key


def _limit_posts(caller: Caller) -> None:
    """MESSAGE_RATE_LIMIT_PER_HOUR posts per sender, counted in Redis across every process."""
    settings = _rt().settings
    if not settings.rate_limits:
        return
    limit = settings.message_rate_limit_per_hour
    try:
        verdict = ratelimit.hit(_rt().cache, f"messages:{caller.key}", limit, window=3600)
    except redis.RedisError:
        log.warning("message rate limiter unavailable; letting the post through", exc_info=True)
        return
    g.rate_limit = verdict  # the headers of this response tell the post limit, not the per-minute one
    if not verdict.allowed:
        raise errors.RateLimited(f"Limit of {limit} messages per hour reached; retry in {verdict.reset} s.",
                                 headers=verdict.headers())
