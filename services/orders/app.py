"""The orders service's app factory: wires the database, auth, limits and the blueprints."""
from __future__ import annotations

import datetime as dt
import hashlib
import logging

import redis
from flask import Flask, Response, g, request
from flask_smorest import Api
from sqlalchemy import delete, text
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError
from sqlalchemy.orm.exc import StaleDataError

from shared import errors, ratelimit
from shared.auth import Caller, anonymous_caller, bearer_token, is_admin_key, verify_session
from shared.celery_app import make_celery
from shared.db import Database, utcnow
from shared.settings import Settings, load
from shared.web import create_base_app

from . import services
from .models import IdempotencyRecord

log = logging.getLogger(__name__)
IDEMPOTENCY_HEADER = "Idempotency-Key"


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or load()
    db = Database(settings.orders_db)
    cache = redis.Redis.from_url(settings.redis_url, socket_timeout=2, socket_connect_timeout=2)
    runtime, views = services.build_runtime(settings, db, make_celery("orders-web", settings), cache)

    def database_answers() -> bool:
        with db.engine.connect() as conn:
            return conn.execute(text("SELECT 1")).scalar() == 1

    app = create_base_app("orders", settings, {"database": database_answers, "redis": cache.ping})
    app.extensions.update(orders_runtime=runtime, redis=cache, order_views=views)
    db.init_app(app, on_commit_error=lambda exc: _commit_error(db, exc))
    _install_auth_and_limits(app, db, cache, settings)
    _install_idempotency(app, db, settings)

    @app.errorhandler(StaleDataError)
    def _stale(_exc):
        return errors.error_response(409, "The order changed meanwhile; reload it.", "invalid_transition")

    @app.errorhandler(IntegrityError)
    def _integrity(exc):
        return _conflict(exc)

    @app.errorhandler(OperationalError)
    def _db_down(_exc):
        log.warning("database error", exc_info=True)
        return errors.error_response(503, "The database is unavailable; retry later.", "service_unavailable")

    app.config.update(API_TITLE="Order desk — orders", API_VERSION="1", OPENAPI_VERSION="3.0.3",
                      OPENAPI_URL_PREFIX="/api", OPENAPI_JSON_PATH="openapi.json")
    api = Api(app)
    errors.register_error_handlers(app)  # ours, not flask-smorest's: every error in the envelope
    api.spec.components.security_scheme("bearer", {"type": "http", "scheme": "bearer"})
    from . import views
    for blueprint in views.blueprints():
        api.register_blueprint(blueprint)
    app.register_blueprint(views.internal)
    return app


def _conflict(exc: IntegrityError) -> Response:
    """A unique value a concurrent request took first. The payment hash is the contract's
    payment_reused (two pays of one hash on two orders, each verified before the other committed);
    anything else is a conflict to retry."""
    if "escrow_tx_hash" in str(exc.orig):  # both databases name the column in the violation
        return errors.error_response(409, errors.PaymentReused.message, "payment_reused")
    return errors.error_response(409, "That conflicts with a change made meanwhile; retry.", "conflict")


def _commit_error(db: Database, exc: Exception):
    if isinstance(exc, StaleDataError):
        return errors.error_response(409, "The order changed meanwhile; reload it.", "invalid_transition")
    if isinstance(exc, IntegrityError):
        replay = _replay_after_race(db)
        if replay is not None:
            return replay
        return _conflict(exc)
    if isinstance(exc, (OperationalError, InterfaceError)):
        log.warning("commit failed", exc_info=exc)
        return errors.error_response(503, "The database is unavailable; retry later.", "service_unavailable")
    log.error("commit failed", exc_info=exc)
    return errors.error_response(500, "Internal error.", "internal_error")


def _install_auth_and_limits(app: Flask, db: Database, cache: redis.Redis, settings: Settings) -> None:
    @app.before_request
    def _authenticate():
        if not request.path.startswith("/api/") or request.path == "/api/openapi.json":
            return
        g.caller = ratelimit.limit_request(cache, settings, lambda: _resolve_caller(db, settings),
                                           files=request.path.startswith("/api/files/"))

    app.after_request(ratelimit.add_headers)


def _resolve_caller(db: Database, settings: Settings) -> Caller:
    token = bearer_token()
    if token is None:
        return anonymous_caller()
    if token.startswith("atl_"):
        agent = services.agent_by_key(db.session(), token)
        if agent is None:
            raise errors.Unauthenticated("Unknown agent API key.")
        return Caller("agent", agent.id)
    if token.startswith("ses."):
        caller = verify_session(settings.session_secret, token)
        if caller is None:
            raise errors.Unauthenticated("The session token is invalid or has expired; log in again.")
        return caller
    if is_admin_key(token, settings.admin_api_keys):
        return Caller("admin", "admin-" + hashlib.sha256(token.encode()).hexdigest()[:8])
    raise errors.Unauthenticated("Unknown credentials.")


def _install_idempotency(app: Flask, db: Database, settings: Settings) -> None:
    """Same key and body: replay the first response. Same key, other body: 409."""

    @app.before_request
    def _check_key():
        key = request.headers.get(IDEMPOTENCY_HEADER)
        if key is None or request.method not in ("POST", "PATCH") or "caller" not in g:
            return
        if not 1 <= len(key) <= 255:
            raise errors.ValidationError("Idempotency-Key must be 1-255 characters.")
        if request.mimetype == "multipart/form-data":
            # an upload is not read into memory to fingerprint it: its length and multipart
            # boundary stand for the body (a client's retry resends the very same bytes)
            body = f"{request.content_length} {request.content_type}".encode()
        else:
            body = request.get_data()
        fingerprint = hashlib.sha256(b"%s %s\n" % (request.method.encode(), request.path.encode()) + body).hexdigest()
        caller = hashlib.sha256(g.caller.key.encode()).hexdigest()  # fixed length, whatever the id
        # read aside: the request's own transaction (on SQLite, the write lock) begins only when its
        # work does, so a pay waiting on a payment network holds no lock because it carries a key
        with db.read_sessionmaker() as reader:
            record = reader.get(IdempotencyRecord, (caller, key))
        if record is not None and record.created_at < utcnow() - dt.timedelta(seconds=settings.idempotency_ttl_seconds):
            db.session().execute(delete(IdempotencyRecord).where(  # expired: this request starts afresh
                IdempotencyRecord.caller == caller, IdempotencyRecord.key == key))
            record = None
        if record is None:
            g.idempotency = (caller, key, fingerprint)
            return
        if record.fingerprint != fingerprint:
            raise errors.IdempotencyConflict()
        return _replay(record)

    @app.after_request
    def _remember(response):
        pending = g.pop("idempotency", None)
        if pending is None:
            return response
        if response.status_code == 409:
            # refused because a twin with this key (a client's retry sent while the first try was
            # still running) changed the order first: the twin's response is this request's too
            twin = _recorded(db, pending)
            if twin is not None:
                db.discard()
                return twin
        if response.status_code < 400:
            caller, key, fingerprint = pending
            db.session().add(IdempotencyRecord(caller=caller, key=key, fingerprint=fingerprint,
                                               status=response.status_code,
                                               body=response.get_data(as_text=True), created_at=utcnow()))
            g.idempotency_pending = pending
        return response


def _replay(record: IdempotencyRecord) -> Response:
    response = Response(record.body, status=record.status, mimetype="application/json")
    response.headers["Idempotent-Replayed"] = "true"
    return response


def _replay_after_race(db: Database) -> Response | None:
    """Two requests with one key raced to record it; the loser replays the winner's response."""
    pending = g.pop("idempotency_pending", None)
    return None if pending is None else _recorded(db, pending)


def _recorded(db: Database, pending: tuple[str, str, str]) -> Response | None:
    """The response recorded meanwhile for this caller's key, by another request: its replay, or
    409 if that request had another body; None if there is none."""
    caller, key, fingerprint = pending
    with db.read_sessionmaker() as reader:
        record = reader.get(IdempotencyRecord, (caller, key))
    if record is None:
        return None
    if record.fingerprint != fingerprint:
        return errors.error_response(409, errors.IdempotencyConflict.message, "idempotency_conflict")
    return _replay(record)
