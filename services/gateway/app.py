"""A small streaming reverse proxy: /api/orders/<id>/messages* → messaging, other /api/* → orders."""
from __future__ import annotations

import copy
import http.cookiejar
import json
import logging
import posixpath
import re
import uuid
from pathlib import Path
from urllib.parse import quote, unquote

import requests
from requests.adapters import HTTPAdapter
from werkzeug.datastructures import Headers
from werkzeug.wrappers import Request, Response

from shared.settings import load as load_settings

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT = 3.0
READ_TIMEOUT = 60.0
OPENAPI_TIMEOUT = (CONNECT_TIMEOUT, 10.0)
CHUNK_SIZE = 64 * 1024
INDEX_HTML = (Path(__file__).parent / "static" / "index.html").read_bytes()

MESSAGES = re.compile(r"^/api/orders/[^/]+/messages(/.*)?$")
MESSAGE_STREAM = re.compile(r"^/api/orders/[^/]+/messages/stream$")
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
    "te", "trailer", "trailers", "transfer-encoding", "upgrade",
})
# Host belongs to the upstream, the service token to internal calls only, and the
# forwarding headers are the gateway's to set, never the client's.
NOT_FORWARDED = HOP_BY_HOP | {
    "host", "content-length", "expect", "x-service-token",
    "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-request-id",
}


def canonical_path(path: str) -> str:
    """The path as any upstream could end up reading it: fully decoded, dot-segments and slashes collapsed."""
    for _ in range(8):  # %2F, %252F, ... all become '/'
        decoded = unquote(path)
        if decoded == path:
            break
        path = decoded
    path = path.replace("\\", "/")
    normalized = "/" + posixpath.normpath("/" + path).lstrip("/")
    if path.endswith("/") and normalized != "/":
        normalized += "/"
    return normalized


def is_internal(path: str) -> bool:
    # Any segment named internal, whatever its case or ;parameters: stricter than the routes need.
    return any(s.split(";")[0].strip().lower() == "internal" for s in path.split("/"))


def error(status: int, code: str, message: str) -> Response:
    body = {"success": False, "error": message, "code": code, "details": {}}
    return Response(json.dumps(body), status=status, mimetype="application/json")


def merge_openapi(orders: dict, messaging: dict | None) -> dict:
    """One document: orders' paths and components, plus messaging's; messaging owns the message routes."""
    merged = copy.deepcopy(orders)
    merged["info"] = {**merged.get("info", {}), "title": "Order desk API"}
    paths = merged.setdefault("paths", {})
    if messaging:
        for path, item in messaging.get("paths", {}).items():
            if MESSAGES.match(path) or path not in paths:
                paths[path] = item
        components = merged.setdefault("components", {})
        for section, entries in messaging.get("components", {}).items():
            for name, value in entries.items():
                components.setdefault(section, {}).setdefault(name, value)
        tag_names = {t.get("name") for t in merged.get("tags", [])}
        merged["tags"] = merged.get("tags", []) + [
            t for t in messaging.get("tags", []) if t.get("name") not in tag_names
        ]
    merged["paths"] = {p: item for p, item in paths.items() if not is_internal(p)}
    return merged


class _SizedBody:
    """The client's body as a stream with a length, so requests sends Content-Length without buffering it."""

    def __init__(self, stream, length: int):
        self.stream, self.length = stream, length

    def __len__(self):
        return self.length

    def read(self, size: int = -1) -> bytes:
        return self.stream.read(size)

    def __iter__(self):
        return iter(lambda: self.read(CHUNK_SIZE), b"")


class _NoCookies(http.cookiejar.DefaultCookiePolicy):
    # A shared session must never remember one user's cookies for the next.
    def set_ok(self, cookie, request):
        return False


class Gateway:
    def __init__(self, orders_url: str, messaging_url: str, read_timeout: float = READ_TIMEOUT):
        self.upstreams = {"orders": orders_url.rstrip("/"), "messaging": messaging_url.rstrip("/")}
        self.read_timeout = read_timeout
        self.session = requests.Session()
        self.session.trust_env = False  # no proxies or .netrc credentials from the environment
        self.session.headers.clear()  # forward the client's headers, not requests' defaults
        self.session.cookies.set_policy(_NoCookies())
        self.session.mount("http://", HTTPAdapter(pool_connections=2, pool_maxsize=32))

    def __call__(self, environ, start_response):
        request = Request(environ)
        request_id = request.headers.get("X-Request-ID", "")
        if not REQUEST_ID.fullmatch(request_id):
            request_id = uuid.uuid4().hex
        response = self.dispatch(request, request_id)
        response.headers["X-Request-ID"] = request_id
        return response(environ, start_response)

    def dispatch(self, request: Request, request_id: str) -> Response:
        path = canonical_path(request.path)
        if is_internal(path):
            return error(404, "not_found", "Not found.")
        if path in ("/", "/healthz", "/api/openapi.json") and request.method not in ("GET", "HEAD"):
            return error(405, "method_not_allowed", "Method not allowed.")
        if path == "/":
            return Response(INDEX_HTML, mimetype="text/html")
        if path == "/healthz":
            return Response(json.dumps({"success": True, "data": {"status": "ok"}}), mimetype="application/json")
        if path == "/api/openapi.json":
            return self.openapi(request_id)
        if MESSAGES.match(path):
            return self.forward(request, "messaging", path, request_id)
        if path.startswith("/api/"):
            return self.forward(request, "orders", path, request_id)
        return error(404, "not_found", "Not found.")

    def forward(self, request: Request, service: str, path: str, request_id: str) -> Response:
        connection_tokens = {t.strip().lower() for t in request.headers.get("Connection", "").split(",")}
        headers: dict[str, str] = {}
        for name, value in request.headers.items():
            key = name.lower()
            if key not in NOT_FORWARDED and key not in connection_tokens:
                headers[name] = f"{headers[name]}, {value}" if name in headers else value
        headers["X-Forwarded-For"] = request.remote_addr or ""
        headers["X-Forwarded-Proto"] = request.scheme
        headers["X-Request-ID"] = request_id

        if request.content_length:
            body = _SizedBody(request.stream, request.content_length)
        elif "chunked" in request.headers.get("Transfer-Encoding", "").lower():
            body = iter(lambda: request.stream.read(CHUNK_SIZE), b"")
        else:
            body = None

        url = self.upstreams[service] + quote(path, safe="/:@!$&'()*+,;=~-._")
        if request.query_string:
            url += "?" + request.query_string.decode("latin-1")
        # An event stream stays open as long as the client listens; everything else must answer.
        read_timeout = None if MESSAGE_STREAM.match(path) else self.read_timeout
        try:
            upstream = self.session.request(
                request.method, url, headers=headers, data=body, stream=True,
                allow_redirects=False, timeout=(CONNECT_TIMEOUT, read_timeout),
            )
        except requests.RequestException as exc:
            logger.warning("upstream %s failed: %s (request_id=%s)", service, exc, request_id)
            return error(503, "service_unavailable", f"The {service} service is unavailable, try again shortly.")

        def body_chunks():
            try:
                # Raw bytes, not decoded: Content-Encoding and Content-Length pass through as sent;
                # chunked upstream bodies (event streams) are yielded chunk by chunk.
                yield from upstream.raw.stream(CHUNK_SIZE, decode_content=False)
                upstream.raw.release_conn()  # read to the end: the connection can serve the next request
            except Exception as exc:  # headers are already sent; ending the body is all that is left
                logger.warning("upstream %s broke off: %s (request_id=%s)", service, exc, request_id)
            finally:
                upstream.close()

        response = Response(body_chunks(), status=upstream.status_code, direct_passthrough=True)
        response.call_on_close(upstream.close)  # also when the body is never read (HEAD)
        response.headers = Headers(
            [(k, v) for k, v in upstream.raw.headers.items() if k.lower() not in HOP_BY_HOP]
        )
        return response

    def openapi(self, request_id: str) -> Response:
        docs = {}
        for service, base in self.upstreams.items():
            try:
                reply = self.session.get(
                    f"{base}/api/openapi.json", headers={"X-Request-ID": request_id}, timeout=OPENAPI_TIMEOUT
                )
                reply.raise_for_status()
                docs[service] = reply.json()
            except (requests.RequestException, ValueError) as exc:
                logger.warning("openapi of %s unavailable: %s (request_id=%s)", service, exc, request_id)
        if "orders" not in docs:
            return error(503, "service_unavailable", "The orders service is unavailable, try again shortly.")
        merged = merge_openapi(docs["orders"], docs.get("messaging"))
        return Response(json.dumps(merged), mimetype="application/json")


def create_app(
    orders_url: str | None = None, messaging_url: str | None = None, read_timeout: float = READ_TIMEOUT
) -> Gateway:
    settings = load_settings()  # ORDERS_URL, MESSAGING_URL
    return Gateway(orders_url or settings.orders_url, messaging_url or settings.messaging_url, read_timeout)
