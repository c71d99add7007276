"""The internal HTTP client: what a caller learns from each kind of answer or failure, since the
payouts worker decides from it whether a rail call may have moved money."""
from __future__ import annotations

import socket
import threading
import time

import pytest
from flask import Flask, jsonify, request

from shared import logs
from shared.internal import InternalClient, InternalError, Unavailable
from tests.support.net import ServedApp, free_port

TOKEN = "test-service-token"


@pytest.fixture
def served():
    app = Flask(__name__)
    seen = []

    @app.route("/internal/echo", methods=["GET", "POST"])
    def echo():
        seen.append({"token": request.headers.get("X-Service-Token"), "request_id": request.headers.get("X-Request-ID"),
                     "args": request.args.to_dict(), "body": request.get_json(silent=True)})
        return jsonify({"success": True, "data": {"ok": True}})

    @app.post("/internal/refused")
    def refused():
        return jsonify({"success": False, "code": "validation_error", "error": "No such wallet."}), 400

    @app.route("/internal/broken", methods=["GET", "POST"])
    def broken():
        return jsonify({"success": False, "code": "internal_error", "error": "boom"}), 500

    @app.get("/internal/html")
    def html():
        return "<html>a proxy's error page</html>", 200

    @app.post("/internal/slow")
    def slow():
        time.sleep(1.0)
        return jsonify({"success": True, "data": {"done": True}})

    server = ServedApp(app)
    yield server.url, seen
    server.close()


def test_a_call_carries_the_credential_the_request_id_the_query_and_the_body(served):
    url, seen = served
    client = InternalClient(url, TOKEN)
    token = logs.request_id.set("req-abc")
    try:
        assert client.get("/internal/echo", {"after": "k1", "limit": 5, "skipped": None}) == {"ok": True}
        assert client.post("/internal/echo", {"amount_usd": "40.50"}) == {"ok": True}
    finally:
        logs.request_id.reset(token)
    assert seen == [
        {"token": TOKEN, "request_id": "req-abc", "args": {"after": "k1", "limit": "5"}, "body": None},
        {"token": TOKEN, "request_id": "req-abc", "args": {}, "body": {"amount_usd": "40.50"}},
    ]


def test_a_refusal_is_an_internal_error_with_the_services_code_and_message(served):
    with pytest.raises(InternalError) as refused:
        InternalClient(served[0], TOKEN).post("/internal/refused", {})
    assert (refused.value.status, refused.value.code, refused.value.message) == (400, "validation_error",
                                                                                 "No such wallet.")


def test_a_server_error_may_have_done_a_post_but_not_a_get(served):
    client = InternalClient(served[0], TOKEN)
    with pytest.raises(Unavailable) as post:
        client.post("/internal/broken", {})
    with pytest.raises(Unavailable) as get:
        client.get("/internal/broken")
    assert post.value.ambiguous and not get.value.ambiguous


def test_an_answer_outside_the_envelope_is_unavailable(served):
    with pytest.raises(Unavailable):
        InternalClient(served[0], TOKEN).get("/internal/html")


def test_nothing_listening_certainly_did_nothing():
    with pytest.raises(Unavailable) as down:
        InternalClient(f"http://127.0.0.1:{free_port()}", TOKEN, timeout=2).post("/internal/echo", {})
    assert down.value.ambiguous is False


def test_a_post_whose_answer_times_out_may_have_been_carried_out(served):
    with pytest.raises(Unavailable) as late:
        InternalClient(served[0], TOKEN, timeout=0.2).post("/internal/slow", {})
    assert late.value.ambiguous is True


class KeepAliveServer:
    """Answers each request on a kept-alive connection, then closes it once `close_after` requests
    were answered on it: what a server does when an idle keep-alive connection times out."""

    def __init__(self, close_after: int):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.close_after, self.connections = close_after, 0
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                for _ in range(self.close_after):
                    request = b""
                    while b"\r\n\r\n" not in request:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        request += chunk
                    if not request:
                        break
                    body = b'{"success": true, "data": {"n": %d}}' % self.connections
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: keep-alive\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))

    def close(self) -> None:
        self.sock.close()


def test_a_connection_the_server_closed_while_idle_is_replaced_not_reported_as_a_failure():
    server = KeepAliveServer(close_after=1)
    try:
        client = InternalClient(server.url, TOKEN, timeout=2)
        assert client.get("/internal/x") == {"n": 1}
        time.sleep(0.1)  # the server has closed that connection by now
        assert client.get("/internal/x") == {"n": 2}
    finally:
        server.close()


def test_calls_reuse_one_kept_alive_connection():
    server = KeepAliveServer(close_after=100)
    try:
        client = InternalClient(server.url, TOKEN, timeout=2)
        assert [client.get("/internal/x") for _ in range(5)] == [{"n": 1}] * 5
        assert server.connections == 1
    finally:
        server.close()


def test_messaging_asks_for_an_agent_by_key_in_a_header_never_in_the_url():
    from services.messaging.access import OrdersClient

    app = Flask(__name__)
    asked = []

    @app.get("/internal/agents/by-key")
    def by_key():
        asked.append((request.full_path, request.headers.get("X-Agent-Key"), request.headers.get("X-Service-Token")))
        if request.headers.get("X-Agent-Key") == "atl_" + "k" * 30:
            return jsonify({"success": True, "data": {"id": "agt_1"}})
        return jsonify({"success": False, "code": "not_found", "error": "No such agent."}), 404

    server = ServedApp(app)
    try:
        client = OrdersClient(server.url, TOKEN)
        assert client.agent_for_key("atl_" + "k" * 30) == "agt_1"
        assert client.agent_for_key("atl_" + "x" * 30) is None
    finally:
        server.close()
    assert [(path, token) for path, _, token in asked] == [("/internal/agents/by-key?", TOKEN)] * 2
    assert [key for _, key, _ in asked] == ["atl_" + "k" * 30, "atl_" + "x" * 30]
