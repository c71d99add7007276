"""Agent-supplied image URLs are fetched only from public addresses, with size and time limits
(DESIGN.md §5). Local test servers on 127.0.0.1 stand in for the internet: they are reachable only
because a test puts them in `media_fetch_allowed_hosts`."""
from __future__ import annotations

import datetime as dt
import io
import ipaddress
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from PIL import Image

from services.media import fetch
from services.media.fetch import FetchRefused, fetch_image
from shared import netguard
from shared.netguard import not_public
from shared.settings import load


def png_bytes() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(out, "PNG")
    return out.getvalue()


PNG = png_bytes()


# --- a local server whose routes a test sets ---------------------------------------------------------

def body(data: bytes, content_type: str = "image/png", status: int = 200):
    def send(handler):
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)
    return send


def redirect(location: str, status: int = 302):
    def send(handler):
        handler.send_response(status)
        handler.send_header("Location", location)
        handler.send_header("Content-Length", "0")
        handler.end_headers()
    return send


def declared(length: int):
    """Says the body is `length` bytes long, sends a little of it."""
    def send(handler):
        handler.send_response(200)
        handler.send_header("Content-Type", "image/png")
        handler.send_header("Content-Length", str(length))
        handler.end_headers()
        handler.wfile.write(PNG)
    return send


def chunked(total: int, size: int = 8192):
    """A chunked body with no length up front, growing to `total` bytes."""
    def send(handler):
        handler.send_response(200)
        handler.send_header("Content-Type", "image/png")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        for _ in range(total // size):
            handler.wfile.write(b"%x\r\n" % size + b"\x89" * size + b"\r\n")
        handler.wfile.write(b"0\r\n\r\n")
    return send


def slow(delay: float):
    def send(handler):
        time.sleep(delay)
        body(PNG)(handler)
    return send


def drip(handler):
    """Headers at once, then a byte every 50 ms: each read is quick, the whole is endless."""
    handler.send_response(200)
    handler.send_header("Content-Length", "100000")
    handler.end_headers()
    for _ in range(200):
        handler.wfile.write(b"\x89")
        handler.wfile.flush()
        time.sleep(0.05)


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # clients that refuse the certificate or hang up early are what some tests do


class Server:
    """A threaded HTTP(S) server on 127.0.0.1 that records each request's path and Host header."""

    def __init__(self, routes: dict, tls: ssl.SSLContext | None = None):
        self.routes, self.hits = routes, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 10

            def do_GET(self):
                server.hits.append((self.path, self.headers.get("Host")))
                try:
                    server.routes.get(self.path, body(b"not found", "text/plain", 404))(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the fetcher hung up on purpose

            def log_message(self, *args):
                pass

        self.httpd = QuietServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            # the handshake in the request's thread, so one stuck client cannot stall the server
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True, do_handshake_on_connect=False)
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def other():
    """A second server, on a port nobody allowed."""
    server = Server({"/secret": body(b"internal data", "text/plain")})
    yield server
    server.close()


@pytest.fixture(scope="module")
def server(other):
    server = Server({
        "/image.png": body(PNG),
        "/caf%C3%A9%20photo.png?size=full": body(PNG),
        "/to-private": redirect("http://10.0.0.1/x"),
        "/to-other-port": redirect(f"http://127.0.0.1:{other.port}/secret"),
        "/to-loopback-v6": redirect("http://[::1]/"),
        "/to-metadata": redirect("http://169.254.169.254/latest/meta-data/"),
        "/loop": redirect("/loop"),
        "/hop": redirect("/image.png", 301),
        "/declared-big": declared(10_000_000),
        "/chunked-big": chunked(1_000_000),
        "/slow": slow(3.0),
        "/drip": drip,
    })
    yield server
    server.close()


@pytest.fixture
def settings(server):
    return load({}, media_fetch_allowed_hosts=(f"127.0.0.1:{server.port}",), media_fetch_max_bytes=100_000,
                media_fetch_timeout_seconds=1.0)


def answers(table: dict):
    """A getaddrinfo that knows only `table` (name → addresses) and counts its calls."""
    def resolve(host, port, family=0, type=0, proto=0, flags=0):
        resolve.calls.append(host)
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
                for a in table[host]]
    resolve.calls = []
    return resolve


@pytest.fixture
def connects(monkeypatch):
    """Every address a socket is opened to."""
    seen, real = [], socket.create_connection

    def recording(address, *args, **kwargs):
        seen.append(address)
        return real(address, *args, **kwargs)
    monkeypatch.setattr(socket, "create_connection", recording)
    return seen


# --- what is fetched ------------------------------------------------------------------------------

def test_an_image_is_fetched(server, settings):
    dest = io.BytesIO()
    assert fetch_image(f"{server.url}/image.png", dest, settings) == f"{server.url}/image.png"
    assert dest.getvalue() == PNG


def test_a_path_with_spaces_and_accents_is_sent_escaped(server, settings):
    dest = io.BytesIO()
    fetch_image(f"{server.url}/café photo.png?size=full", dest, settings)
    assert dest.getvalue() == PNG


def test_a_redirect_is_followed_and_the_final_url_returned(server, settings):
    dest = io.BytesIO()
    assert fetch_image(f"{server.url}/hop", dest, settings) == f"{server.url}/image.png"
    assert dest.getvalue() == PNG


def test_the_checked_address_is_the_one_connected_to(server, settings, connects):
    """One lookup per hop; the socket goes to its answer; the server sees the name as Host."""
    name = f"images.example:{server.port}"
    resolve = answers({"images.example": ["127.0.0.1"]})
    fetch_image(f"http://{name}/image.png", io.BytesIO(), settings.replace(media_fetch_allowed_hosts=(name,)),
                resolve=resolve)
    assert resolve.calls == ["images.example"]
    assert connects == [("127.0.0.1", server.port)]
    assert server.hits[-1] == ("/image.png", name)


# --- refused before any connection ------------------------------------------------------------------

@pytest.mark.parametrize("url,reason", [
    ("http://127.0.0.1/x", "loopback"),
    ("http://10.0.0.1/x", "private"),
    ("http://192.168.1.20:8080/x", "private"),
    ("http://169.254.169.254/latest/meta-data/", "metadata"),
    ("http://100.100.100.200/latest/meta-data/", "metadata"),
    ("http://[fd00:ec2::254]/latest/meta-data/", "metadata"),
    ("http://[::1]/x", "loopback"),
    ("http://[::ffff:127.0.0.1]/x", "loopback"),
    ("http://0.0.0.0/x", "unspecified"),
    ("http://224.0.0.1/x", "multicast"),
    ("http://100.64.3.4/x", "shared"),
    ("https://[fe80::1]/x", "link-local"),
])
def test_an_internal_address_is_refused_without_connecting(url, reason, settings, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("a connection was attempted")
    monkeypatch.setattr(socket, "create_connection", never)
    with pytest.raises(FetchRefused, match=reason) as refused:
        fetch_image(url, io.BytesIO(), settings, resolve=never)
    assert "only public addresses" in str(refused.value)


def test_a_live_local_server_not_allowed_is_refused_and_never_reached(other, settings):
    with pytest.raises(FetchRefused, match="loopback"):
        fetch_image(f"{other.url}/secret", io.BytesIO(), settings)
    assert other.hits == []


@pytest.mark.parametrize("addresses", [["10.0.0.5"], ["93.184.216.34", "10.0.0.5"], ["fd12::7"]],
                         ids=["private", "one-private-among-public", "unique-local-v6"])
def test_a_name_resolving_to_a_private_address_is_refused(addresses, settings, monkeypatch):
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("connected"))
    resolve = answers({"images.example": addresses})
    with pytest.raises(FetchRefused, match="images.example resolves to .*private"):
        fetch_image("https://images.example/cat.png", io.BytesIO(), settings, resolve=resolve)


def test_a_numeric_host_is_resolved_before_the_check(settings, monkeypatch):
    """2130706433 is 127.0.0.1 to the resolver, whatever it looks like."""
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("connected"))
    with pytest.raises(FetchRefused, match="127.0.0.1, a loopback"):
        fetch_image("http://2130706433/x", io.BytesIO(), settings)


def test_an_unknown_host_is_refused(settings):
    with pytest.raises(FetchRefused, match="could not be resolved"):
        fetch_image("http://nowhere.example/x", io.BytesIO(), settings, resolve=answers({}))


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.com/a.png", "gopher://x/", "//example.com/a",
                                 "http://user:secret@example.com/a.png", "http:///a.png"])
def test_other_schemes_credentials_and_hostless_urls_are_refused(url, settings):
    with pytest.raises(FetchRefused):
        fetch_image(url, io.BytesIO(), settings, resolve=answers({"example.com": ["93.184.216.34"]}))


# --- redirects re-checked at every hop ---------------------------------------------------------------

@pytest.mark.parametrize("path,reason", [("/to-private", "private"), ("/to-loopback-v6", "loopback"),
                                         ("/to-metadata", "metadata")])
def test_a_redirect_to_an_internal_address_is_refused(path, reason, server, settings, connects):
    with pytest.raises(FetchRefused, match=reason):
        fetch_image(f"{server.url}{path}", io.BytesIO(), settings)
    assert connects == [("127.0.0.1", server.port)]


def test_a_redirect_to_another_local_port_is_refused(server, other, settings):
    with pytest.raises(FetchRefused, match="loopback"):
        fetch_image(f"{server.url}/to-other-port", io.BytesIO(), settings)
    assert other.hits == []


def test_endless_redirects_are_refused(server, settings):
    before = len(server.hits)
    with pytest.raises(FetchRefused, match="redirected more than 5 times"):
        fetch_image(f"{server.url}/loop", io.BytesIO(), settings)
    assert len(server.hits) - before == 6


# --- size, time and status ---------------------------------------------------------------------------

def test_a_declared_length_over_the_cap_is_refused_before_reading(server, settings):
    dest = io.BytesIO()
    with pytest.raises(FetchRefused, match="10,000,000 bytes; the limit is 100,000"):
        fetch_image(f"{server.url}/declared-big", dest, settings)
    assert dest.getvalue() == b""


def test_a_chunked_body_growing_past_the_cap_is_cut_off(server, settings):
    dest = io.BytesIO()
    with pytest.raises(FetchRefused, match="larger than the limit of 100,000 bytes"):
        fetch_image(f"{server.url}/chunked-big", dest, settings)
    assert len(dest.getvalue()) <= 100_000


def test_a_slow_server_times_out(server, settings):
    started = time.monotonic()
    with pytest.raises(FetchRefused, match="did not answer in time|took longer"):
        fetch_image(f"{server.url}/slow", io.BytesIO(), settings)
    assert time.monotonic() - started < 2.0


def test_a_trickle_cannot_outlast_the_overall_deadline(server, settings):
    started = time.monotonic()
    with pytest.raises(FetchRefused, match="did not answer in time|took longer"):
        fetch_image(f"{server.url}/drip", io.BytesIO(), settings)
    assert time.monotonic() - started < 1.5


def test_a_404_is_refused_with_its_status(server, settings):
    with pytest.raises(FetchRefused, match="answered HTTP 404"):
        fetch_image(f"{server.url}/missing.png", io.BytesIO(), settings)


def test_a_closed_port_is_refused(settings):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(FetchRefused, match="Could not connect"):
        fetch_image(f"http://127.0.0.1:{port}/", io.BytesIO(),
                    settings.replace(media_fetch_allowed_hosts=("127.0.0.1",)))


# --- TLS to a pinned address --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    """An HTTPS server with a certificate for images.example from a CA of the test's own, and
    the SNI names its clients sent."""
    folder = tmp_path_factory.mktemp("tls")
    now = dt.datetime.now(dt.timezone.utc)

    def certificate(subject, issuer, key, signer, ca: bool):
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
                   .not_valid_after(now + dt.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName("images.example")]), False)
        return builder.sign(signer, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = certificate(ca_name, ca_name, ca_key, ca_key, True)
    leaf = certificate(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "images.example")]), ca_name, key,
                       ca_key, False)
    (folder / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (folder / "leaf.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(folder / "leaf.pem")
    names = []
    context.sni_callback = lambda sock, name, ctx: names.append(name)
    server = Server({"/image.png": body(PNG)}, tls=context)
    server.ca, server.sni = str(folder / "ca.pem"), names
    yield server
    server.close()


@pytest.fixture
def trusting(tls_server, monkeypatch):
    """The fetcher trusts the test's CA (and only it)."""
    monkeypatch.setattr(netguard, "_tls", lambda: ssl.create_default_context(cafile=tls_server.ca))


def https_settings(tls_server, settings, name="images.example"):
    return settings.replace(media_fetch_allowed_hosts=(f"{name}:{tls_server.port}",))


def test_https_to_a_pinned_address_sends_the_name_for_sni_and_host(tls_server, settings, trusting, connects):
    url = f"https://images.example:{tls_server.port}/image.png"
    dest = io.BytesIO()
    fetch_image(url, dest, https_settings(tls_server, settings), resolve=answers({"images.example": ["127.0.0.1"]}))
    assert dest.getvalue() == PNG
    assert connects == [("127.0.0.1", tls_server.port)]
    assert tls_server.sni[-1] == "images.example"
    assert tls_server.hits[-1] == ("/image.png", f"images.example:{tls_server.port}")


def test_a_certificate_for_another_name_is_refused(tls_server, settings, trusting):
    url = f"https://cdn.example:{tls_server.port}/image.png"
    with pytest.raises(FetchRefused, match="TLS"):
        fetch_image(url, io.BytesIO(), https_settings(tls_server, settings, "cdn.example"),
                    resolve=answers({"cdn.example": ["127.0.0.1"]}))


def test_an_untrusted_certificate_is_refused(tls_server, settings):
    url = f"https://images.example:{tls_server.port}/image.png"
    with pytest.raises(FetchRefused, match="certificate verify failed"):
        fetch_image(url, io.BytesIO(), https_settings(tls_server, settings),
                    resolve=answers({"images.example": ["127.0.0.1"]}))


# --- the address rules ------------------------------------------------------------------------------------

@pytest.mark.parametrize("address,public", [
    ("93.184.216.34", True), ("8.8.8.8", True), ("2606:4700:4700::1111", True),
    ("127.0.0.2", False), ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.0.1", False),
    ("169.254.1.1", False), ("100.64.0.1", False), ("100.127.255.254", False), ("240.0.0.1", False),
    ("255.255.255.255", False), ("224.0.0.251", False), ("0.0.0.0", False),
    ("::", False), ("::1", False), ("fc00::1", False), ("fe80::1", False), ("ff02::1", False),
    ("::ffff:10.0.0.1", False), ("::ffff:8.8.8.8", True),
    ("64:ff9b::a00:1", False),  # NAT64 of 10.0.0.1
    ("2002:a00:1::", False),  # 6to4 of 10.0.0.1
])
def test_which_addresses_are_public(address, public):
    assert (not_public(ipaddress.ip_address(address)) is None) == public
