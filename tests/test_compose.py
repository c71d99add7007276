"""docker-compose.yml and deploy/nginx.conf run what services/processes.py declares."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
from services.processes import PROCESSES, Process

SERVICES = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
NGINX = (ROOT / "deploy" / "nginx.conf").read_text()
NOT_PYTHON = {"postgres", "redis", "gateway"}
ONE_SHOT_OR_HELPER = {"migrate", "openapi"}  # Python services that are not in the process table
PYTHON_SERVICES = sorted(set(SERVICES) - NOT_PYTHON)


def argv_of(command) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else [str(a) for a in command]


def option(args: list[str], *names: str) -> str | None:
    for i, arg in enumerate(args):
        if arg in names:
            return args[i + 1]
        for name in names:
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def signature(argv) -> dict:
    """What must agree between the table and compose: program, app module, role, queue, port."""
    args = argv_of(argv)
    assert args[1] == "-m", f"expected `<python> -m <program> ...`, got {args}"
    program, rest = args[2], args[3:]
    if program == "gunicorn":
        host, _, port = option(rest, "--bind", "-b").rpartition(":")
        return {"program": program, "app": rest[-1], "port": int(port), "host": host}
    if program == "celery":
        app = option(rest, "-A", "--app")
        role = rest[rest.index(app) + 1]
        return {"program": program, "app": app, "role": role, "queue": option(rest, "-Q", "--queues")}
    return {"program": program, "args": rest}


def nginx_locations() -> list[tuple[str, str, str]]:
    """(modifier, pattern, body) of every location, in file order; the config nests no blocks in them."""
    found = re.findall(r'location\s+(=|~\*|~|\^~)?\s*("[^"]+"|\S+)\s*\{(.*?)\n\s*\}', NGINX, re.S)
    return [(modifier, pattern.strip('"'), body) for modifier, pattern, body in found]


def nginx_route(uri: str) -> str:
    """Where nginx sends an already normalized URI: the upstream name, or the returned status."""
    locations = nginx_locations()
    for modifier, pattern, body in locations:
        if modifier == "=" and pattern == uri:
            return _target(body)
    prefixes = [(p, m, b) for m, p, b in locations if m in ("", "^~") and uri.startswith(p)]
    longest = max(prefixes, key=lambda item: len(item[0]), default=None)
    if longest is None or longest[1] != "^~":
        for modifier, pattern, body in locations:  # nginx: the first matching regex wins
            if modifier in ("~", "~*") and re.search(pattern, uri, re.I if modifier == "~*" else 0):
                return _target(body)
    assert longest, f"no nginx location for {uri}"
    return _target(longest[2])


def _target(body: str) -> str:
    proxied = re.search(r"proxy_pass\s+http://([\w-]+)", body)
    if proxied:
        return proxied.group(1)
    returned = re.search(r"return\s+(\d+)", body)
    return returned.group(1) if returned else "static"


def nginx_upstream(name: str) -> str:
    return re.search(rf"upstream\s+{name}\s*\{{\s*server\s+([\w.:-]+);", NGINX).group(1)


def process(name: str) -> Process:
    return next(p for p in PROCESSES if p.name == name)


@pytest.mark.parametrize("entry", [p for p in PROCESSES if p.kind != "gateway"], ids=lambda p: p.name)
def test_every_process_runs_in_compose_with_the_same_command(entry):
    assert entry.name in SERVICES, f"process {entry.name!r} has no service in docker-compose.yml"
    expected, actual = signature(entry.argv), signature(SERVICES[entry.name]["command"])
    if expected["program"] == "gunicorn":
        assert expected.pop("host") == "127.0.0.1" and actual.pop("host") == "0.0.0.0"
    assert actual == expected


def test_compose_runs_no_python_process_missing_from_the_table():
    table = {p.name for p in PROCESSES}
    assert set(PYTHON_SERVICES) - ONE_SHOT_OR_HELPER <= table


@pytest.mark.parametrize("name", PYTHON_SERVICES)
def test_python_services_share_one_image_and_wait_for_migrations(name):
    service, orders = SERVICES[name], SERVICES["orders"]
    assert service["build"] in (".", {"context": "."}) and service["image"] == orders["image"]
    assert argv_of(service["command"])[0] == "python"
    depends = service["depends_on"]
    assert depends["postgres"]["condition"] == "service_healthy"
    if name != "migrate":
        assert "redis" in depends
        assert depends["migrate"]["condition"] == "service_completed_successfully"
        assert service["environment"]["DATABASE_URL"].startswith("postgresql+psycopg://")
        assert service["environment"]["REDIS_URL"] == "redis://redis:6379/0"


def test_migrate_runs_every_services_migrations():
    assert argv_of(SERVICES["migrate"]["command"])[1:] == ["-m", "services.migrate"]


def test_orders_and_the_media_worker_share_the_file_store():
    """The media worker writes previews the orders service serves: one volume, one MEDIA_ROOT."""
    for name in ("orders", "worker-media"):
        service = SERVICES[name]
        root = service["environment"]["MEDIA_ROOT"]
        assert any(v == f"media:{root}" for v in service["volumes"]), (name, service["volumes"])
    assert "media" in yaml.safe_load((ROOT / "docker-compose.yml").read_text())["volumes"]


def test_postgres_is_healthchecked_and_persistent():
    postgres = SERVICES["postgres"]
    assert postgres["image"].startswith("postgres:16")
    assert "pg_isready" in " ".join(argv_of(postgres["healthcheck"]["test"]))
    assert any(v.endswith(":/var/lib/postgresql/data") for v in postgres["volumes"])


def test_gateway_is_nginx_with_the_repo_config_on_8080():
    gateway = SERVICES["gateway"]
    assert gateway["image"].startswith("nginx:")
    assert "8080:8080" in [str(p) for p in gateway["ports"]]
    assert "./deploy/nginx.conf:/etc/nginx/nginx.conf:ro" in gateway["volumes"]
    assert re.search(r"listen\s+8080;", NGINX)


@pytest.mark.parametrize("uri, target", [
    ("/internal/orders/ord_1", "404"),
    ("/INTERNAL/orders/ord_1", "404"),
    ("/api/internal/orders", "404"),
    ("/api/orders/ord_1/messages", "messaging"),
    ("/api/orders/ord_1/messages/stream", "messaging"),
    ("/api/orders/ord_1/messages/internal", "404"),
    ("/api/orders/ord_1", "orders"),
    ("/api/orders/ord_1/messagesx", "orders"),
    ("/api/services", "orders"),
    ("/api/openapi.json", "openapi"),
    ("/healthz", "200"),
    ("/", "static"),
    ("/elsewhere", "404"),
])
def test_nginx_routes_like_the_python_gateway(uri, target):
    assert nginx_route(uri) == target


def test_nginx_upstreams_are_the_compose_services():
    for name in ("orders", "messaging"):
        assert nginx_upstream(name) == f"{name}:{process(name).port}"
    host, _, port = nginx_upstream("openapi").partition(":")
    merger = signature(SERVICES[host]["command"])
    assert (merger["app"], merger["port"]) == ("services.gateway.wsgi:app", int(port))


def test_nginx_streams_messages_and_never_forwards_the_service_token():
    messages = next(body for _, pattern, body in nginx_locations() if "messages" in pattern)
    assert re.search(r"proxy_buffering\s+off;", messages)
    assert re.search(r'proxy_set_header\s+X-Service-Token\s+"";', NGINX)
    internal = next(body for _, pattern, body in nginx_locations() if "internal" in pattern)
    assert '"code": "not_found"' in internal
