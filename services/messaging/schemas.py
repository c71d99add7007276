"""HTTP-edge schemas: what clients may send (validated) and what they get (documented)."""
from __future__ import annotations

from marshmallow import Schema, ValidationError, fields, post_load, validate

from .services import decode_cursor, parse_event_id

MAX_CONTENT = 2000
# stored as sent, so surrounding white space is kept too; this much of it at most
MAX_RAW_CONTENT = 2 * MAX_CONTENT
PAGE_DEFAULT, PAGE_MAX = 50, 100


def _content(value: str) -> None:
    if not 1 <= len(value.strip()) <= MAX_CONTENT or len(value) > MAX_RAW_CONTENT:
        raise ValidationError(f"Must be 1 to {MAX_CONTENT} characters once surrounding white space is trimmed.")


class MessageIn(Schema):
    content = fields.Str(required=True, validate=_content,
                         metadata={"description": "Plain text, 1-2000 characters after trimming; stored as sent."})


class MessageListQuery(Schema):
    after = fields.Str(validate=validate.Length(max=40),
                       metadata={"description": "A `next_cursor` from an earlier page."})
    limit = fields.Int(load_default=PAGE_DEFAULT, validate=validate.Range(1, PAGE_MAX))

    @post_load
    def _cursor(self, data, **_):
        after = data.pop("after", None)
        try:
            data["after_seq"] = decode_cursor(after) if after else 0
        except ValueError:
            raise ValidationError("Invalid cursor.", "after") from None
        return data


class StreamQuery(Schema):
    last_event_id = fields.Str(validate=validate.Length(max=40), metadata={
        "description": "Resume after this event id (or a page's `next_cursor`); the `Last-Event-ID` "
                       "header wins when both are sent."})

    @post_load
    def _position(self, data, **_):
        if "last_event_id" in data:
            try:
                data["last_event_id"] = parse_event_id(data["last_event_id"])
            except ValueError:
                raise ValidationError("Not an event id.", "last_event_id") from None
        return data


# --- documented outputs --------------------------------------------------------------------

class MessageOut(Schema):
    id = fields.Str(metadata={"example": "msg_3kT9aQ1bC2dE4fG5hJ6k"})
    sender_type = fields.Str(validate=validate.OneOf(("client", "agent")))
    sender_id = fields.Str(metadata={"description": "The buyer's wallet or the agent's id."})
    content = fields.Str()
    created_at = fields.Str(metadata={"example": "2026-11-29T10:00:00.000Z"})
    read_at = fields.Str(allow_none=True, metadata={"description": "When the other party first read it."})


class MessagePage(Schema):
    items = fields.List(fields.Nested(MessageOut))
    next_cursor = fields.Str(allow_none=True, metadata={
        "description": "Pass as `after` for the next page, or later for newer messages; null on an empty page."})
    unread_count = fields.Int(metadata={"description": "Messages from the other party the caller has not read yet."})


class MessageEnvelope(Schema):
    success = fields.Bool()
    data = fields.Nested(MessageOut)


class MessagePageEnvelope(Schema):
    success = fields.Bool()
    data = fields.Nested(MessagePage)
