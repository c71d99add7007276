"""Webhooks: order events delivered per second to a local receiver, against that receiver's own
capacity, and the lag from an order transition to its webhook's receipt (`make bench-webhooks`).

Starts what carries a webhook the way services/processes.py starts it (the orders service under
gunicorn, the `default` worker, the `webhooks` worker with 4
processes; no beat: its sweep only retries, and the receiver never fails) on a fresh
PostgreSQL database and a Redis database, and a receiver in a process of its own: a small asyncio
HTTP server on 127.0.0.1 that answers 200 at once and records, per request, its receive time,
`X-Webhook-Delivery` and the body's event id, event and `created_at`. Agents (8 by default), each
with a fixed-price service and a buyer, get endpoints at the receiver (WEBHOOK_ALLOWED_HOSTS=
127.0.0.1 lets plain http to it through). Orders are made through the HTTP API as bench/api.py's
Seeder makes them (create, sandbox transfer, `PATCH pay`, deliver: three events each), then:

1. backlog drain: the agents' orders are made before the webhooks worker starts, so their events
   wait in its queue; then it starts, and events/s is taken from the first receipt to the last;
2. baseline: the receiver's capacity, POSTs of a real event's body with the worker's headers, one
   connection per request (`Connection: close`, as the worker sends them) from 4 threads in this
   process, in requests/s, in two halves (after the drain and at the end); the drain's rate is
   reported as a ratio of it;
3. steady lag: orders walked through create, pay, deliver and approve one transition at a time,
   5 transitions a second; p50/p95 of (receive time - the event's `created_at`, which is written
   in the transition's transaction, before its commit, to the millisecond), and where that time
   goes, from webhook_deliveries' own timestamps;
4. burst: the agents' orders made all at once with the worker running: events/s committed and
   delivered, and the lag under that load.

Every event of the bench's orders (read back from `outbox_events`) must be received exactly once:
the report counts missing events, duplicate receipts and receipts of unknown events, and the
webhook_deliveries rows not `delivered`.

It reports, it does not gate: exit 0 whatever the figures, 1 if any event went missing, a
delivery did not end `delivered`, or a baseline request failed, 2 if the setup failed (a failed
API call while making orders included).

Settings (environment): BENCH_DATABASE_URL (default postgresql://postgres@127.0.0.1:5432/
orderdesk_bench_webhooks; dropped, recreated and migrated on every run), BENCH_REDIS_URL (default
redis://127.0.0.1:6379/10; flushed before and after a run: it also holds the events for the
payouts and media queues, which no worker consumes here), LOG_LEVEL (the services', default
WARNING).
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import http.client
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.api import (Api, Errors, Proc, Reader, Seeder, SetupError, bench_urls, free_port, loadavg, log,  # noqa: E402
                       machine, measure, pct, run_bench, service_env, start)

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/orderdesk_bench_webhooks"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/10"
CLEARED = ("FAULT_DUPLICATE_MESSAGES",)  # an injected fault: each event would be delivered twice
STALL_SECONDS = 15.0  # no receipt for this long while events are missing: they are reported missing
BASELINE_DELIVERY = "baseline"  # the X-Webhook-Delivery of the baseline's own POSTs


# --- the receiver (its own process: `--receiver PORT`) -----------------------------------------

def serve(port: int) -> None:
    """Answer every request 200 at once, one request per connection. A POST is recorded as
    [receive time, X-Webhook-Delivery, event id, event, created_at]; `GET /records` returns the
    records made since the last such GET; any other GET (the health check) is just answered."""
    records: list[list] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            request_line, *lines = head.decode("latin-1").split("\r\n")
            method, path = request_line.split(" ")[:2]
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines if line)}
            body = await reader.readexactly(int(headers.get("content-length") or 0))
            if method == "POST":
                received = time.time()  # the full request is in: delivered
                try:
                    event = json.loads(body)
                    fields = [event["id"], event["event"], event["created_at"]]
                except (ValueError, KeyError, TypeError):
                    fields = [None, None, None]  # counted as a receipt of an unknown event
                records.append([received, headers.get("x-webhook-delivery"), *fields])
                payload = b"ok"
            elif path == "/records":
                payload = json.dumps(records).encode()
                records.clear()
            else:
                payload = b"ok"
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
                         b"Connection: close\r\n\r\n%s" % (len(payload), payload))
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


class Receipt(NamedTuple):
    at: float  # epoch seconds, at the receiver
    delivery: str | None
    event_id: str | None
    event: str | None
    created_at: str | None

    @property
    def created(self) -> float:
        """The event's created_at, as epoch seconds."""
        return dt.datetime.fromisoformat(self.created_at).timestamp()

    @property
    def lag(self) -> float:
        return self.at - self.created


class Receipts:
    """Every webhook the receiver recorded, fetched from it; the baseline's own POSTs left out."""

    def __init__(self, port: int):
        self.port = port
        self.all: list[Receipt] = []

    def poll(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request("GET", "/records")
            records = json.loads(conn.getresponse().read())
        finally:
            conn.close()
        self.all += [Receipt(*r) for r in records if r[1] != BASELINE_DELIVERY]

    def wait_for(self, expected: dict[str, str], procs: Iterable[Proc], what: str) -> list[Receipt]:
        """Poll until every expected event has been received, or none has for STALL_SECONDS;
        returns the receipts of the expected events (repeats included)."""
        started = last_change = time.monotonic()
        next_log, seen = started + 5, -1
        while True:
            self.poll()
            mine = [r for r in self.all if r.event_id in expected]
            got = len({r.event_id for r in mine})
            now = time.monotonic()
            if got != seen:
                seen, last_change = got, now
            if got == len(expected) or now - last_change > STALL_SECONDS:
                return mine
            for p in procs:
                p.check()
            if now >= next_log:
                log(f"  {what}: {got}/{len(expected)} received after {now - started:.0f} s")
                next_log += 5
            time.sleep(0.1)


# --- processes and tables --------------------------------------------------------------------

def processes(env: dict, logdir: Path, orders_port: int, receiver_port: int) -> dict[str, Proc]:
    """The receiver, then services/processes.py's orders server (on a port of its own), default
    worker and webhooks worker, as `make run` starts them."""
    from services import processes as table

    by_name = {p.name: p for p in table.PROCESSES}
    orders = list(by_name["orders"].argv)
    orders[orders.index("--bind") + 1] = f"127.0.0.1:{orders_port}"
    return {
        "receiver": Proc("receiver", [sys.executable, str(Path(__file__).resolve()), "--receiver", str(receiver_port)],
                         env, logdir, f"http://127.0.0.1:{receiver_port}/healthz"),
        "orders": Proc("orders", orders, env, logdir, f"http://127.0.0.1:{orders_port}/healthz"),
        "worker-default": Proc("worker-default", list(by_name["worker-default"].argv), env, logdir),
        "worker-webhooks": Proc("worker-webhooks", list(by_name["worker-webhooks"].argv), env, logdir),
    }


class Tables(Reader):
    def events(self, order_ids: list[str]) -> dict[str, str]:
        """Every order event of these orders, id -> event: what their agents must receive."""
        return dict(self.conn.execute("SELECT id, event FROM outbox_events WHERE order_id = ANY(%s) "
                                      "AND event LIKE %s", (order_ids, "order.%")).fetchall())

    def sample_body(self) -> tuple[str, bytes]:
        """(event, body) of a delivered `order.paid`, exactly as the worker sent it."""
        row = self.conn.execute("SELECT event, body FROM webhook_deliveries WHERE event = 'order.paid' "
                                "AND status = 'delivered' LIMIT 1").fetchone()
        if row is None:
            raise SetupError("no order.paid was delivered: nothing to model the baseline's POST on")
        return row[0], row[1].encode()

    def recorded(self, event_ids: list[str]) -> dict[str, tuple[str, float, float | None]]:
        """event id -> (its order, its delivery row's created_at and delivered_at as epoch seconds)."""
        rows = self.conn.execute("SELECT event_id, order_id, created_at, delivered_at FROM webhook_deliveries "
                                 "WHERE event_id = ANY(%s)", (event_ids,)).fetchall()
        return {e: (o, c.timestamp(), d.timestamp() if d else None) for e, o, c, d in rows}

    def statuses(self) -> tuple[dict[str, int], int]:
        """(webhook_deliveries by status, deliveries that took more than one attempt)."""
        counts = dict(self.conn.execute("SELECT status, count(*) FROM webhook_deliveries GROUP BY status").fetchall())
        retried = self.conn.execute("SELECT count(*) FROM webhook_deliveries WHERE attempts > 1").fetchone()[0]
        return counts, retried


# --- making events ---------------------------------------------------------------------------

class HookedSeeder(Seeder):
    """Seeder's agent, fixed-price service and buyer, the agent's endpoint at the receiver."""

    def __init__(self, port: int, endpoint: str):
        super().__init__(port)
        self.api.call("PATCH", "/api/agents/me", self.agent, {"endpoint_url": endpoint})


def all_at_once(seeders: list[HookedSeeder], per_agent: int) -> list[str]:
    """`per_agent` orders of every agent walked to `delivered` (three events each), the agents in
    parallel, each in a new thread, so on a new keep-alive connection (gunicorn closes idle ones
    after 2 s)."""
    with ThreadPoolExecutor(len(seeders)) as pool:
        shares = list(pool.map(lambda s: [s.one() for _ in range(per_agent)], seeders))
    return [oid for share in shares for oid in share]


def steady(seeder: HookedSeeder, port: int, orders: int, rate: float) -> dict[tuple[str, str], float]:
    """Orders walked through create, pay, deliver and approve, one transition (one event) at a time,
    `rate` transitions a second. Returns when each answered: (order id, event) -> epoch seconds."""
    api = Api(port)  # a connection of its own: the seeder's have been idle longer than gunicorn keeps them
    answered: dict[tuple[str, str], float] = {}
    due = time.monotonic()

    def done(oid: str, event: str) -> None:
        nonlocal due
        answered[(oid, event)] = time.time()
        due += 1 / rate
        time.sleep(max(0.0, due - time.monotonic()))

    for _ in range(orders):
        oid = seeder.create(api)
        done(oid, "order.created")
        seeder.pay(oid, api)
        done(oid, "order.paid")
        seeder.deliver(oid, api)
        done(oid, "order.delivered")
        api.call("PATCH", f"/api/orders/{oid}", seeder.buyer, {"action": "approve"})
        done(oid, "order.completed")
    return answered


def baseline_request(port: int, event: str, body: bytes) -> bytes:
    """A POST as the worker sends one: its headers (a signature of the same shape), a real body,
    one connection per request."""
    from services.orders.webhooks import USER_AGENT

    headers = {"Host": f"127.0.0.1:{port}", "Accept-Encoding": "identity", "Content-Length": len(body),
               "Content-Type": "application/json", "User-Agent": USER_AGENT, "X-Webhook-Event": event,
               "X-Webhook-Delivery": BASELINE_DELIVERY,
               "X-Webhook-Signature": f"t={int(time.time())},v1={hashlib.sha256(body).hexdigest()}",
               "Connection": "close"}
    head = "POST /hooks HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return (head + "\r\n").encode() + body


# --- the run ---------------------------------------------------------------------------------

@dataclass
class Phase:
    name: str
    expected: dict[str, str]  # event id -> event
    receipts: list[Receipt]  # of those events, repeats included

    def first(self) -> list[Receipt]:
        """Each event's first receipt."""
        seen: dict[str, Receipt] = {}
        for r in sorted(self.receipts, key=lambda r: r.at):
            seen.setdefault(r.event_id, r)
        return list(seen.values())

    def delivered_rate(self) -> tuple[float, float]:
        """(events/s from the first receipt to the last, that span in seconds)."""
        times = [r.at for r in self.first()]
        span = max(times) - min(times) if len(times) > 1 else 0.0
        return ((len(times) - 1) / span if span else 0.0), span


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run (figures not meaningful)")
    parser.add_argument("--agents", type=int, default=8, help="agents, each with its endpoint (default 8)")
    parser.add_argument("--backlog", type=int, help="orders per agent queued for the drain (default 40, quick 4)")
    parser.add_argument("--burst", type=int, help="orders per agent in the burst (default 25, quick 3)")
    parser.add_argument("--steady", type=int, help="orders walked one transition at a time (default 40, quick 4)")
    parser.add_argument("--rate", type=float, default=5.0, help="transitions per second when steady (default 5)")
    parser.add_argument("--duration", type=float, help="seconds per baseline half (default 5, quick 1)")
    parser.add_argument("--connections", type=int, default=4, help="baseline client threads (default 4)")
    parser.add_argument("--receiver", type=int, metavar="PORT", help="only serve the receiver on PORT "
                        "(the bench starts it so, in a process of its own)")
    args = parser.parse_args(argv)
    if args.receiver is not None:
        serve(args.receiver)
        return 0
    if args.rate < 1:
        parser.error("--rate must be at least 1: gunicorn closes a keep-alive connection idle for 2 s")
    backlog = args.backlog or (4 if args.quick else 40)
    burst = args.burst or (3 if args.quick else 25)
    n_steady = args.steady or (4 if args.quick else 40)
    duration = args.duration or (1.0 if args.quick else 5.0)

    database_url, redis_url = bench_urls(DEFAULT_DATABASE_URL, DEFAULT_REDIS_URL)
    orders_port, receiver_port = free_port(), free_port()
    env = service_env(database_url, redis_url, CLEARED, LOG_LEVEL=os.environ.get("LOG_LEVEL", "WARNING"),
                      WEBHOOK_ALLOWED_HOSTS="127.0.0.1", PYTHONUNBUFFERED="1")
    logdir = Path(tempfile.mkdtemp(prefix="orderdesk-bench-webhooks-"))
    procs = processes(env, logdir, orders_port, receiver_port)
    errors = Errors()
    opened: list = []  # run_bench closes them before it stops the processes

    def body(load_before: str) -> bool:
        start(procs["receiver"], procs["orders"], procs["worker-default"])
        tables = Tables(database_url)
        opened.append(tables)
        receipts = Receipts(receiver_port)
        endpoint = f"http://127.0.0.1:{receiver_port}/hooks"
        seeders = [HookedSeeder(orders_port, endpoint) for _ in range(args.agents)]
        phases: list[Phase] = []

        log(f"backlog: {backlog} orders for each of {args.agents} agents, the webhooks worker stopped ...")
        started = time.monotonic()
        expected = tables.events(all_at_once(seeders, backlog))
        log(f"  {len(expected)} events in {time.monotonic() - started:.0f} s; starting the webhooks worker")
        start(procs["worker-webhooks"])
        phases.append(Phase("drain", expected, receipts.wait_for(expected, procs.values(), "drain")))

        event, sample = tables.sample_body()
        request = baseline_request(receiver_port, event, sample)
        log(f"baseline 1/2: {duration:g} s ...")
        measure(receiver_port, [request], args.connections, min(1.0, duration), errors)  # warm-up
        baseline = [measure(receiver_port, [request], args.connections, duration, errors)[0]]

        log(f"steady: {n_steady} orders, {4 * n_steady} transitions at {args.rate:g}/s ...")
        answered = steady(seeders[0], orders_port, n_steady, args.rate)
        expected = tables.events(list({oid for oid, _ in answered}))
        phases.append(Phase("steady", expected, receipts.wait_for(expected, procs.values(), "steady")))
        recorded = tables.recorded(list(expected))

        log(f"burst: {burst} orders for each of {args.agents} agents at once, the worker running ...")
        expected = tables.events(all_at_once(seeders, burst))
        phases.append(Phase("burst", expected, receipts.wait_for(expected, procs.values(), "burst")))

        log(f"baseline 2/2: {duration:g} s ...")
        baseline.append(measure(receiver_port, [request], args.connections, duration, errors)[0])
        receipts.poll()  # late repeats, during the baseline's seconds
        statuses = tables.statuses()

        load = f"{load_before} before, {loadavg()} after (other processes share the CPUs)"
        report(args, phases, baseline, answered, recorded, receipts, statuses, sample, errors, load, duration)
        return errors.count > 0

    # in start order, so the webhooks worker (if it started) stops first and the receiver last
    return run_bench(body, env=env, procs=procs.values(), logdir=logdir, closing=opened)


def report(args, phases: list[Phase], baseline: list[float], answered: dict, recorded: dict, receipts: Receipts,
           statuses: tuple[dict[str, int], int], body: bytes, errors: Errors, load: str, duration: float) -> None:
    """Prints the figures; every missing event and every delivery not `delivered` goes to `errors`."""
    ms = 1000
    by = {p.name: p for p in phases}
    drain, steady_phase, burst = by["drain"], by["steady"], by["burst"]
    capacity = statistics.fmean(baseline)
    print()
    print("Webhooks: order events POSTed by the webhooks worker to a local receiver (asyncio, one process,")
    print("answers 200 at once), against the receiver's capacity measured from this process")
    if args.quick:
        print("QUICK smoke run: the figures are not meaningful")
    print(f"processes: orders gunicorn 2×4 threads, worker-default -c 1, worker-webhooks -c 4, receiver; "
          f"{args.agents} agent(s)")
    print(f"machine: {machine()}; load average {load}")
    print()

    drain_rate, drain_span = drain.delivered_rate()
    burst_rate, burst_span = burst.delivered_rate()
    burst_created = [r.created for r in burst.first()]
    created_span = max(burst_created) - min(burst_created) if len(burst_created) > 1 else 0.0
    label = 64
    print(f"{'throughput':<{label}}  {'events':>6}  {'seconds':>7}  {'per s':>7}")
    print(f"{'backlog drain: worker started on queued events, first to last receipt':<{label}}  "
          f"{len(drain.first()):>6}  {drain_span:>7.1f}  {drain_rate:>7.1f}")
    print(f"{'burst, worker running: committed (first to last created_at)':<{label}}  "
          f"{len(burst_created):>6}  {created_span:>7.1f}  "
          f"{(len(burst_created) - 1) / created_span if created_span else 0.0:>7.1f}")
    print(f"{'burst, worker running: delivered (first to last receipt)':<{label}}  "
          f"{len(burst.first()):>6}  {burst_span:>7.1f}  {burst_rate:>7.1f}")
    print(f"{f'baseline: receiver, {args.connections} threads, one connection per POST':<{label}}  "
          f"{'':>6}  {duration * len(baseline):>7.1f}  {capacity:>7.0f}  "
          f"(halves {' '.join(f'{b:.0f}' for b in baseline)}; {len(body)}-byte body)")
    print(f"{'ratio backlog drain / baseline':<{label}}  {'':>6}  {'':>7}  "
          f"{drain_rate / capacity if capacity else 0.0:>7.3f}")
    print()

    def row(text, values):
        if not values:
            return f"{text:<{label}}  {'-':>7}"
        return (f"{text:<{label}}  {statistics.median(values) * ms:>7.1f}  {pct(values, 95) * ms:>7.1f}  "
                f"{max(values) * ms:>7.1f}  {len(values):>5}")

    print(f"{'lag: receipt - event created_at (ms)':<{label}}  {'p50':>7}  {'p95':>7}  {'max':>7}  {'n':>5}")
    print(row(f"steady: one transition at a time, {args.rate:g}/s", [r.lag for r in steady_phase.first()]))
    print(row("under the burst", [r.lag for r in burst.first()]))
    print()

    # The steady events' path: the transition answered at the client, the delivery row recorded by
    # the worker, the receipt, the row marked delivered; a step is the time since the line above.
    labels = {"answered": "transition answered at the client (after commit and publish)",
              "recorded": "recorded by the webhooks worker (webhook_deliveries.created_at)",
              "received": "received by the receiver",
              "delivered": "marked delivered (webhook_deliveries.delivered_at)"}
    offsets: dict[str, list[float]] = {name: [] for name in labels}
    steps: dict[str, list[float]] = {name: [] for name in labels}
    for r in steady_phase.first():
        order_id, at_recorded, at_delivered = recorded.get(r.event_id, (None, None, None))
        if at_delivered is None or (order_id, r.event) not in answered:
            continue
        marks = {"answered": answered[(order_id, r.event)], "recorded": at_recorded, "received": r.at,
                 "delivered": at_delivered}
        previous = r.created
        for name, at in marks.items():
            offsets[name].append(at - r.created)
            steps[name].append(at - previous)
            previous = at
    if offsets["received"]:
        print("where the steady lag goes: ms after the event's created_at (median), and each step since")
        print("the line above (median and p95); clocks of this machine, created_at to the ms")
        print(f"  {'':<{label - 2}}  {'at':>7}  {'step':>7}  {'p95':>7}")
        for name, text in labels.items():
            print(f"  {text:<{label - 2}}  {statistics.median(offsets[name]) * ms:>7.1f}  "
                  f"{statistics.median(steps[name]) * ms:>7.1f}  {pct(steps[name], 95) * ms:>7.1f}")
        print()

    expected = {eid: event for p in phases for eid, event in p.expected.items()}
    counts = Counter(r.event_id for r in receipts.all)
    missing = [eid for eid in expected if eid not in counts]
    repeats = sum(n - 1 for eid, n in counts.items() if eid in expected)
    unknown = sum(n for eid, n in counts.items() if eid not in expected)
    by_status, retried = statuses
    print(f"exactly once: {len(expected)} events expected, {len(expected) - len(missing)} received, "
          f"{len(missing)} missing, {repeats} repeated receipt(s), {unknown} receipt(s) of unknown events")
    print(f"webhook_deliveries: {', '.join(f'{s} {n}' for s, n in sorted(by_status.items()))}; "
          f"{retried} took more than one attempt")
    for eid in missing:
        errors.add(f"{expected[eid]} {eid} never received")
    for status, n in by_status.items():
        if status != "delivered":
            errors.add(f"{n} webhook deliveries {status}")
    print()
    errors.print()


if __name__ == "__main__":
    sys.exit(main())
