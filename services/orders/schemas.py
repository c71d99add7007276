"""HTTP-edge schemas: what clients may send (validated) and what they get (documented)."""
from __future__ import annotations

import datetime as dt
import functools

from marshmallow import Schema, ValidationError, fields, post_load, pre_load, validate, validates_schema

from shared import money

from .statemachine import STATES
from .wallets import normalize_wallet

CHAINS = ("solana", "base")
PRICE_TYPES = ("fixed", "quote", "weekly", "monthly")
MEDIA_TYPES = ("image", "video", "link", "document", "code", "text")
GENERATION_STATUSES = ("pending", "completed", "failed", "timed_out", "expired")
Url = fields.Url(schemes={"http", "https"}, validate=validate.Length(max=2048))


def _text(lo: int, hi: int, required: bool = True, **kw):
    """A string whose length is counted after trimming surrounding white space."""
    return fields.Str(required=required, validate=lambda s: _check_length(s, lo, hi), **kw)


def _check_length(value: str, lo: int, hi: int) -> None:
    length = len(value.strip())
    if length < lo or len(value) > hi:
        raise ValidationError(f"Length must be between {lo} and {hi}.")


class Money(fields.Str):
    """A 2-decimal USDC string; loads to integer cents."""

    def _deserialize(self, value, attr, data, **kwargs):
        try:
            cents = money.parse_usd(value)
        except ValueError as exc:
            raise ValidationError(str(exc)) from None
        if cents <= 0 or cents > money.MAX_CENTS:
            raise ValidationError("must be more than 0.00 and at most 1000000.00")
        return cents


class UtcDateTime(fields.AwareDateTime):
    """An ISO 8601 time with its zone, loaded in UTC. A time that has no UTC form (year 1 or 9999
    pushed past the calendar by its offset) is not a valid time, rather than a database error."""

    def _deserialize(self, value, attr, data, **kwargs):
        moment = super()._deserialize(value, attr, data, **kwargs)
        try:
            return moment.astimezone(dt.timezone.utc)
        except OverflowError:
            raise self.make_error("invalid", input=value, obj_type=self.OBJ_TYPE) from None


def _wallet_pair(data, wallet_key: str, chain_key: str, required: bool) -> None:
    wallet, chain = data.get(wallet_key), data.get(chain_key)
    if (wallet is None) != (chain is None):
        raise ValidationError(f"{wallet_key} and {chain_key} go together.", wallet_key)
    if wallet is None:
        if required:
            raise ValidationError("Missing data for required field.", wallet_key)
        return
    try:
        data[wallet_key] = normalize_wallet(chain, wallet)
    except ValueError as exc:
        raise ValidationError(str(exc), wallet_key) from None


# --- inputs ----------------------------------------------------------------------------------

class ChallengeIn(Schema):
    wallet = fields.Str(required=True, validate=validate.Length(max=64))
    chain = fields.Str(required=True, validate=validate.OneOf(CHAINS))

    @post_load
    def _normalize(self, data, **_):
        _wallet_pair(data, "wallet", "chain", True)
        return data


class SessionIn(ChallengeIn):
    nonce = fields.Str(required=True, validate=validate.Length(min=1, max=64))
    signature = fields.Str(required=True, validate=validate.Length(min=1, max=200))


class AgentIn(Schema):
    name = _text(1, 100)
    payout_wallet = fields.Str(validate=validate.Length(max=64))
    payout_chain = fields.Str(validate=validate.OneOf(CHAINS))
    endpoint_url = Url

    @post_load
    def _normalize(self, data, **_):
        _wallet_pair(data, "payout_wallet", "payout_chain", False)
        return data


class AgentPatchIn(AgentIn):
    name = _text(1, 100, required=False)

    @validates_schema
    def _not_empty(self, data, **_):
        if not data:
            raise ValidationError("Send at least one field to change.")


class ServiceIn(Schema):
    title = _text(1, 200)
    description = _text(1, 5000)
    price_type = fields.Str(required=True, validate=validate.OneOf(PRICE_TYPES))
    price_usd = Money(data_key="price_usd", attribute="price_cents")
    turnaround_hours = fields.Int(strict=True, validate=validate.Range(1, 8760))
    max_revisions = fields.Int(strict=True, load_default=3, validate=validate.Range(0, 10))
    quota_limit = fields.Int(strict=True, load_default=0, validate=validate.Range(0, 1_000_000))

    @validates_schema
    def _price_rules(self, data, **_):
        if data["price_type"] != "quote" and data.get("price_cents") is None:
            raise ValidationError("A fixed, weekly or monthly service needs price_usd.", "price_usd")
        if data.get("quota_limit") and data["price_type"] not in ("weekly", "monthly"):
            raise ValidationError("Only weekly and monthly services have a quota.", "quota_limit")


class ServiceQuery(Schema):
    agent_id = fields.Str(validate=validate.Length(max=32))
    cursor = fields.Str(validate=validate.Length(max=200))
    limit = fields.Int(load_default=20, validate=validate.Range(1, 100))


class OrderIn(Schema):
    service_id = fields.Str(required=True, validate=validate.Length(min=1, max=32))
    brief = _text(10, 3000)
    reference_urls = fields.List(Url, validate=validate.Length(max=5))


class OrderListQuery(Schema):
    """A page filtered by `status`, a comma-separated list of the statuses in KNOWN."""
    KNOWN = STATES
    status = fields.Str(validate=validate.Length(max=300))
    cursor = fields.Str(validate=validate.Length(max=200))
    limit = fields.Int(load_default=20, validate=validate.Range(1, 100))

    @post_load
    def _statuses(self, data, **_):
        if "status" in data:
            statuses = [s.strip() for s in data["status"].split(",") if s.strip()]
            unknown = [s for s in statuses if s not in self.KNOWN]
            if unknown or not statuses:
                raise ValidationError(f"Unknown status: {', '.join(unknown) or '(empty)'}.", "status")
            data["status"] = statuses
        return data


class OrderPatchIn(Schema):
    action = fields.Str(required=True, validate=validate.OneOf(
        ("accept", "pay", "approve", "revision", "dispute", "cancel")))
    escrow_tx_hash = fields.Str(validate=validate.Length(min=1, max=128))
    feedback = _text(1, 2000, required=False)
    reason = fields.Str(validate=validate.Length(max=2000))

    @validates_schema
    def _per_action(self, data, **_):
        if data["action"] == "pay" and not data.get("escrow_tx_hash"):
            raise ValidationError("Paying needs escrow_tx_hash.", "escrow_tx_hash")
        if data["action"] == "revision" and not data.get("feedback"):
            raise ValidationError("A revision needs feedback (1-2000 characters).", "feedback")


class QuoteIn(Schema):
    price_usd = Money(required=True, data_key="price_usd", attribute="price_cents")


class DeclineIn(Schema):
    reason = fields.Str(validate=validate.Length(max=2000))


class DeliverableIn(Schema):
    url = Url
    upload_id = fields.Str(validate=validate.Length(min=1, max=64))
    media_type = fields.Str(required=True, validate=validate.OneOf(MEDIA_TYPES))
    title = fields.Str(validate=validate.Length(max=200))

    @validates_schema
    def _one_source(self, data, **_):
        if ("url" in data) == ("upload_id" in data):
            raise ValidationError("Give exactly one of url or upload_id.", "url")


class DeliverIn(Schema):
    deliverables = fields.List(fields.Nested(DeliverableIn), validate=validate.Length(min=1, max=20))
    # Atelier's single-deliverable form
    deliverable_url = Url
    deliverable_media_type = fields.Str(validate=validate.OneOf(MEDIA_TYPES))

    @pre_load
    def _single_form(self, data, **_):
        if isinstance(data, dict) and "deliverable_url" in data and "deliverables" not in data:
            data = dict(data)
            item = {"url": data.pop("deliverable_url")}
            if "deliverable_media_type" in data:
                item["media_type"] = data.pop("deliverable_media_type")
            data["deliverables"] = [item]
        return data

    @validates_schema
    def _present(self, data, **_):
        if not data.get("deliverables"):
            raise ValidationError("Give deliverables (or deliverable_url).", "deliverables")


class GenerateIn(Schema):
    prompt = _text(1, 2000)


class GenerationAnswerIn(Schema):
    """A result (one file or link, like a deliverable) or `{"status": "failed", "error": ...}`."""
    status = fields.Str(validate=validate.OneOf(("completed", "failed")))
    error = _text(1, 2000, required=False)
    url = Url
    upload_id = fields.Str(validate=validate.Length(min=1, max=64))
    media_type = fields.Str(validate=validate.OneOf(MEDIA_TYPES))
    title = fields.Str(validate=validate.Length(max=200))

    @validates_schema
    def _result_or_failure(self, data, **_):
        if data.get("status") == "failed":
            if not data.get("error"):
                raise ValidationError("A failed generation needs an error (1-2000 characters).", "error")
            extra = [k for k in ("url", "upload_id", "media_type", "title") if k in data]
            if extra:
                raise ValidationError("A failed generation has no result.", extra[0])
            return
        if "error" in data:
            raise ValidationError("Only a failed generation has an error.", "error")
        if ("url" in data) == ("upload_id" in data):
            raise ValidationError("Give exactly one of url or upload_id (or status \"failed\" with an error).", "url")
        if "media_type" not in data:
            raise ValidationError("Missing data for required field.", "media_type")


class GenerationListQuery(OrderListQuery):
    KNOWN = GENERATION_STATUSES


class WebhookLogQuery(OrderListQuery):
    KNOWN = ("pending", "delivered", "failed", "no_endpoint")


class EventFeedQuery(Schema):
    after = fields.Int(load_default=0, validate=validate.Range(0, 2**62))
    limit = fields.Int(load_default=100, validate=validate.Range(1, 1000))


class PageQuery(Schema):
    cursor = fields.Str(validate=validate.Length(max=200))
    limit = fields.Int(load_default=20, validate=validate.Range(1, 100))


class MarkReadIn(Schema):
    ids = fields.List(fields.Str(validate=validate.Length(min=1, max=32)), validate=validate.Length(min=1, max=100))


class ReviewIn(Schema):
    rating = fields.Int(required=True, strict=True, validate=validate.Range(1, 5))
    comment = fields.Str(validate=validate.Length(max=500))


class ResolveIn(Schema):
    outcome = fields.Str(required=True, validate=validate.OneOf(("release", "refund", "split")))
    agent_amount_usd = Money(attribute="agent_amount_cents")
    buyer_amount_usd = Money(attribute="buyer_amount_cents")
    note = _text(1, 2000)


class SandboxTransferIn(Schema):
    from_wallet = fields.Str(required=True, validate=validate.Length(max=64))
    to = fields.Str(required=True, validate=validate.Length(min=1, max=64))
    amount_usd = Money(required=True, attribute="amount_cents")
    asset = fields.Str(required=True, validate=validate.Length(min=1, max=16))
    chain = fields.Str(required=True, validate=validate.OneOf(CHAINS))

    @post_load
    def _normalize(self, data, **_):
        _wallet_pair(data, "from_wallet", "chain", True)
        return data


# --- internal (service to service) ---------------------------------------------------------------

class SettlementReportIn(Schema):
    id = fields.Str(required=True, validate=validate.Length(min=1, max=32))
    status = fields.Str(required=True, validate=validate.OneOf(("pending", "sent", "blocked", "failed")))
    version = fields.Int(required=True, strict=True, validate=validate.Range(min=1, max=2**31 - 1))
    tx_ref = fields.Str(allow_none=True, validate=validate.Length(max=128))
    error = fields.Str(allow_none=True, validate=validate.Length(max=2000))
    updated_at = UtcDateTime(required=True)


class SettledQuery(Schema):
    since = UtcDateTime(required=True)
    after_id = fields.Str(validate=validate.Length(min=1, max=32))
    limit = fields.Int(load_default=200, validate=validate.Range(min=1, max=1000))


class RailTransferIn(Schema):
    idempotency_key = fields.Str(required=True, validate=validate.Length(min=1, max=128))
    to = fields.Str(required=True, validate=validate.Length(min=1, max=64))
    amount_usd = Money(required=True, attribute="amount_cents")
    asset = fields.Str(required=True, validate=validate.Length(min=1, max=16))
    chain = fields.Str(required=True, validate=validate.OneOf(CHAINS))


class MediaReportIn(Schema):
    status = fields.Str(required=True, validate=validate.OneOf(("ready", "failed")))
    preview_key = fields.Str(validate=validate.Length(min=1, max=255))
    original_key = fields.Str(validate=validate.Length(min=1, max=255))
    sha256 = fields.Str(validate=validate.Regexp(r"^[0-9a-f]{64}$"))
    content_type = fields.Str(validate=validate.Length(min=1, max=100))
    size = fields.Int(strict=True, validate=validate.Range(min=0, max=2**31 - 1))  # the column's range
    error = fields.Str(validate=validate.Length(min=1, max=2000))

    @validates_schema
    def _complete(self, data, **_):
        if data["status"] == "ready" and "preview_key" not in data:
            raise ValidationError("A ready item needs its preview_key.", "preview_key")
        if data["status"] == "failed" and "error" not in data:
            raise ValidationError("A failed item needs the error the agent will read.", "error")
        if "original_key" in data and "content_type" not in data:  # the original is served with it
            raise ValidationError("A stored original needs its content_type.", "content_type")


class RailListQuery(Schema):
    after = fields.Str(validate=validate.Length(min=1, max=128))
    limit = fields.Int(load_default=500, validate=validate.Range(min=1, max=1000))


# --- outputs (documentation of the envelope's `data`) ------------------------------------------

class AgentOut(Schema):
    id = fields.Str()
    name = fields.Str()
    payout_wallet = fields.Str(allow_none=True)
    payout_chain = fields.Str(allow_none=True)
    endpoint_url = fields.Str(allow_none=True)
    avg_rating = fields.Str(allow_none=True)
    review_count = fields.Int()
    rating_histogram = fields.Dict(keys=fields.Str(), values=fields.Int())
    completed_orders = fields.Int()
    total_orders = fields.Int()
    created_at = fields.Str()


class AgentCreatedOut(Schema):
    agent = fields.Nested(AgentOut)
    api_key = fields.Str()
    webhook_secret = fields.Str(allow_none=True)


class ServiceOut(Schema):
    id = fields.Str()
    agent_id = fields.Str()
    title = fields.Str()
    description = fields.Str()
    price_type = fields.Str()
    price_usd = fields.Str(allow_none=True)
    turnaround_hours = fields.Int()
    max_revisions = fields.Int()
    quota_limit = fields.Int()
    created_at = fields.Str()


class ItemOut(Schema):
    id = fields.Str()
    media_type = fields.Str()
    title = fields.Str(allow_none=True)
    url = fields.Str(allow_none=True)
    preview_url = fields.Str(allow_none=True)
    preview_status = fields.Str(allow_none=True)


class DeliveryOut(Schema):
    id = fields.Str()
    number = fields.Int()
    created_at = fields.Str()
    items = fields.List(fields.Nested(ItemOut))


class TimelineOut(Schema):
    action = fields.Str()
    from_ = fields.Str(data_key="from", allow_none=True)
    to = fields.Str()
    actor_type = fields.Str()
    actor_id = fields.Str(allow_none=True)
    at = fields.Str()
    note = fields.Str(allow_none=True)


class ReviewOut(Schema):
    id = fields.Str()
    order_id = fields.Str()
    rating = fields.Int()
    comment = fields.Str(allow_none=True)
    created_at = fields.Str()


class WorkspaceOut(Schema):
    opened_at = fields.Str()
    expires_at = fields.Str()
    closed_at = fields.Str(allow_none=True)
    quota_total = fields.Int(metadata={"description": "0 = unlimited"})
    quota_used = fields.Int()
    generations_pending = fields.Int()


class GenerationOut(Schema):
    id = fields.Str()
    order_id = fields.Str()
    prompt = fields.Str()
    status = fields.Str(metadata={"description": "pending | completed | failed | timed_out | expired"})
    created_at = fields.Str()
    dispatched_at = fields.Str(allow_none=True)
    deadline_at = fields.Str(allow_none=True)
    answered_at = fields.Str(allow_none=True)
    error = fields.Str(allow_none=True)
    result = fields.Nested(ItemOut, allow_none=True)


class GenerateOut(Schema):
    generation = fields.Nested(GenerationOut)
    quota_used = fields.Int()
    quota_total = fields.Int()
    expires_at = fields.Str()


class OrderOut(Schema):
    id = fields.Str()
    status = fields.Str()
    service_id = fields.Str()
    agent_id = fields.Str()
    client_wallet = fields.Str()
    price_type = fields.Str()
    brief = fields.Str()
    reference_urls = fields.List(fields.Str())
    quoted_price_usd = fields.Str(allow_none=True)
    escrow_tx_hash = fields.Str(allow_none=True)
    revision_count = fields.Int()
    max_revisions = fields.Int()
    due_at = fields.Str(allow_none=True)
    review_deadline_at = fields.Str(allow_none=True)
    deliveries = fields.List(fields.Nested(DeliveryOut))
    workspace = fields.Nested(WorkspaceOut, allow_none=True)
    previous_order_id = fields.Str(allow_none=True)
    next_order_id = fields.Str(allow_none=True)
    review = fields.Nested(ReviewOut, allow_none=True)
    payout = fields.Dict(allow_none=True)
    refund = fields.Dict(allow_none=True)
    timeline = fields.List(fields.Nested(TimelineOut))
    created_at = fields.Str()
    updated_at = fields.Str()


class SecretOut(Schema):
    webhook_secret = fields.Str()
    previous_secret_valid_until = fields.Str(allow_none=True)


class WebhookDeliveryOut(Schema):
    id = fields.Str()
    event_id = fields.Str()
    event = fields.Str()
    order_id = fields.Str()
    sequence = fields.Int()
    status = fields.Str(metadata={"description": "pending | delivered | failed | no_endpoint"})
    attempts = fields.Int()
    last_status_code = fields.Int(allow_none=True)
    last_error = fields.Str(allow_none=True)
    next_attempt_at = fields.Str(allow_none=True)
    created_at = fields.Str()
    delivered_at = fields.Str(allow_none=True)


class FeedEventOut(Schema):
    position = fields.Int(metadata={"description": "the event's place in this agent's feed: pass it as `after`"})
    id = fields.Str()
    event = fields.Str()
    order_id = fields.Str()
    sequence = fields.Int()
    created_at = fields.Str()
    data = fields.Dict()


class NotificationOut(Schema):
    id = fields.Str()
    kind = fields.Str(metadata={"description": "quoted | delivered | workspace_closed | dispute_resolved | "
                                               "refund_sent | message"})
    order_id = fields.Str()
    text = fields.Str()
    created_at = fields.Str()
    read_at = fields.Str(allow_none=True)


class NotificationPageOut(Schema):
    items = fields.List(fields.Nested(NotificationOut))
    next_cursor = fields.Str(allow_none=True)
    unread_count = fields.Int()


class MarkedOut(Schema):
    marked = fields.Int()
    unread_count = fields.Int()


class PaymentOut(Schema):
    amount_usd = fields.Str()
    asset = fields.Str()
    chain = fields.Str()
    destination = fields.Str()
    from_wallet = fields.Str()  # the buyer's own wallet: only a transfer from it pays the order


class ChallengeOut(Schema):
    nonce = fields.Str()
    message = fields.Str()
    expires_at = fields.Str()


class SessionOut(Schema):
    token = fields.Str()
    expires_at = fields.Str()


class UploadOut(Schema):
    upload_id = fields.Str()
    media_type = fields.Str()
    content_type = fields.Str()
    size = fields.Int()
    sha256 = fields.Str()


class SettlementOut(Schema):
    id = fields.Str()
    status = fields.Str()
    amount_usd = fields.Str()
    fee_usd = fields.Str()
    tx_ref = fields.Str(allow_none=True)
    error = fields.Str(allow_none=True)
    updated_at = fields.Str()


class TransferOut(Schema):
    tx_hash = fields.Str()


@functools.cache
def envelope_of(schema: type[Schema], many_page: bool = False) -> type[Schema]:
    """The documented envelope: {success, data} with data the object or a page of them."""
    if many_page:
        data = fields.Nested(type(f"{schema.__name__}Page", (Schema,), {
            "items": fields.List(fields.Nested(schema)), "next_cursor": fields.Str(allow_none=True)}))
    else:
        data = fields.Nested(schema)
    name = schema.__name__.removesuffix("Out") + ("PageEnvelope" if many_page else "Envelope")
    return type(name, (Schema,), {"success": fields.Bool(), "data": data})
