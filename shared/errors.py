"""Domain errors, the one table mapping them to (HTTP status, stable code), and the envelope."""
from __future__ import annotations

from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException


class DomainError(Exception):
    status = 400
    code = "bad_request"
    message = "The request could not be processed."

    def __init__(self, message: str | None = None, details: dict | None = None, headers: dict | None = None):
        super().__init__(message or self.message)
        self.message = message or self.message
        self.details = details or {}
        self.headers = headers or {}


def _error(name: str, status: int, code: str, message: str) -> type[DomainError]:
    return type(name, (DomainError,), {"status": status, "code": code, "message": message})


# The table: one line per error a client can see.
ValidationError = _error("ValidationError", 400, "validation_error", "The request is not valid.")
Unauthenticated = _error("Unauthenticated", 401, "unauthenticated", "Missing or invalid credentials.")
PaymentUnverified = _error("PaymentUnverified", 402, "payment_unverified", "The payment could not be verified.")
Forbidden = _error("Forbidden", 403, "forbidden", "This action belongs to the other party.")
NotFound = _error("NotFound", 404, "not_found", "Not found.")
MethodNotAllowed = _error("MethodNotAllowed", 405, "method_not_allowed", "Method not allowed.")
InvalidTransition = _error("InvalidTransition", 409, "invalid_transition", "That action is not possible in the order's current state.")
MessagingClosed = _error("MessagingClosed", 409, "messaging_closed", "Messaging is closed on this order.")
ReviewExists = _error("ReviewExists", 409, "review_exists", "This order already has a review.")
PaymentReused = _error("PaymentReused", 409, "payment_reused", "This transaction has already paid an order.")
QuotaExhausted = _error("QuotaExhausted", 409, "quota_exhausted", "The workspace quota is used up.")
WorkspaceClosed = _error("WorkspaceClosed", 409, "workspace_closed", "The workspace is closed.")
IdempotencyConflict = _error("IdempotencyConflict", 409, "idempotency_conflict", "This Idempotency-Key was used with another request.")
Conflict = _error("Conflict", 409, "conflict", "The resource changed meanwhile; retry.")
TooLarge = _error("TooLarge", 413, "too_large", "The request body is too large.")
UnsupportedMediaType = _error("UnsupportedMediaType", 415, "unsupported_media_type", "Send JSON with Content-Type: application/json.")
RateLimited = _error("RateLimited", 429, "rate_limited", "Too many requests; slow down.")
ServiceUnavailable = _error("ServiceUnavailable", 503, "service_unavailable", "A dependency is unavailable; retry later.")

_HTTP_CODES = {400: "bad_request", 401: "unauthenticated", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 413: "too_large", 415: "unsupported_media_type",
               429: "rate_limited"}


def envelope(message: str, code: str, details: dict | None = None) -> dict:
    return {"success": False, "error": message, "code": code, "details": details or {}}


def error_response(status: int, message: str, code: str, details: dict | None = None, headers: dict | None = None):
    response = jsonify(envelope(message, code, details))
    response.status_code = status
    for key, value in (headers or {}).items():
        response.headers[key] = value
    return response


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(DomainError)
    def _domain(exc: DomainError):
        return error_response(exc.status, exc.message, exc.code, exc.details, exc.headers)

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException):
        status = exc.code or 500
        if status >= 500:
            return error_response(status, "Internal error.", "internal_error")
        # flask-smorest puts marshmallow messages on exc.data
        data = getattr(exc, "data", None) or {}
        if status == 422 or (status == 400 and data.get("messages")):
            fields = data.get("messages", {})
            # location (json/query/...) wrapper adds nothing for clients
            if len(fields) == 1 and next(iter(fields)) in ("json", "query", "form", "files", "headers"):
                fields = next(iter(fields.values()))
            return error_response(400, "The request is not valid.", "validation_error", {"fields": fields})
        return error_response(status, exc.description or "Error.", _HTTP_CODES.get(status, "error"))

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        app.logger.exception("unhandled error")
        return error_response(500, "Internal error.", "internal_error")
