"""The gateway against two fake upstreams that record what reaches them, over real HTTP."""
from __future__ import annotations

import http.client
import json
import threading
import time

import pytest
import requests
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from services.gateway.app import create_app
from tests.support.net import free_port

ORDERS_DOC = {
    "openapi": "3.0.3",
    "info": {"title": "orders", "version": "1"},
    "paths": {
        "/api/orders": {"post": {"summary": "create order"}},
        "/api/orders/{order_id}/messages": {"get": {"summary": "stale copy in orders"}},
    },
    "components": {"schemas": {"Order": {"type": "object"}, "Error": {"type": "object"}}},
}
MESSAGING_DOC = {
    "openapi": "3.0.3",
    "info": {"title": "messaging", "version": "1"},
    "paths": {
        "/api/orders/{order_id}/messages": {"get": {"summary": "list messages"}, "post": {"summary": "post"}},
        "/internal/messages/purge": {"post": {"summary": "must not leak"}},
    },
    "components": {"schemas": {"Message": {"type": "object"}, "Error": {"type": "object", "x-from": "messaging"}}},
}


class Upstream:
    """A fake service: answers every request with a JSON echo of what it received."""

    def __init__(self, name: str, doc: dict):
        self.name, self.doc = name, doc
        self.received: list[dict] = []
        self.stream_acknowledged = threading.Event()
        self.stream_result: dict = {}
        self.server = make_server("127.0.0.1", 0, self.app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def app(self, environ, start_response):
        request = Request(environ)
        self.received.append({
            "method": request.method,
            "path": request.path,
            "query": request.query_string.decode(),
            "headers": dict(request.headers),
            "body": request.get_data(as_text=True),
        })
        if request.path == "/api/openapi.json":
            response = Response(json.dumps(self.doc), mimetype="application/json")
        elif request.path.endswith("/messages/stream"):
            response = Response(self.events(), mimetype="text/event-stream")
        elif request.path == "/api/slow":
            time.sleep(2)
            response = Response("late")
        else:
            response = Response(json.dumps({"service": self.name, **self.received[-1]}),
                                mimetype="application/json", headers={"X-Upstream": self.name})
        return response(environ, start_response)

    def events(self):
        yield "data: first\n\n"
        # The second event waits until the client has the first: a buffering gateway would stall here.
        self.stream_result["client_had_first"] = self.stream_acknowledged.wait(5)
        yield "data: second\n\n"

    def paths(self) -> list[str]:
        return [r["path"] for r in self.received]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def serve(app) -> tuple[str, object]:
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return f"http://127.0.0.1:{server.server_port}", server


def closed_port_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture
def upstreams():
    orders, messaging = Upstream("orders", ORDERS_DOC), Upstream("messaging", MESSAGING_DOC)
    yield orders, messaging
    orders.close()
    messaging.close()


@pytest.fixture
def gateway(upstreams):
    orders, messaging = upstreams
    url, server = serve(create_app(orders.url, messaging.url))
    yield url
    server.shutdown()
    server.server_close()


def raw_get(base: str, target: str) -> tuple[int, dict]:
    """Send the request target byte for byte; requests/urllib3 would normalize it first."""
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.putrequest("GET", target, skip_accept_encoding=True)
    conn.endheaders()
    response = conn.getresponse()
    status, body = response.status, json.loads(response.read())
    conn.close()
    return status, body


def test_messages_go_to_messaging_with_method_query_body_and_headers(gateway, upstreams):
    orders, messaging = upstreams
    reply = requests.post(
        f"{gateway}/api/orders/ord_1/messages?after=msg_9&limit=5",
        json={"content": "hello"},
        headers={"Authorization": "Bearer tok", "X-Service-Token": "stolen", "X-Forwarded-For": "6.6.6.6"},
    )
    assert reply.status_code == 200
    seen = reply.json()
    assert seen["service"] == "messaging" and reply.headers["X-Upstream"] == "messaging"
    assert seen["method"] == "POST"
    assert seen["path"] == "/api/orders/ord_1/messages"
    assert seen["query"] == "after=msg_9&limit=5"
    assert json.loads(seen["body"]) == {"content": "hello"}
    assert seen["headers"]["Authorization"] == "Bearer tok"
    assert "X-Service-Token" not in seen["headers"]
    assert seen["headers"]["X-Forwarded-For"] == "127.0.0.1"
    assert seen["headers"]["X-Forwarded-Proto"] == "http"
    assert orders.received == []


def test_other_api_routes_go_to_orders(gateway, upstreams):
    orders, messaging = upstreams
    for path in ("/api/orders/ord_1", "/api/orders/ord_1/messagesx", "/api/agents/agt_1/orders", "/api/orders"):
        reply = requests.get(gateway + path)
        assert reply.json()["service"] == "orders", path
    assert orders.paths() == ["/api/orders/ord_1", "/api/orders/ord_1/messagesx",
                              "/api/agents/agt_1/orders", "/api/orders"]
    assert messaging.received == []


def test_dot_segments_are_resolved_before_routing(gateway, upstreams):
    orders, messaging = upstreams
    status, body = raw_get(gateway, "/api/orders/x/../ord_2/messages")
    assert (status, body["service"]) == (200, "messaging")
    assert messaging.paths() == ["/api/orders/ord_2/messages"]


def test_request_id_is_generated_forwarded_and_returned(gateway, upstreams):
    reply = requests.get(f"{gateway}/api/orders/ord_1")
    request_id = reply.headers["X-Request-ID"]
    assert len(request_id) == 32 and int(request_id, 16) >= 0
    assert reply.json()["headers"]["X-Request-Id"] == request_id

    reply = requests.get(f"{gateway}/api/orders/ord_1", headers={"X-Request-ID": "abc-123"})
    assert reply.headers["X-Request-ID"] == "abc-123"
    assert reply.json()["headers"]["X-Request-Id"] == "abc-123"


@pytest.mark.parametrize("target", [
    "/internal/orders/ord_1",
    "/INTERNAL/orders/ord_1",
    "/Internal;x/orders",
    "//internal/orders/ord_1",
    "/api/../internal/orders/ord_1",
    "/api/orders/ord_1/../../../internal/orders/ord_1",
    "/api/%2e%2e/internal/orders/ord_1",
    "/api/..%2Finternal/orders/ord_1",
    "/api/%252e%252e%252finternal/orders/ord_1",
    "/api%2F..%2F%69nternal/orders",
    "/api/..\\internal/orders",
    "/api/internal/orders/ord_1",
    "/api/orders/ord_1/messages/../../../../internal/x",
])
def test_internal_is_never_forwarded(gateway, upstreams, target):
    status, body = raw_get(gateway, target)
    assert status == 404
    assert body == {"success": False, "error": "Not found.", "code": "not_found", "details": {}}
    assert upstreams[0].received == [] and upstreams[1].received == []


def test_own_routes_and_unknown_paths(gateway, upstreams):
    assert requests.get(f"{gateway}/healthz").json() == {"success": True, "data": {"status": "ok"}}
    page = requests.get(f"{gateway}/")
    assert page.headers["Content-Type"].startswith("text/html") and "/api/openapi.json" in page.text
    missing = requests.get(f"{gateway}/nope")
    assert missing.status_code == 404 and missing.json()["code"] == "not_found"
    assert upstreams[0].received == [] and upstreams[1].received == []


def test_down_or_slow_upstream_is_503(upstreams):
    orders, messaging = upstreams
    url, server = serve(create_app(closed_port_url(), messaging.url))
    reply = requests.get(f"{url}/api/orders/ord_1")
    assert reply.status_code == 503
    assert reply.json() == {"success": False, "error": reply.json()["error"],
                            "code": "service_unavailable", "details": {}}
    assert reply.headers["X-Request-ID"]
    server.shutdown()

    url, server = serve(create_app(orders.url, messaging.url, read_timeout=0.3))
    started = time.monotonic()
    reply = requests.get(f"{url}/api/slow")
    assert reply.status_code == 503 and reply.json()["code"] == "service_unavailable"
    assert time.monotonic() - started < 1.5
    server.shutdown()


def test_openapi_merges_both_services(gateway, upstreams):
    doc = requests.get(f"{gateway}/api/openapi.json").json()
    assert set(doc["paths"]) == {"/api/orders", "/api/orders/{order_id}/messages"}
    assert doc["paths"]["/api/orders/{order_id}/messages"]["get"]["summary"] == "list messages"
    assert set(doc["components"]["schemas"]) == {"Order", "Error", "Message"}
    assert "x-from" not in doc["components"]["schemas"]["Error"]  # orders keeps the shared names


def test_openapi_without_messaging_still_has_orders(upstreams):
    orders, _ = upstreams
    url, server = serve(create_app(orders.url, closed_port_url()))
    reply = requests.get(f"{url}/api/openapi.json")
    assert reply.status_code == 200
    assert set(reply.json()["paths"]) == set(ORDERS_DOC["paths"])
    server.shutdown()


def test_event_stream_arrives_chunk_by_chunk(gateway, upstreams):
    _, messaging = upstreams
    with requests.get(f"{gateway}/api/orders/ord_1/messages/stream", stream=True, timeout=10) as reply:
        assert reply.headers["Content-Type"].startswith("text/event-stream")
        chunks = reply.iter_content(chunk_size=None)
        assert next(chunks) == b"data: first\n\n"
        messaging.stream_acknowledged.set()
        assert b"".join(chunks) == b"data: second\n\n"
    assert messaging.stream_result == {"client_had_first": True}
