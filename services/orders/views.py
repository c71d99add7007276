"""The orders service's HTTP API (DESIGN.md §4). Views parse, authorize and present; the
domain work is in services.py."""
from __future__ import annotations

import base64
import datetime as dt
import json
import secrets

from flask import Blueprint as FlaskBlueprint, Response, current_app, g, request, send_file
from marshmallow import ValidationError as MarshmallowValidationError
from sqlalchemy import select

from shared import errors, logs
from shared.auth import Caller, require_service, sign_session
from shared.db import isoformat, utcnow
from shared.ids import looks_like
from shared.money import format_usd
from shared.web import Blueprint, ok, page, schema_of, storable

from . import files, notifications, oneshot, present, services, uploads, webhooks, workspaces
from . import schemas as s
from . import cache
from .cache import STRANGER
from .models import (Agent, Delivery, DeliveryItem, Generation, Notification, Order, SandboxTransfer, Service,
                     WebhookDelivery)
from .payments import destination_for, rail_transfer, rail_transfer_by_key, record_sandbox_transfer
from .wallets import verify_signature

auth_bp = Blueprint("auth", __name__, url_prefix="/api/auth", description="Buyer wallet login")
agents_bp = Blueprint("agents", __name__, url_prefix="/api/agents", description="Agents")
services_bp = Blueprint("services", __name__, url_prefix="/api/services", description="Agents' services")
orders_bp = Blueprint("orders", __name__, url_prefix="/api/orders", description="Orders")
admin_bp = Blueprint("admin", __name__, url_prefix="/api/admin", description="Admin")
sandbox_bp = Blueprint("sandbox", __name__, url_prefix="/api/sandbox", description="Sandbox payments")
files_bp = Blueprint("files", __name__, url_prefix="/api", description="Uploads and delivered files")
notifications_bp = Blueprint("notifications", __name__, url_prefix="/api/notifications",
                             description="Buyer notifications")
internal = FlaskBlueprint("internal", __name__, url_prefix="/internal")


def blueprints():
    return (auth_bp, agents_bp, services_bp, orders_bp, admin_bp, sandbox_bp, files_bp, notifications_bp)


# --- helpers ---------------------------------------------------------------------------------

def _db():
    return current_app.extensions["db"].session()


def _rt() -> services.Runtime:
    return current_app.extensions["orders_runtime"]


def _caller() -> Caller:
    return g.caller


def _require(*kinds: str) -> Caller:
    caller = _caller()
    if caller.kind == "anonymous":
        raise errors.Unauthenticated()
    if caller.kind not in kinds:
        raise errors.Forbidden(f"Only {' or '.join(kinds)}s can do this.")
    return caller


def _encode_cursor(created_at: dt.datetime, id_: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([isoformat(created_at), id_]).encode()).decode().rstrip("=")


def _decode_cursor(cursor: str | None):
    if not cursor:
        return None
    try:
        at, id_ = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if not isinstance(at, str) or not isinstance(id_, str) or not storable(id_):
            raise ValueError("not a cursor of ours")
        at = dt.datetime.fromisoformat(at.replace("Z", "+00:00"))
        if at.tzinfo is None:
            raise ValueError("cursor time without a zone")
        return at, id_
    except (ValueError, TypeError):
        raise errors.ValidationError("Invalid cursor.", {"fields": {"cursor": ["Invalid cursor."]}}) from None


def _order_for(order_id: str, caller: Caller, for_update: bool = False) -> Order:
    return _order_for_in(_db(), order_id, caller, for_update)


def _order_for_in(session, order_id: str, caller: Caller, for_update: bool = False) -> Order:
    if not looks_like("order", order_id):
        raise errors.NotFound("No such order.")
    return services.get_order(session, order_id, caller, for_update=for_update)


def _act(order_id: str, action: str, params: dict, kinds: tuple[str, ...]):
    caller = _require(*kinds)
    if action == "approve" and not params and "idempotency" not in g and looks_like("order", order_id):
        # one statement, when it applies (an Idempotency-Key's record needs the general way's
        # transaction); when it does not, it wrote nothing and the general way says why
        view = oneshot.approve(current_app.extensions["db"], _rt(), current_app.extensions["order_views"],
                               order_id, caller)
        if view is not None:
            return ok(view)
    if action == "pay":  # asked before the order is locked: a slow payment network holds no lock
        with current_app.extensions["db"].read_sessionmaker() as session:
            services.verify_payment(session, _rt(), _order_for_in(session, order_id, caller), caller, params)
    order = _order_for(order_id, caller, for_update=True)
    services.act(_db(), _rt(), order, action, caller, params)
    return ok(_view_after_change(order, caller))


def _view_after_change(order: Order, caller: Caller) -> dict:
    """The caller's view of a changed order, built once for the response and the cache."""
    _db().flush()
    full = present.full_order(order)
    cache.rendered(_db(), order, full)
    return present.for_role(full, services.party_of(order, caller), _rt().links)


def _cursor_after(last) -> str | None:
    return _encode_cursor(last.created_at, last.id) if last is not None else None


def _orders_page(rows, last, caller):
    return ok(page([present.order(o, caller, _rt().links) for o in rows], _cursor_after(last)))


# --- auth --------------------------------------------------------------------------------------

def _nonce_key(nonce: str) -> str:
    return f"auth:nonce:{nonce}"


@auth_bp.route("/challenge", methods=["POST"])
@auth_bp.arguments(s.ChallengeIn)
@auth_bp.response(201, s.envelope_of(s.ChallengeOut))
def challenge(data):
    settings = _rt().settings
    nonce = secrets.token_hex(16)
    now = utcnow()
    expires = now + dt.timedelta(seconds=settings.nonce_ttl_seconds)
    message = (f"Order desk wants you to sign in with your {data['chain']} wallet:\n{data['wallet']}\n\n"
               f"Nonce: {nonce}\nIssued At: {isoformat(now)}\nExpiration Time: {isoformat(expires)}")
    current_app.extensions["redis"].set(_nonce_key(nonce), json.dumps({**data, "message": message}),
                                        ex=settings.nonce_ttl_seconds)
    return ok({"nonce": nonce, "message": message, "expires_at": isoformat(expires)}, 201)


@auth_bp.route("/session", methods=["POST"])
@auth_bp.arguments(s.SessionIn)
@auth_bp.response(201, s.envelope_of(s.SessionOut))
def session(data):
    settings = _rt().settings
    # GETDEL: a nonce works once, whatever the outcome
    stored = current_app.extensions["redis"].getdel(_nonce_key(data["nonce"]))
    if stored is None:
        raise errors.Unauthenticated("Unknown, used or expired nonce; ask for a new challenge.")
    challenge_data = json.loads(stored)
    if (challenge_data["wallet"], challenge_data["chain"]) != (data["wallet"], data["chain"]):
        raise errors.Unauthenticated("This nonce was issued to another wallet.")
    if not verify_signature(data["chain"], data["wallet"], challenge_data["message"], data["signature"]):
        raise errors.Unauthenticated("The signature does not match the wallet and message.")
    token, expires = sign_session(settings.session_secret, data["wallet"], data["chain"],
                                  settings.session_ttl_seconds)
    return ok({"token": token, "expires_at": isoformat(dt.datetime.fromtimestamp(expires, dt.timezone.utc))}, 201)


# --- agents ------------------------------------------------------------------------------------

@agents_bp.route("", methods=["POST"])
@agents_bp.arguments(s.AgentIn)
@agents_bp.response(201, s.envelope_of(s.AgentCreatedOut))
def register_agent(data):
    agent, api_key, secret = services.register_agent(_db(), _rt(), data)
    _db().flush()
    body = {"agent": present.agent(agent, private=True), "api_key": api_key}
    if secret:
        body["webhook_secret"] = secret
    return ok(body, 201)


@agents_bp.route("/me", methods=["PATCH"])
@agents_bp.arguments(s.AgentPatchIn)
@agents_bp.response(200, s.envelope_of(s.AgentOut))
def update_me(data):
    caller = _require("agent")
    agent = _db().get(Agent, caller.id)
    secret = services.update_agent(_db(), _rt(), agent, data)
    _db().flush()
    body = present.agent(agent, private=True)
    if secret:
        body["webhook_secret"] = secret
    return ok(body)


@agents_bp.route("/me/webhook-secret/rotate", methods=["POST"])
@agents_bp.response(200, s.envelope_of(s.SecretOut))
def rotate_webhook_secret():
    """A new signing secret; the old one keeps signing for WEBHOOK_SECRET_OVERLAP_SECONDS."""
    caller = _require("agent")
    agent = _db().get(Agent, caller.id, with_for_update=True)
    secret = webhooks.rotate_secret(agent, _rt().settings, utcnow())
    return ok({"webhook_secret": secret, "previous_secret_valid_until": isoformat(agent.previous_secret_expires_at)})


@agents_bp.route("/me/webhook-deliveries", methods=["GET"])
@agents_bp.arguments(s.WebhookLogQuery, location="query")
@agents_bp.response(200, s.envelope_of(s.WebhookDeliveryOut, many_page=True))
def webhook_deliveries(query):
    caller = _require("agent")
    stmt = select(WebhookDelivery).where(WebhookDelivery.agent_id == caller.id)
    if query.get("status"):
        stmt = stmt.where(WebhookDelivery.status.in_(query["status"]))
    rows, last = services.keyset_page(_db(), stmt, WebhookDelivery, _decode_cursor(query.get("cursor")),
                                      query["limit"])
    return ok(page([webhooks.present(r) for r in rows], _cursor_after(last)))


@agents_bp.route("/me/webhook-deliveries/<delivery_id>/redeliver", methods=["POST"])
@agents_bp.response(202, s.envelope_of(s.WebhookDeliveryOut))
def redeliver_webhook(delivery_id):
    """Send this event again (the webhooks worker picks it up within WEBHOOK_SWEEP_SECONDS)."""
    caller = _require("agent")
    if not looks_like("webhook_delivery", delivery_id):
        raise errors.NotFound("No such webhook delivery.")
    return ok(webhooks.present(webhooks.redeliver(_db(), _rt().settings, caller.id, delivery_id)), 202)


@agents_bp.route("/me/events", methods=["GET"])
@agents_bp.arguments(s.EventFeedQuery, location="query")
@agents_bp.response(200, s.envelope_of(s.FeedEventOut, many_page=True))
def event_feed(query):
    """Every event of the agent's orders after a feed position, oldest first (the catch-up feed)."""
    caller = _require("agent")
    rows = _db().scalars(select(WebhookDelivery).where(WebhookDelivery.agent_id == caller.id,
                                                       WebhookDelivery.position > query["after"])
                         .order_by(WebhookDelivery.position).limit(query["limit"] + 1)).all()
    more = len(rows) > query["limit"]
    rows = rows[:query["limit"]]
    return ok(page([webhooks.feed_item(r) for r in rows], str(rows[-1].position) if more else None))


@agents_bp.route("/me", methods=["GET"])
@agents_bp.response(200, s.envelope_of(s.AgentOut))
def get_me():
    caller = _require("agent")
    return ok(present.agent(_db().get(Agent, caller.id), private=True))


@agents_bp.route("/<agent_id>", methods=["GET"])
@agents_bp.response(200, s.envelope_of(s.AgentOut))
def get_agent(agent_id):
    agent = _db().get(Agent, agent_id) if looks_like("agent", agent_id) else None
    if agent is None:
        raise errors.NotFound("No such agent.")
    caller = _caller()
    return ok(present.agent(agent, private=caller.kind == "agent" and caller.id == agent.id))


@agents_bp.route("/<agent_id>/orders", methods=["GET"])
@agents_bp.arguments(s.OrderListQuery, location="query")
@agents_bp.response(200, s.envelope_of(s.OrderOut, many_page=True))
def agent_orders(query, agent_id):
    caller = _require("agent", "admin")
    if caller.kind == "agent" and caller.id != agent_id:
        raise errors.NotFound("No such agent.")
    rows, last = services.list_orders(_db(), agent_id=agent_id, statuses=query.get("status"),
                                      cursor=_decode_cursor(query.get("cursor")), limit=query["limit"])
    return _orders_page(rows, last, caller)


@agents_bp.route("/<agent_id>/generations", methods=["GET"])
@agents_bp.arguments(s.GenerationListQuery, location="query")
@agents_bp.response(200, s.envelope_of(s.GenerationOut, many_page=True))
def agent_generations(query, agent_id):
    """The agent's generations across its workspaces (`?status=pending`: what to work on now)."""
    caller = _require("agent", "admin")
    if caller.kind == "agent" and caller.id != agent_id:
        raise errors.NotFound("No such agent.")
    rows, last = workspaces.list_for_agent(_db(), agent_id, query.get("status"),
                                           _decode_cursor(query.get("cursor")), query["limit"])
    role = "agent" if caller.kind == "agent" else "admin"
    return ok(page([present.generation(g, role, "", _rt().links) for g in rows], _cursor_after(last)))


# --- services ----------------------------------------------------------------------------------

@services_bp.route("", methods=["POST"])
@services_bp.arguments(s.ServiceIn)
@services_bp.response(201, s.envelope_of(s.ServiceOut))
def create_service(data):
    caller = _require("agent")
    service = services.create_service(_db(), _rt(), _db().get(Agent, caller.id), data)
    return ok(present.service(service), 201)


@services_bp.route("", methods=["GET"])
@services_bp.arguments(s.ServiceQuery, location="query")
@services_bp.response(200, s.envelope_of(s.ServiceOut, many_page=True))
def list_services(query):
    rows, last = services.list_services(_db(), agent_id=query.get("agent_id"),
                                        cursor=_decode_cursor(query.get("cursor")), limit=query["limit"])
    return ok(page([present.service(r) for r in rows], _cursor_after(last)))


@services_bp.route("/<service_id>", methods=["GET"])
@services_bp.response(200, s.envelope_of(s.ServiceOut))
def get_service(service_id):
    service = _db().get(Service, service_id) if looks_like("service", service_id) else None
    if service is None:
        raise errors.NotFound("No such service.")
    return ok(present.service(service))


# --- orders ------------------------------------------------------------------------------------

@orders_bp.route("", methods=["POST"])
@orders_bp.arguments(s.OrderIn)
@orders_bp.response(201, s.envelope_of(s.OrderOut))
def create_order(data):
    caller = _require("buyer")
    if not looks_like("service", data["service_id"]):
        raise errors.NotFound("No such service.")
    order = services.place_order(_db(), _rt(), caller, data)
    return ok(_view_after_change(order, caller), 201)


@orders_bp.route("", methods=["GET"])
@orders_bp.arguments(s.OrderListQuery, location="query")
@orders_bp.response(200, s.envelope_of(s.OrderOut, many_page=True))
def list_my_orders(query):
    caller = _require("buyer")
    rows, last = services.list_orders(_db(), client_wallet=caller.id, statuses=query.get("status"),
                                      cursor=_decode_cursor(query.get("cursor")), limit=query["limit"])
    return _orders_page(rows, last, caller)


@orders_bp.route("/<order_id>", methods=["GET"])
@orders_bp.response(200, s.envelope_of(s.OrderOut))
def get_order(order_id):
    caller = _require("buyer", "agent", "admin")
    views = current_app.extensions["order_views"]
    cached = views.fetch(order_id, caller) if looks_like("order", order_id) else None
    if cached == STRANGER:
        raise errors.NotFound("No such order.")
    if cached is not None:
        return Response(b'{"success":true,"data":' + cached + b"}", mimetype="application/json")
    order = _order_for(order_id, caller)
    full = present.full_order(order)
    views.store(order, full)  # the next read is served from the cache
    return ok(present.for_role(full, services.party_of(order, caller), _rt().links))


@orders_bp.route("/<order_id>", methods=["PATCH"])
@orders_bp.arguments(s.OrderPatchIn)
@orders_bp.response(200, s.envelope_of(s.OrderOut))
def patch_order(data, order_id):
    action = data.pop("action")
    return _act(order_id, action, data, ("buyer", "agent", "admin"))


@orders_bp.route("/<order_id>/payment", methods=["GET"])
@orders_bp.response(200, s.envelope_of(s.PaymentOut))
def payment(order_id):
    caller = _require("buyer", "agent", "admin")
    order = _order_for(order_id, caller)
    if services.party_of(order, caller) != "buyer":
        raise errors.Forbidden("Only the buyer pays for this order.")
    return ok(services.payment_instructions(order, _rt()))


@orders_bp.route("/<order_id>/quote", methods=["POST"])
@orders_bp.arguments(s.QuoteIn)
@orders_bp.response(200, s.envelope_of(s.OrderOut))
def quote(data, order_id):
    return _act(order_id, "quote", data, ("buyer", "agent", "admin"))


@orders_bp.route("/<order_id>/start", methods=["POST"])
@orders_bp.response(200, s.envelope_of(s.OrderOut))
def start(order_id):
    return _act(order_id, "start", {}, ("buyer", "agent", "admin"))


@orders_bp.route("/<order_id>/decline", methods=["POST"])
@orders_bp.arguments(s.DeclineIn)
@orders_bp.response(200, s.envelope_of(s.OrderOut))
def decline(data, order_id):
    return _act(order_id, "decline", data, ("buyer", "agent", "admin"))


@orders_bp.route("/<order_id>/deliver", methods=["POST"])
@orders_bp.arguments(s.DeliverIn)
@orders_bp.response(200, s.envelope_of(s.OrderOut))
def deliver(data, order_id):
    return _act(order_id, "deliver", data, ("buyer", "agent", "admin"))


@orders_bp.route("/<order_id>/review", methods=["POST"])
@orders_bp.arguments(s.ReviewIn)
@orders_bp.response(201, s.envelope_of(s.ReviewOut))
def review(data, order_id):
    caller = _require("buyer", "agent", "admin")
    order = _order_for(order_id, caller, for_update=True)
    return ok(present.review(services.add_review(_db(), order, caller, data)), 201)


# --- workspaces ------------------------------------------------------------------------------------

@orders_bp.route("/<order_id>/generate", methods=["POST"])
@orders_bp.arguments(s.GenerateIn)
@orders_bp.response(202, s.envelope_of(s.GenerateOut))
def generate(data, order_id):
    """The buyer asks the agent for one generation; one unit of the workspace's quota is reserved."""
    caller = _require("buyer", "agent", "admin")
    if not looks_like("order", order_id):
        raise errors.NotFound("No such order.")
    logs.order_id.set(order_id)  # the access log line names the order, as for every order route
    generation, workspace, order = workspaces.generate(_db(), _rt(), order_id, caller, data["prompt"])
    _db().flush()
    return ok({"generation": present.generation(generation, "buyer", order.status, _rt().links),
               "quota_used": workspace.quota_used, "quota_total": workspace.quota_total,
               "expires_at": isoformat(workspace.expires_at)}, 202)


@orders_bp.route("/<order_id>/generations", methods=["GET"])
@orders_bp.arguments(s.GenerationListQuery, location="query")
@orders_bp.response(200, s.envelope_of(s.GenerationOut, many_page=True))
def order_generations(query, order_id):
    caller = _require("buyer", "agent", "admin")
    order = _order_for(order_id, caller)
    rows, last = workspaces.list_for_order(_db(), order, query.get("status"),
                                           _decode_cursor(query.get("cursor")), query["limit"])
    role = services.party_of(order, caller)
    return ok(page([present.generation(g, role, order.status, _rt().links) for g in rows], _cursor_after(last)))


@orders_bp.route("/<order_id>/generations/<generation_id>", methods=["POST"])
@orders_bp.arguments(s.GenerationAnswerIn)
@orders_bp.response(200, s.envelope_of(s.GenerationOut))
def answer_generation(data, order_id, generation_id):
    """The agent's answer: a result (`upload_id` or `url`, `media_type`) or `{"status": "failed", "error"}`."""
    caller = _require("buyer", "agent", "admin")
    order = _order_for(order_id, caller, for_update=True)
    if not looks_like("generation", generation_id):
        raise errors.NotFound("No such generation.")
    generation = workspaces.answer(_db(), _rt(), order, caller, generation_id, data)
    _view_after_change(order, caller)
    return ok(present.generation(generation, "agent", order.status, _rt().links))


@orders_bp.route("/<order_id>/renew", methods=["POST"])
@orders_bp.response(201, s.envelope_of(s.OrderOut))
def renew(order_id):
    """The next period of a weekly or monthly order: a new order at the service's price, linked to this one."""
    caller = _require("buyer", "agent", "admin")
    order = _order_for(order_id, caller, for_update=True)
    renewal = workspaces.renew(_db(), _rt(), order, caller)
    return ok(_view_after_change(renewal, caller), 201)


def _item_and_order(item_id: str, for_update: bool = False) -> tuple[DeliveryItem | None, Order | None]:
    """A delivered item (or a generation's result) and its order (the order row locked when
    asked), or Nones."""
    item = _db().get(DeliveryItem, item_id) if looks_like("item", item_id) else None
    if item is None:
        return None, None
    if item.delivery_id is not None:
        query = select(Order).join(Delivery, Delivery.order_id == Order.id).where(Delivery.id == item.delivery_id)
    else:
        query = select(Order).join(Generation, Generation.order_id == Order.id).where(Generation.item_id == item.id)
    return item, _db().scalar(query.with_for_update(of=Order) if for_update else query)


# --- uploads and files ------------------------------------------------------------------------

@files_bp.route("/uploads", methods=["POST"])
@files_bp.doc(requestBody={"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file"], "properties": {"file": {"type": "string", "format": "binary"}}}}}})
@files_bp.response(201, s.envelope_of(s.UploadOut))
def upload():
    """Multipart field `file`, at most UPLOAD_MAX_BYTES; typed by its bytes, not its name."""
    caller = _require("agent")
    rt = _rt()
    stored = uploads.receive(request, _db(), rt.storage, caller.id, rt.settings.upload_max_bytes)
    return ok({"upload_id": stored.id, "media_type": stored.media_type, "content_type": stored.content_type,
               "size": stored.size, "sha256": stored.sha256}, 201)


@files_bp.route("/files/<item_id>/<variant>", methods=["GET"])
def delivered_file(item_id, variant):
    """A delivered file or its preview, through a signed link (from the order's view)."""
    rt = _rt()
    refused = rt.links.check(item_id, variant, request.args.get("role", ""), request.args.get("expires", ""),
                             request.args.get("sig", ""))
    if refused:
        raise errors.Forbidden("This link is invalid or has expired; get a fresh one from the order.",
                               {"reason": refused})
    item, order = _item_and_order(item_id)
    if order is None:
        raise errors.NotFound("No such file.")
    role = request.args["role"]
    caller = g.get("caller")
    if caller is not None and caller.kind == "buyer" and caller.id == order.client_wallet:
        role = "buyer"  # a buyer's own credentials never get more than the buyer may have
    if variant == "original":
        if not files.original_allowed(role, item.media_type, order.status):
            raise errors.Forbidden("The original is available once the order is completed.")
        key, content_type = item.storage_key, item.content_type
    else:
        key, content_type = item.preview_key, "image/jpeg"
    if key is None or not rt.storage.exists(key):
        raise errors.NotFound("No such file.")
    response = send_file(rt.storage.local_path(key), mimetype=content_type.split(";")[0].strip(),
                         conditional=True, max_age=0, etag=True)
    response.headers["Cache-Control"] = "private, no-store"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Content-Security-Policy"] = "default-src 'none'; sandbox"
    if content_type.split("/")[0] not in ("image", "video"):
        response.headers["Content-Disposition"] = f'attachment; filename="{item.id}"'
    return response


# --- buyer notifications ------------------------------------------------------------------------------

@notifications_bp.route("", methods=["GET"])
@notifications_bp.arguments(s.PageQuery, location="query")
@notifications_bp.response(200, s.envelope_of(s.NotificationPageOut))
def list_notifications(query):
    caller = _require("buyer")
    stmt = select(Notification).where(Notification.wallet == caller.id)
    rows, last = services.keyset_page(_db(), stmt, Notification, _decode_cursor(query.get("cursor")), query["limit"])
    return ok({**page([notifications.present(r) for r in rows], _cursor_after(last)),
               "unread_count": notifications.unread_count(_db(), caller.id)})


@notifications_bp.route("", methods=["PATCH"])
@notifications_bp.arguments(s.MarkReadIn)
@notifications_bp.response(200, s.envelope_of(s.MarkedOut))
def mark_notifications_read(data):
    """Mark these notifications read, or all of them when `ids` is absent."""
    caller = _require("buyer")
    marked = notifications.mark_read(_db(), caller.id, data.get("ids"))
    return ok({"marked": marked, "unread_count": notifications.unread_count(_db(), caller.id)})


# --- admin, sandbox ----------------------------------------------------------------------------

@admin_bp.route("/orders/<order_id>/resolve", methods=["POST"])
@admin_bp.arguments(s.ResolveIn)
@admin_bp.response(200, s.envelope_of(s.OrderOut))
def resolve(data, order_id):
    return _act(order_id, "resolve", data, ("admin",))


@admin_bp.route("/payouts/<payout_id>/retry", methods=["POST"])
@admin_bp.response(202, s.envelope_of(s.SettlementOut))
def retry_payout(payout_id):
    _require("admin")
    if not looks_like("payout", payout_id):
        raise errors.NotFound("No such payout.")
    return ok(present.settlement(services.request_payout_retry(_db(), _rt(), payout_id)), 202)


@sandbox_bp.route("/transfers", methods=["POST"])
@sandbox_bp.arguments(s.SandboxTransferIn)
@sandbox_bp.response(201, s.envelope_of(s.TransferOut))
def sandbox_transfer(data):
    if _rt().settings.payment_verifier != "sandbox":
        raise errors.NotFound()
    transfer = record_sandbox_transfer(_db(), data["from_wallet"], data["to"], data["amount_cents"],
                                       data["asset"], data["chain"])
    return ok({"tx_hash": transfer.tx_hash, "amount_usd": format_usd(transfer.amount_cents),
               "asset": transfer.asset, "chain": transfer.chain}, 201)


# --- internal (service credential; never routed by the gateway) --------------------------------

@internal.before_request
def _service_only():
    require_service(_rt().settings.service_token)


@internal.get("/orders/<order_id>")
def internal_order(order_id):
    order = _db().get(Order, order_id) if looks_like("order", order_id) else None
    if order is None:
        raise errors.NotFound("No such order.")
    return ok({"id": order.id, "status": order.status, "client_wallet": order.client_wallet,
               "agent_id": order.agent_id, "paid": order.paid_at is not None})


def _load(schema: type, data) -> dict:
    try:
        return schema_of(schema).load(data if data is not None else {})
    except MarshmallowValidationError as exc:
        raise errors.ValidationError("The request is not valid.", {"fields": exc.normalized_messages()}) from None


@internal.get("/agents/<agent_id>")
def internal_agent(agent_id):
    agent = _db().get(Agent, agent_id) if looks_like("agent", agent_id) else None
    if agent is None:
        raise errors.NotFound("No such agent.")
    return ok({"id": agent.id, "payout_wallet": agent.payout_wallet, "payout_chain": agent.payout_chain})


@internal.get("/settlements")
def internal_settlements():
    """Settled orders in settlement order: the payouts worker's catch-up feed for lost messages."""
    query = _load(s.SettledQuery, request.args.to_dict())
    after = (query["since"], query["after_id"]) if "after_id" in query else None
    rows = services.settled_orders(_db(), query["since"], after, query["limit"])
    return ok({"items": [{"order_id": o.id, "status": o.status, "agent_id": o.agent_id,
                          "client_wallet": o.client_wallet, "settled_at": isoformat(o.settled_at),
                          "reported": {r.kind: r.status for r in o.settlements},
                          **services.settlement_of(o)} for o in rows]})


@internal.post("/orders/<order_id>/settlements")
def internal_settlement_report(order_id):
    report = _load(s.SettlementReportIn, request.get_json(silent=True))
    order = _db().scalar(select(Order).where(Order.id == order_id).with_for_update(of=Order)) \
        if looks_like("order", order_id) else None
    if order is None:
        raise errors.NotFound("No such order.")
    applied = services.apply_settlement_report(_db(), _rt(), order, report)
    if applied:
        _view_after_change(order, Caller("admin", "payouts"))
    return ok({"applied": applied})


@internal.post("/sandbox/rail")
def internal_rail_send():
    """The sandbox payout rail: one transfer per idempotency key, ever; a repeat returns the first."""
    data = _load(s.RailTransferIn, request.get_json(silent=True))
    transfer = rail_transfer(current_app.extensions["db"], data["idempotency_key"],
                             destination_for(data["chain"], _rt().settings), data["to"], data["amount_cents"],
                             data["asset"], data["chain"])
    return ok(_rail_record(transfer), 201)


@internal.get("/sandbox/rail/<path:key>")
def internal_rail_lookup(key):
    row = rail_transfer_by_key(_db(), key) if storable(key) else None
    if row is None:
        raise errors.NotFound("No transfer with this idempotency key.")
    return ok(_rail_record(row))


@internal.get("/sandbox/rail")
def internal_rail_list():
    query = _load(s.RailListQuery, request.args.to_dict())
    stmt = select(SandboxTransfer).where(SandboxTransfer.idempotency_key.is_not(None))
    if "after" in query:
        stmt = stmt.where(SandboxTransfer.idempotency_key > query["after"])
    rows = _db().scalars(stmt.order_by(SandboxTransfer.idempotency_key).limit(query["limit"])).all()
    return ok(page([_rail_record(r) for r in rows],
                   rows[-1].idempotency_key if len(rows) == query["limit"] else None))


def _rail_record(row: SandboxTransfer) -> dict:
    return {"tx_ref": row.tx_hash, "idempotency_key": row.idempotency_key, "from": row.from_wallet,
            "to": row.to_address, "amount_usd": format_usd(row.amount_cents), "asset": row.asset,
            "chain": row.chain, "created_at": isoformat(row.created_at)}


@internal.post("/items/<item_id>/media")
def internal_item_media(item_id):
    """The media worker's news of an image item: its preview is ready, or why it failed."""
    report = _load(s.MediaReportIn, request.get_json(silent=True))
    item, order = _item_and_order(item_id, for_update=True)
    if order is None:
        raise errors.NotFound("No such item.")
    applied = services.apply_media_report(_db(), order, item, report)
    if applied:
        _view_after_change(order, Caller("admin", "media"))
    return ok({"applied": applied})


@internal.get("/agents/by-key")
def internal_agent_by_key():
    """The agent an API key belongs to (for messaging, which owns no agents); the key comes in a
    header so it never lands in a URL or an access log."""
    key = request.headers.get("X-Agent-Key", "")
    agent = services.agent_by_key(_db(), key) if key.startswith("atl_") and storable(key) else None
    if agent is None:
        raise errors.NotFound("No such agent.")
    return ok({"id": agent.id})
