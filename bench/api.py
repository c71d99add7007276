"""API throughput of the orders service against a Flask hello-world baseline (`make bench`).

Starts three gunicorn servers with identical settings (bench/hello.py, services.orders.wsgi:app
and bench/floor.py) on a fresh PostgreSQL database and a Redis database, seeds orders through the
HTTP API (and the floor's own orders in its own tables, in SQL), then measures requests/s with a
small keep-alive load generator in this process, in interleaved rounds, and prints medians and the
ratios to the baseline against their targets.

The floor (bench/floor.py) is the least any approve must do in this stack: a session cache hit,
the JSON body, one durable transaction of the four writes an approve needs (order, timeline,
outbox event, agent counter) on raw psycopg in one round trip (by default one statement;
BENCH_FLOOR_MODE selects the slower variants), one Redis LPUSH of the event, a small JSON answer.
Two more ratios compare it: floor / hello POST (what the best possible approve could reach,
against the approve target) and approve / floor (how far the real approve is from it).

It reports, it does not gate: exit 0 whether or not a target is met, 1 if any request errored
(a non-2xx answer or a broken connection), 2 if the setup failed.

Settings (environment): BENCH_DATABASE_URL (default postgresql://postgres@127.0.0.1:5432/
orderdesk_bench; dropped and migrated fresh each run), BENCH_REDIS_URL (default
redis://127.0.0.1:6379/15; flushed each run), LOG_LEVEL (the orders service's, default INFO),
BENCH_FLOOR_MODE (the floor's transaction: cte, the default, pipeline or statements).
"""
from __future__ import annotations

import argparse
import http.client
import itertools
import json
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.net import free_port  # noqa: E402  (one picker: never the same port twice)

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/orderdesk_bench"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/15"
# The one server configuration every app gets.
GUNICORN = ("--workers", "2", "--worker-class", "gthread", "--threads", "4", "--log-level", "warning",
            "--no-control-socket")  # no gunicornc here, and no taking the user's default control socket
TARGETS = {"get": 0.5, "approve": 0.25}  # orders figure ≥ this × its hello figure


class SetupError(Exception):
    pass


# --- servers -------------------------------------------------------------------------------

class Proc:
    """One process in its own session, output to a log; stop() ends its whole group."""

    def __init__(self, name: str, argv: list[str], env: dict, logdir: Path, health_url: str | None = None):
        self.name, self.argv, self.env, self.health_url = name, argv, env, health_url
        self.log = logdir / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "wb") as log_file:
            self.proc = subprocess.Popen(self.argv, cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL,
                                         stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)

    def check(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise SetupError(f"{self.name} exited with {self.proc.returncode}; see {self.log}")

    def wait_ready(self, timeout: float = 60) -> None:
        if not self.health_url:
            return
        parts = urlsplit(self.health_url)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check()
            try:
                conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=2)
                conn.request("GET", parts.path)
                status = conn.getresponse().status
                conn.close()
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise SetupError(f"{self.name} not ready after {timeout:.0f} s; see {self.log}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # graceful: gunicorn's master and Celery stop their children
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                pass
        try:  # its own session's group: children it failed to reap
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            pass


class Server(Proc):
    """One gunicorn master serving `app` on a free port, with the bench's gunicorn settings."""

    def __init__(self, name: str, app: str, env: dict, logdir: Path, ready_path: str):
        self.port = free_port()
        argv = [sys.executable, "-m", "gunicorn", *GUNICORN, "--bind", f"127.0.0.1:{self.port}",
                "--chdir", str(ROOT), app]  # no --access-logfile: gunicorn's access log is off
        super().__init__(name, argv, env, logdir, f"http://127.0.0.1:{self.port}{ready_path}")


# --- storage -------------------------------------------------------------------------------

def fresh_database(url: str, env: dict) -> None:
    """Drop and create the bench database, then build every service's tables with the migrations."""
    import psycopg
    from psycopg import sql

    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    if not name or name in ("postgres", "template0", "template1"):
        raise SetupError(f"BENCH_DATABASE_URL must name a database of its own, not {name!r}")
    admin_url = urlunsplit((parts.scheme.split("+")[0], parts.netloc, "/postgres", parts.query, ""))
    try:
        with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    except psycopg.Error as exc:
        raise SetupError(f"cannot recreate database {name!r} at {parts.hostname}: {exc}") from exc
    done = subprocess.run([sys.executable, "-m", "services.migrate"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if done.returncode:
        raise SetupError(f"migrate failed:\n{done.stdout}{done.stderr}")


def plain(url: str) -> str:
    """A libpq URL (no SQLAlchemy driver suffix) for psycopg."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme.split("+")[0], *parts[1:]))


def vacuum_analyze(url: str) -> None:
    import psycopg
    with psycopg.connect(plain(url), autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")


class Reader:
    """The bench's own autocommit connection, reading what the services wrote; a bench's `Tables`
    subclasses it with its queries."""

    def __init__(self, url: str):
        import psycopg
        self.conn = psycopg.connect(plain(url), autocommit=True)

    def close(self) -> None:
        self.conn.close()


def flush_redis(url: str) -> None:
    import redis
    try:
        redis.Redis.from_url(url, socket_timeout=5).flushdb()
    except redis.RedisError as exc:
        raise SetupError(f"cannot reach Redis at {url}: {exc}") from exc


# --- seeding through the API -----------------------------------------------------------------

class Api:
    """JSON over one keep-alive http.client connection per thread."""

    def __init__(self, port: int):
        self.port = port
        self.local = threading.local()

    def call(self, method: str, path: str, token: str | None = None, body=None, expect=(200, 201)):
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = self.local.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, path, body=payload, headers=headers)
            response = conn.getresponse()
            raw = response.read()
        except (OSError, http.client.HTTPException):
            conn.close()
            self.local.conn = None
            raise
        if response.status not in expect:
            raise SetupError(f"seeding: {method} {path} answered {response.status}: {raw[:300]!r}")
        return json.loads(raw)["data"]


class Seeder:
    """An agent, a fixed-price service and a buyer session; then orders walked to `delivered`.
    With `payout_wallet`, the agent gets a Solana payout wallet (else its payouts are `blocked`)."""

    def __init__(self, port: int, payout_wallet: bool = False):
        from tests.support.wallets import SolanaWallet

        self.api = api = Api(port)
        agent = {"name": "Bench Agent"}
        if payout_wallet:
            agent.update(payout_wallet=SolanaWallet.generate().address, payout_chain="solana")
        self.agent = api.call("POST", "/api/agents", body=agent)["api_key"]
        self.service = api.call("POST", "/api/services", self.agent, body={
            "title": "Poster", "description": "A poster.", "price_type": "fixed", "price_usd": "45.00"})
        self.wallet = wallet = SolanaWallet.generate()
        challenge = api.call("POST", "/api/auth/challenge", body={"wallet": wallet.address, "chain": "solana"})
        self.buyer = api.call("POST", "/api/auth/session", body={
            "wallet": wallet.address, "chain": "solana", "nonce": challenge["nonce"],
            "signature": wallet.sign(challenge["message"])})["token"]
        self.payment: dict = {}

    # The steps of an order, each through `api` (default: the seeder's own connections).
    def create(self, api: Api | None = None, brief: str = "Bench order.") -> str:
        return (api or self.api).call("POST", "/api/orders", self.buyer,
                                      {"service_id": self.service["id"], "brief": brief})["id"]

    def pay(self, oid: str, api: Api | None = None) -> dict:
        """A sandbox transfer from the buyer's wallet, then `PATCH pay`; returns the order."""
        api = api or self.api
        if not self.payment:  # the same for every order of this service and buyer
            self.payment.update(api.call("GET", f"/api/orders/{oid}/payment", self.buyer))
        pay = self.payment
        tx = api.call("POST", "/api/sandbox/transfers", body={
            "from_wallet": self.wallet.address, "to": pay["destination"], "amount_usd": pay["amount_usd"],
            "asset": pay["asset"], "chain": pay["chain"]})["tx_hash"]
        return api.call("PATCH", f"/api/orders/{oid}", self.buyer, {"action": "pay", "escrow_tx_hash": tx})

    def deliver(self, oid: str, api: Api | None = None) -> dict:
        return (api or self.api).call("POST", f"/api/orders/{oid}/deliver", self.agent, {
            "deliverables": [{"url": "https://example.com/result", "media_type": "link"}]})

    def one(self, _i=None) -> str:
        oid = self.create()
        self.pay(oid)
        order = self.deliver(oid)
        if order["status"] != "delivered":
            raise SetupError(f"seeding: order {oid} is {order['status']}, not delivered")
        return oid

    def orders(self, n: int, threads: int = 4) -> list[str]:
        log(f"seeding {n} delivered orders through the API ...")
        ids: list[str] = []
        if not self.payment and n:
            ids.append(self.one())  # fills `payment` before the threads start
        started = time.monotonic()
        pool = ThreadPoolExecutor(threads)
        try:
            for oid in pool.map(self.one, range(n - len(ids))):
                ids.append(oid)
                if len(ids) % 250 == 0:
                    log(f"  {len(ids)}/{n} ({len(ids) / (time.monotonic() - started):.1f} orders/s)")
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # on a failure, start no more orders
        log(f"  seeded {n} in {time.monotonic() - started:.0f} s")
        return ids


# --- load generator --------------------------------------------------------------------------

class Conn:
    """A lean HTTP/1.1 keep-alive client: send prepared bytes, read one Content-Length response.
    Cheaper per request than http.client, so the client takes less of the shared CPU."""

    def __init__(self, port: int):
        self.port = port
        self.sock: socket.socket | None = None
        self.buf = b""

    def connect(self) -> None:
        self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def request(self, data: bytes) -> tuple[int, bytes]:
        if self.sock is None:
            self.connect()
        self.sock.sendall(data)
        buf = self.buf
        while (end := buf.find(b"\r\n\r\n")) < 0:
            buf += self._recv()
        head, body = buf[:end + 2].lower(), buf[end + 4:]
        status = int(head[9:12])
        at = head.find(b"\r\ncontent-length:")
        if at < 0:
            raise ConnectionError("response without Content-Length")
        length = int(head[at + 17:head.index(b"\r\n", at + 2)])
        while len(body) < length:
            body += self._recv()
        self.buf = body[length:]
        if b"\r\nconnection: close\r\n" in head:
            self.close()
        return status, body[:length]

    def _recv(self) -> bytes:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed by the server")
        return chunk


def http_request(method: str, path: str, port: int, token: str, body: bytes | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", f"Authorization: Bearer {token}"]
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


def what(data: bytes) -> str:
    return b" ".join(data.split(b" ", 2)[:2]).decode(errors="replace")


class Errors:
    def __init__(self):
        self.count = 0
        self.samples: list[str] = []
        self.lock = threading.Lock()

    def add(self, what: str) -> None:
        with self.lock:
            self.count += 1
            if len(self.samples) < 5:
                self.samples.append(what)

    def print(self, what: str = "") -> None:
        """The report's last lines: the count and a few samples, or that there were none."""
        if self.count:
            print(f"ERRORS: {self.count}{what}, e.g.:")
            for sample in self.samples:
                print(f"  {sample}")
        else:
            print("errors: none")


def measure(port: int, requests, connections: int, duration: float, errors: Errors) -> tuple[float, float]:
    """(requests/s of 2xx answers, seconds) over `connections` keep-alive connections, for
    `duration` seconds. `requests` is a list (each connection cycles through it) or an iterator
    shared by all connections (each request sent once; the run also ends when it is exhausted)."""
    shared = not isinstance(requests, list)
    lock = threading.Lock()
    barrier = threading.Barrier(connections + 1)
    counts = [0] * connections
    ends = [0.0] * connections
    state = {"deadline": float("inf"), "stop": False}

    def next_shared():
        with lock:
            return next(requests, None)

    def run(k: int) -> None:
        conn = Conn(port)
        own = itertools.cycle(requests[k % len(requests):] + requests[:k % len(requests)]) if not shared else None
        try:
            conn.connect()
        except OSError as exc:
            errors.add(f"connect: {exc}")
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            return
        n = 0
        deadline = state["deadline"]
        try:
            while not state["stop"] and time.perf_counter() < deadline:
                data = next_shared() if shared else next(own)
                if data is None:
                    break
                try:
                    status, body = conn.request(data)
                except (OSError, ValueError) as exc:
                    errors.add(f"{what(data)}: {exc!r}")
                    conn.close()
                    continue
                if 200 <= status < 300:
                    n += 1
                else:
                    errors.add(f"{what(data)}: {status} {body[:160].decode(errors='replace')!r}")
        except Exception as exc:  # a bug here must not pass for a slow server
            errors.add(f"load generator: {exc!r}")
        finally:
            counts[k] = n
            ends[k] = time.perf_counter()
            conn.close()

    threads = [threading.Thread(target=run, args=(k,), daemon=True) for k in range(connections)]
    for t in threads:
        t.start()
    try:
        started = time.perf_counter()
        state["deadline"] = started + duration
        barrier.wait()
        for t in threads:
            t.join()
    except BaseException:
        state["stop"] = True
        barrier.abort()
        raise
    elapsed = max(ends) - started
    return sum(counts) / elapsed, elapsed


# --- the run ---------------------------------------------------------------------------------

def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable), {model}"


def loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


def pct(values: list[float], p: float) -> float:
    """The nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


# --- the frame every bench runs in -------------------------------------------------------------

def bench_urls(default_database_url: str, default_redis_url: str) -> tuple[str, str]:
    """(database URL, Redis URL): BENCH_DATABASE_URL and BENCH_REDIS_URL, else the bench's own
    defaults (each bench has its own, so that two benches can run at once)."""
    return (os.environ.get("BENCH_DATABASE_URL", default_database_url),
            os.environ.get("BENCH_REDIS_URL", default_redis_url))


def service_env(database_url: str, redis_url: str, cleared: tuple[str, ...] = (), **extra: str) -> dict:
    """This environment for the services, less `cleared`: every service's tables in the bench's one
    database (the migrations and the services read the same variables), its Redis, no rate limits
    (the load comes from one address), sandbox payments; then `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in cleared}
    env.update(DATABASE_URL=database_url, ORDERS_DATABASE_URL=database_url, PAYOUTS_DATABASE_URL=database_url,
               MESSAGING_DATABASE_URL=database_url, REDIS_URL=redis_url, RATE_LIMITS="off",
               PAYMENT_VERIFIER="sandbox", PYTHONPATH=str(ROOT), **extra)
    return env


def start(*procs: Proc) -> None:
    """Start them all, then wait for each to be ready: they boot side by side."""
    for p in procs:
        p.start()
    for p in procs:
        p.wait_ready()


def run_bench(body: Callable[[str], bool], *, env: dict, procs: Iterable[Proc], logdir: Path,
              closing: list | None = None) -> int:
    """Run `body(load_before) -> failed` on a fresh database (env's DATABASE_URL) and a flushed
    Redis (env's REDIS_URL); `body` starts what it needs of `procs` and prints the report.
    Returns the exit code: 0 ran, 1 `body` says failed, 2 the setup failed (or a bug), 130 interrupted.

    Whatever happens, including Ctrl-C and SIGTERM, at the end: what `body` put in `closing` is
    closed (before the processes it talks to go), every started process of `procs` is stopped in
    reverse order, Redis is flushed (it holds task messages for workers that do not run here), and
    `logdir` is removed unless the run failed: then the logs are kept to look at."""
    database_url, redis_url = env["DATABASE_URL"], env["REDIS_URL"]
    closing = [] if closing is None else closing

    def on_term(signum, _frame):  # SIGTERM (a CI timeout, `kill`) cleans up as Ctrl-C does
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_term)

    failed = True  # until `body` returns: a setup failure or a crash keeps the logs
    try:
        load_before = loadavg()
        log(f"machine: {machine()}; load average {load_before}")
        log(f"database {database_url}, redis {redis_url}; logs in {logdir}")
        fresh_database(database_url, env)
        flush_redis(redis_url)
        failed = bool(body(load_before))
        return 1 if failed else 0
    except SetupError as exc:
        log(f"bench: {exc}")
        return 2
    except KeyboardInterrupt:
        log("bench: interrupted")
        failed = False  # an interrupted run's logs say nothing
        return 130
    except Exception:
        import traceback
        traceback.print_exc()
        return 2
    finally:
        for resource in closing:
            try:
                resource.close()
            except Exception:  # noqa: BLE001  (a broken connection must not stop the clean-up)
                pass
        for p in reversed(list(procs)):
            p.stop()  # a no-op for one never started
        try:
            flush_redis(redis_url)
        except SetupError:
            pass
        if failed:
            log(f"logs kept in {logdir}")
        else:
            shutil.rmtree(logdir, ignore_errors=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run (figures not meaningful)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds per figure (default 5, quick 1)")
    parser.add_argument("--duration", type=float, help="seconds per measurement (default 5, quick 1)")
    parser.add_argument("--approves", type=int, help="orders seeded per approve round (default: what the "
                        "warm-up rate needs for --duration, with a margin)")
    parser.add_argument("--connections", type=int, default=4, help="client keep-alive connections (default 4)")
    args = parser.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 5)
    duration = args.duration or (1.0 if args.quick else 5.0)
    warmup = 0.5 if args.quick else 2.0
    warmup_approves = 20 if args.quick else 60
    warmup_floor = 500 if args.quick else 3000  # seeded in SQL, so plenty: the floor is far faster
    read_orders = 10
    conns = args.connections

    database_url, redis_url = bench_urls(DEFAULT_DATABASE_URL, DEFAULT_REDIS_URL)
    env = service_env(database_url, redis_url, BENCH_FLOOR_DATABASE_URL=plain(database_url),
                      BENCH_FLOOR_REDIS_URL=redis_url)
    logdir = Path(tempfile.mkdtemp(prefix="orderdesk-bench-"))
    servers = [Server("hello", "bench.hello:app", env, logdir, "/"),
               Server("orders", "services.orders.wsgi:app", env, logdir, "/healthz"),
               Server("floor", "bench.floor:app", env, logdir, "/healthz")]
    errors = Errors()

    def body(load_before: str) -> bool:
        from bench import floor as floor_app

        start(*servers)
        hello, orders, floor = (s.port for s in servers)

        seeder = Seeder(orders)
        ids = seeder.orders(read_orders + warmup_approves)
        buyer = seeder.buyer
        reads, warm_pool = ids[:read_orders], ids[read_orders:]

        def approves(batch):
            action = b'{"action": "approve"}'
            return iter([http_request("PATCH", f"/api/orders/{oid}", orders, buyer, action) for oid in batch])

        # The floor's tables sit in the same database, next to the orders service's.
        floor_token, floor_warm = floor_app.setup(plain(database_url), warmup_floor)

        def floor_approves(batch):
            action = b'{"action": "approve"}'
            return iter([http_request("PATCH", f"/orders/{oid}", floor, floor_token, action) for oid in batch])

        # The approve warm-up also says how many orders a round needs; the floor's, its own.
        rate, _ = measure(orders, approves(warm_pool), conns, warmup, errors)
        per_round = args.approves or int(rate * duration * 2) + 20  # a margin: the machine is noisy
        floor_rate, _ = measure(floor, floor_approves(floor_warm), conns, warmup, errors)
        floor_per_round = int(floor_rate * duration * 2) + 20
        log(f"warm-up approve {rate:.0f}/s: seeding {per_round} orders per round; "
            f"floor {floor_rate:.0f}/s: {floor_per_round} per round")
        pool = seeder.orders(rounds * per_round)
        floor_pool = floor_app.seed(plain(database_url), rounds * floor_per_round)
        vacuum_analyze(database_url)  # the same plans and no autovacuum backlog in every round

        timed = {
            "hello_get": (hello, [http_request("GET", "/", hello, buyer)]),
            "orders_get": (orders, [http_request("GET", f"/api/orders/{oid}", orders, buyer) for oid in reads]),
            "hello_post": (hello, [http_request("POST", "/", hello, buyer, b'{"action": "approve"}')]),
        }
        log("warming up ...")
        for port, requests in timed.values():
            measure(port, requests, conns, warmup, errors)

        results: dict[str, list[float]] = {name: [] for name in (*timed, "approve", "floor")}
        for r in range(rounds):
            for name, (port, requests) in timed.items():
                results[name].append(measure(port, requests, conns, duration, errors)[0])
            short = ""
            for name, port, batch, n in (("approve", orders, approves(pool[r * per_round:][:per_round]), per_round),
                                         ("floor", floor, floor_approves(floor_pool[r * floor_per_round:]
                                                                         [:floor_per_round]), floor_per_round)):
                rate, elapsed = measure(port, batch, conns, duration, errors)
                results[name].append(rate)
                if elapsed < duration * 0.9:
                    short += f" ({name}: its {n} orders ran out after {elapsed:.1f} s)"
            log(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {v[-1]:.0f}/s" for n, v in results.items()) + short)

        load = f"{load_before} before, {loadavg()} after (other processes share the CPUs)"
        report(results, rounds, duration, conns, args.quick, errors, load, floor_app.MODE)
        return errors.count > 0

    return run_bench(body, env=env, procs=servers, logdir=logdir)


def report(results, rounds, duration, conns, quick, errors, load: str, floor_mode: str) -> None:
    med = {name: statistics.median(values) for name, values in results.items()}
    labels = {"hello_get": "hello GET /", "orders_get": "orders GET /api/orders/<id> (buyer)",
              "hello_post": "hello POST / (JSON body)",
              "approve": 'orders PATCH /api/orders/<id> {"action":"approve"}',
              "floor": f"floor PATCH /orders/<id> approve ({floor_mode})"}
    print()
    print(f"API throughput: requests/s, median of {rounds} interleaved round(s); {conns} keep-alive connections;")
    print(f"all three servers gunicorn {' '.join(GUNICORN[:6])}; {duration:g} s per measurement")
    if quick:
        print("QUICK smoke run: the figures are not meaningful")
    print(f"machine: {machine()}; load average {load}")
    print()
    width = max(len(v) for v in labels.values())
    print(f"{'request':<{width}}  {'req/s':>7}  rounds")
    for name, values in results.items():
        print(f"{labels[name]:<{width}}  {med[name]:>7.0f}  {' '.join(f'{v:.0f}' for v in values)}")
    print()
    print(f"{'ratio (of the medians)':<{width}}  {'value':>7}  {'target':<8}  {'':<5}  per round")
    # The last two: the floor against the approve target says whether any approve could meet it
    # here; the real approve against the floor, how much of the gap is this implementation's.
    for num, den, text, target in (("orders_get", "hello_get", "orders GET / hello GET", TARGETS["get"]),
                                   ("approve", "hello_post", "approve / hello POST", TARGETS["approve"]),
                                   ("floor", "hello_post", "floor / hello POST", TARGETS["approve"]),
                                   ("approve", "floor", "approve / floor", None)):
        ratio = med[num] / med[den] if med[den] else 0.0
        paired = " ".join(f"{a / b:.2f}" if b else "-" for a, b in zip(results[num], results[den]))
        aim, verdict = ("", "") if target is None else (f">= {target:.2f}", "PASS" if ratio >= target else "BELOW")
        print(f"{text:<{width}}  {ratio:>7.2f}  {aim:<8}  {verdict:<5}  {paired}")
    print()
    errors.print(" request(s) failed")


if __name__ == "__main__":
    sys.exit(main())
