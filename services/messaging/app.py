"""The messaging service's app factory: its database, who the caller is, limits, the blueprint,
and the two background threads of each process (the orders:changed listener, the outbox sweeper)."""
from __future__ import annotations

import hashlib
import logging
import os
import threading
from dataclasses import dataclass, field

import redis
from flask import Flask, g, request
from flask_smorest import Api
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError

from shared import errors, ratelimit
from shared.auth import Caller, anonymous_caller, bearer_token, is_admin_key, verify_session
from shared.celery_app import make_celery
from shared.db import Database
from shared.settings import Settings, load
from shared.web import create_base_app

from .access import ORDERS_TIMEOUT, Access, ChangeListener, OrdersClient
from .models import OutboxEvent
from .relay import MessagingOutbox, Sweeper
from .stream import Announcer
from .views import messages_bp

log = logging.getLogger(__name__)


class Background:
    """This process's listener and sweeper threads, started on its first API request (so each
    gunicorn worker, forked after import, starts its own) and stopped by `stop()`."""

    def __init__(self, settings: Settings, access: Access, outbox: MessagingOutbox):
        self.settings, self.access, self.outbox = settings, access, outbox
        self.stopping = threading.Event()
        self.listener: ChangeListener | None = None
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._threads: list[threading.Thread] = []

    def ensure_started(self) -> None:
        if self._pid == os.getpid() or self.stopping.is_set():
            return
        with self._lock:
            if self._pid == os.getpid():
                return
            self.listener = ChangeListener(self.settings.redis_url, self.access, self.stopping)
            sweeper = Sweeper(self.outbox, self.settings.outbox_sweep_seconds, self.stopping)
            self._threads = [threading.Thread(target=self.listener.run, name="messaging-orders-changed", daemon=True),
                             threading.Thread(target=sweeper.run, name="messaging-outbox-sweeper", daemon=True)]
            for thread in self._threads:
                thread.start()
            self._pid = os.getpid()

    def stop(self, timeout: float = 5.0) -> None:
        self.stopping.set()
        for thread in self._threads:
            thread.join(timeout)


@dataclass
class Runtime:
    settings: Settings
    db: Database
    cache: redis.Redis
    pubsub: redis.Redis  # streams' subscriptions: no read timeout of their own, pinged while idle
    access: Access
    outbox: MessagingOutbox
    announcer: Announcer
    background: Background = field(init=False)

    def __post_init__(self):
        self.background = Background(self.settings, self.access, self.outbox)


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or load()
    db = Database(settings.messaging_db)
    cache = redis.Redis.from_url(settings.redis_url, socket_timeout=2, socket_connect_timeout=2)
    pubsub = redis.Redis.from_url(settings.redis_url, socket_timeout=None, socket_connect_timeout=2,
                                  health_check_interval=30)
    access = Access(cache, OrdersClient(settings.orders_url, settings.service_token, timeout=ORDERS_TIMEOUT),
                    settings.messaging_access_ttl_seconds)
    outbox = MessagingOutbox(OutboxEvent, make_celery("messaging", settings), db)
    runtime = Runtime(settings, db, cache, pubsub, access, outbox, Announcer(cache))

    def database_answers() -> bool:
        with db.engine.connect() as conn:
            return conn.execute(text("SELECT 1")).scalar() == 1

    app = create_base_app("messaging", settings, {"database": database_answers, "redis": cache.ping})
    app.extensions["messaging"] = runtime
    db.init_app(app, on_commit_error=_commit_error)
    _install_auth_and_limits(app, runtime)

    @app.errorhandler(IntegrityError)
    def _integrity(_exc):  # e.g. one Idempotency-Key raced in twice: the retry replays the winner
        return errors.error_response(409, "That conflicts with a change made meanwhile; retry.", "conflict")

    @app.errorhandler(OperationalError)
    def _db_down(_exc):
        log.warning("database error", exc_info=True)
        return errors.error_response(503, "The database is unavailable; retry later.", "service_unavailable")

    @app.errorhandler(redis.RedisError)
    def _redis_down(_exc):
        log.warning("redis error", exc_info=True)
        return errors.error_response(503, "A dependency is unavailable; retry later.", "service_unavailable")

    app.config.update(API_TITLE="Order desk — messaging", API_VERSION="1", OPENAPI_VERSION="3.0.3",
                      OPENAPI_URL_PREFIX="/api", OPENAPI_JSON_PATH="openapi.json")
    api = Api(app)
    errors.register_error_handlers(app)  # ours, not flask-smorest's: every error in the envelope
    api.spec.components.security_scheme("bearer", {"type": "http", "scheme": "bearer"})
    api.register_blueprint(messages_bp)
    return app


def _commit_error(exc: Exception):
    if isinstance(exc, IntegrityError):
        return errors.error_response(409, "That conflicts with a change made meanwhile; retry.", "conflict")
    if isinstance(exc, (OperationalError, InterfaceError)):
        log.warning("commit failed", exc_info=exc)
        return errors.error_response(503, "The database is unavailable; retry later.", "service_unavailable")
    log.error("commit failed", exc_info=exc)
    return errors.error_response(500, "Internal error.", "internal_error")


def _install_auth_and_limits(app: Flask, rt: Runtime) -> None:
    settings = rt.settings

    @app.before_request
    def _authenticate():
        if not request.path.startswith("/api/") or request.path == "/api/openapi.json":
            return
        rt.background.ensure_started()
        # the same per-minute budget per caller as the orders service (the same Redis keys)
        g.caller = ratelimit.limit_request(rt.cache, settings, lambda: _resolve_caller(rt))

    app.after_request(ratelimit.add_headers)


def _resolve_caller(rt: Runtime) -> Caller:
    """Buyers' session tokens are checked here; agents' keys by the orders service (cached)."""
    token = bearer_token()
    if token is None:
        return anonymous_caller()
    if token.startswith("atl_"):
        agent_id = rt.access.agent_for_key(token)
        if agent_id is None:
            raise errors.Unauthenticated("Unknown agent API key.")
        return Caller("agent", agent_id)
    if token.startswith("ses."):
        try:
            caller = verify_session(rt.settings.session_secret, token)
        except TypeError:  # hmac.compare_digest refuses non-ASCII text: not a token of ours
            caller = None
        if caller is None:
            raise errors.Unauthenticated("The session token is invalid or has expired; log in again.")
        return caller
    if is_admin_key(token, rt.settings.admin_api_keys):
        return Caller("admin", "admin-" + hashlib.sha256(token.encode()).hexdigest()[:8])
    raise errors.Unauthenticated("Unknown credentials.")
