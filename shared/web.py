"""What every Flask service shares at the HTTP edge: envelope, request ids, logs, health."""
from __future__ import annotations

import json
import logging
import re
import time
from functools import lru_cache
from typing import Callable

import flask_smorest
from flask import Flask, Request, Response, g, jsonify, request
from werkzeug.middleware.proxy_fix import ProxyFix

from shared import errors, logs
from shared.settings import Settings

access_log = logging.getLogger("access")


def ok(data, status: int = 200, headers: dict | None = None) -> Response:
    response = jsonify({"success": True, "data": data})
    response.status_code = status
    for key, value in (headers or {}).items():
        response.headers[key] = value
    return response


def page(items: list, next_cursor: str | None, **extra) -> dict:
    return {"items": items, "next_cursor": next_cursor, **extra}


def _refuse_unstorable_input(req: Request) -> None:
    """Refuse, before any view runs, input no database can store or no parser should recurse into."""
    if not storable(req.path):
        raise errors.NotFound()  # no id with such characters exists
    if req.environ.get("QUERY_STRING"):
        for name, value in req.args.items(multi=True):
            if not storable(value):
                raise errors.ValidationError("The request contains characters that cannot be stored.",
                                             {"fields": {name: ["Contains a NUL or an unpaired surrogate."]}})
    if req.method not in ("POST", "PATCH", "PUT") or not req.is_json:
        return
    raw = req.get_data(cache=True)
    if not raw:
        return
    try:
        body = json.loads(raw)
    except RecursionError:
        raise errors.ValidationError("The JSON body is nested too deeply.",
                                     {"fields": {"json": ["Nested too deeply."]}}) from None
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        raise errors.ValidationError("The body is not valid JSON.", {"fields": {"json": ["Invalid JSON body."]}}) from None
    where = first_unstorable(body)
    if where is not None:
        raise errors.ValidationError("The request contains characters that cannot be stored.",
                                     {"fields": {where or "json": ["Contains a NUL or an unpaired surrogate."]}})


_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def storable(text: str) -> bool:
    """PostgreSQL text cannot hold NUL; UTF-8 cannot encode a lone surrogate."""
    return _UNSTORABLE.search(text) is None


def first_unstorable(value) -> str | None:
    """The dotted path of the first string (key or value) that cannot be stored, else None."""
    stack = [("", value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str):
            if not storable(item):
                return path
        elif isinstance(item, dict):
            for key, child in item.items():
                if not storable(key):
                    return path
                stack.append((f"{path}.{key}" if path else key, child))
        elif isinstance(item, list):
            stack.extend((f"{path}.{i}" if path else str(i), child) for i, child in enumerate(item))
    return None


@lru_cache(maxsize=None)
def schema_of(schema: type):
    """The one instance of a request schema: loading keeps no state on it, so it serves every
    request (building one copies every field, a quarter of a small request's time)."""
    return schema()


class Blueprint(flask_smorest.Blueprint):
    """flask-smorest's Blueprint, whose argument schemas are built once (schema_of): given a
    class, webargs would build a new schema on every request."""

    def arguments(self, schema, *args, **kwargs):
        return super().arguments(schema_of(schema) if isinstance(schema, type) else schema, *args, **kwargs)


class ServiceApp(Flask):
    """Flask asks whether each view and hook is a coroutine on every request (about ten
    `inspect` calls a request here); a function's answer never changes, so it is asked once."""

    def ensure_sync(self, func: Callable) -> Callable:
        known = self.__dict__.setdefault("_sync_functions", {})
        try:
            return known[func]
        except KeyError:
            known[func] = sync = super().ensure_sync(func)
            return sync
        except TypeError:  # an unhashable callable
            return super().ensure_sync(func)


def create_base_app(name: str, settings: Settings, readiness: dict[str, Callable[[], bool]]) -> Flask:
    """`readiness` names the checks /readyz runs (each returns truthy when its dependency answers)."""
    logs.configure(name, settings.log_level)
    app = ServiceApp(name)
    # "/api/orders//payment" (an empty or "%2F" id) is an unknown path, 404 in the envelope; merging
    # the slashes would answer it with an HTML 308 to another route
    app.url_map.merge_slashes = False
    app.config["SETTINGS"] = settings
    app.config["MAX_CONTENT_LENGTH"] = 1 * 1024 * 1024  # JSON bodies; uploads have their own limit
    app.json.sort_keys = False
    # one trusted proxy in front: the gateway
    app.wsgi_app = ProxyFix(app.wsgi_app, x_for=1, x_proto=1)
    errors.register_error_handlers(app)

    # (the request and g are looked up once per hook: each use of Flask's proxies is a lookup)
    @app.before_request
    def _bind_request():
        req, ctx = request._get_current_object(), g._get_current_object()
        ctx.started = time.perf_counter()
        rid = logs.clean_request_id(req.headers.get(logs.REQUEST_ID_HEADER))
        logs.request_id.set(rid)
        logs.order_id.set(None)
        ctx.request_id = rid
        if req.method in ("POST", "PATCH", "PUT") and req.content_length and not req.is_json \
                and req.mimetype != "multipart/form-data":
            raise errors.UnsupportedMediaType()
        _refuse_unstorable_input(req)

    @app.after_request
    def _finish(response: Response):
        req, ctx = request._get_current_object(), g._get_current_object()
        response.headers[logs.REQUEST_ID_HEADER] = ctx.get("request_id", "")
        method, path, status = req.method, req.path, response.status_code
        if path not in ("/healthz", "/readyz") and access_log.isEnabledFor(logging.INFO):
            started = ctx.get("started")
            duration = round((time.perf_counter() - started) * 1000, 2) if started is not None else 0.0
            access_log.info("%s %s %s", method, path, status,
                            extra={"method": method, "path": path, "status": status, "duration_ms": duration})
        return response

    @app.get("/healthz")
    def healthz():
        return ok({"status": "ok", "service": name})

    @app.get("/readyz")
    def readyz():
        checks = {}
        for check, fn in readiness.items():
            try:
                checks[check] = bool(fn())
            except Exception:
                checks[check] = False
        if all(checks.values()):
            return ok({"status": "ready", "checks": checks})
        return errors.error_response(503, "Not ready.", "not_ready", {"checks": checks})

    return app
