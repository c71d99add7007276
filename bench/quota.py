"""Workspace quota: `generate` calls per second with and without contention on one order, and
whether concurrent calls ever reserve more units than the quota.

Starts the orders service twice under gunicorn (two masters on their own ports, two workers each:
four processes on one database) on a fresh PostgreSQL database and a Redis database, makes weekly
orders through the orders API (create, sandbox transfer, `PATCH pay`, which opens the workspace),
then:

1. measures `POST /api/orders/<id>/generate` by the buyer on the first server, on workspaces with
   no quota, in interleaved rounds of three figures: one connection calling on one order, one call
   after the other (uncontended); 16 connections calling on that same order (contended: every call
   waits for the order's row lock); 16 connections taking 64 orders in turn (spread: the same
   concurrency without a shared row, the baseline). Prints calls per second and the ratios
   contended / spread and contended / uncontended (the machine is shared: the ratios are the
   figures, not the rates);
2. checks for over-issue: in each round a fresh order whose workspace has a quota of 25 gets 64
   calls at once from 16 connections, alternately on the two servers; counts the 202s and the 409
   `quota_exhausted`s, reads back the workspace's `quota_used` (`GET /api/orders/<id>`) and its
   generations (`GET /api/orders/<id>/generations`, every page), and reports the units issued
   above the quota (must be 0) and below it.

No workspaces worker runs, so generations stay pending and no unit is given back meanwhile.

It reports, it does not gate on speed: exit 0 whatever the figures, 1 if any unit was issued above
the quota, the read-back disagrees with the answers, or any request errored (an unexpected answer
or a broken connection), 2 if the setup failed.

Settings (environment): BENCH_DATABASE_URL (default postgresql://postgres@127.0.0.1:5432/
orderdesk_bench_quota; dropped, recreated and migrated on every run), BENCH_REDIS_URL (default
redis://127.0.0.1:6379/13; flushed before and after a run: it holds the `generation.created` task
messages, which no worker consumes here), LOG_LEVEL (the service's, default INFO).
"""
from __future__ import annotations

import argparse
import http.client
import itertools
import json
import statistics
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.api import (GUNICORN, Api, Conn, Errors, Seeder, Server, SetupError, bench_urls, http_request,  # noqa: E402
                       loadavg, log, machine, measure, run_bench, service_env, start, vacuum_analyze)

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/orderdesk_bench_quota"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/13"
SPREAD_ORDERS = 64
PROMPT = b'{"prompt": "A poster of a lighthouse at dusk."}'


class WorkspaceSeeder(Seeder):
    """Seeder's agent and buyer session with a weekly service of `quota` generations (0: no limit);
    its orders stop once paid, their workspace open. Seeder's own fixed-price service goes unused."""

    def __init__(self, port: int, quota: int):
        super().__init__(port)
        self.service = self.api.call("POST", "/api/services", self.agent, body={
            "title": "Weekly posters", "description": "Posters on demand, all week.", "price_type": "weekly",
            "price_usd": "25.00", "quota_limit": quota})

    def one(self, _i=None) -> str:
        oid = self.create(brief="Bench workspace.")
        order = self.pay(oid)
        if order["status"] != "in_progress" or not order["workspace"]:
            raise SetupError(f"seeding: order {oid} is {order['status']} with no open workspace")
        return oid


def generate(port: int, oid: str, token: str) -> bytes:
    return http_request("POST", f"/api/orders/{oid}/generate", port, token, PROMPT)


def burst(targets: list[tuple[int, bytes]], calls: int, errors: Errors) -> tuple[int, int]:
    """`calls` requests at once, shared out over one keep-alive connection per target (port,
    request), each sending its share one after the other. Returns (accepted, refused for the quota)."""
    n = len(targets)
    answers: list[list[tuple[int, bytes]]] = [[] for _ in targets]
    barrier = threading.Barrier(n)

    def run(k: int) -> None:
        port, data = targets[k]
        conn = Conn(port)
        try:
            conn.connect()  # before the barrier: the calls race, not the handshakes
            barrier.wait(timeout=30)
            for _ in range(calls // n + (k < calls % n)):
                answers[k].append(conn.request(data))
        except (OSError, ValueError, threading.BrokenBarrierError) as exc:
            barrier.abort()
            errors.add(f"burst: {exc!r}")
        finally:
            conn.close()

    threads = [threading.Thread(target=run, args=(k,), daemon=True) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    accepted = refused = 0
    for status, body in itertools.chain.from_iterable(answers):
        if status == 202:
            accepted += 1
        elif status == 409 and json.loads(body).get("code") == "quota_exhausted":
            refused += 1
        else:
            errors.add(f"burst generate: {status} {body[:160].decode(errors='replace')!r}")
    return accepted, refused


def read_back(port: int, buyer: str, oid: str, errors: Errors) -> tuple[int, int] | None:
    """(the workspace's quota_used, the order's generations) as the buyer reads them."""
    api = Api(port)  # a connection of its own: an idle keep-alive one may have been closed by the server
    try:
        used = api.call("GET", f"/api/orders/{oid}", buyer)["workspace"]["quota_used"]
        listed, cursor = 0, ""
        while True:
            page = api.call("GET", f"/api/orders/{oid}/generations?limit=100{cursor}", buyer)
            listed += len(page["items"])
            if not page["next_cursor"]:
                return used, listed
            cursor = f"&cursor={page['next_cursor']}"
    except (SetupError, OSError, http.client.HTTPException) as exc:
        errors.add(f"read back {oid}: {exc}")
        return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run (figures not meaningful)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds of the three rates (default 5, quick 1)")
    parser.add_argument("--duration", type=float, help="seconds per rate measurement (default 5, quick 1)")
    parser.add_argument("--connections", type=int, default=16, help="concurrent connections (default 16)")
    parser.add_argument("--quota", type=int, default=25, help="the quota in the over-issue check (default 25)")
    parser.add_argument("--calls", type=int, default=64, help="calls per over-issue round (default 64)")
    parser.add_argument("--bursts", type=int, help="over-issue rounds (default 20, quick 2)")
    args = parser.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 5)
    duration = args.duration or (1.0 if args.quick else 5.0)
    warmup = 0.5 if args.quick else 2.0
    bursts = args.bursts or (2 if args.quick else 20)
    conns = args.connections

    database_url, redis_url = bench_urls(DEFAULT_DATABASE_URL, DEFAULT_REDIS_URL)
    env = service_env(database_url, redis_url)
    logdir = Path(tempfile.mkdtemp(prefix="orderdesk-bench-quota-"))
    servers = [Server(f"orders-{k}", "services.orders.wsgi:app", env, logdir, "/healthz") for k in (1, 2)]
    errors = Errors()

    def body(load_before: str) -> bool:
        start(*servers)
        port = servers[0].port

        unlimited = WorkspaceSeeder(port, quota=0)
        one, *spread = unlimited.orders(1 + SPREAD_ORDERS)
        limited = WorkspaceSeeder(port, quota=args.quota)
        fresh = limited.orders(bursts)
        vacuum_analyze(database_url)

        token = unlimited.buyer
        single = [generate(port, one, token)]
        # spread: one iterator shared by the connections, which take the orders in turn, so the
        # calls in flight are on different orders
        phases = {"uncontended": (1, single), "contended": (conns, single),
                  "spread": (conns, itertools.cycle([generate(port, oid, token) for oid in spread]))}
        log("warming up ...")
        for connections, requests in phases.values():
            measure(port, requests, connections, warmup, errors)
        rates: dict[str, list[float]] = {name: [] for name in phases}
        for r in range(rounds):
            for name, (connections, requests) in phases.items():
                rates[name].append(measure(port, requests, connections, duration, errors)[0])
            log(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {v[-1]:.0f}/s" for n, v in rates.items()))

        log(f"over-issue check: {bursts} rounds of {args.calls} calls on a quota of {args.quota} ...")
        checks = []
        for oid in fresh:
            ports = [servers[k % len(servers)].port for k in range(conns)]  # alternately: both servers race
            targets = [(p, generate(p, oid, limited.buyer)) for p in ports]
            accepted, refused = burst(targets, args.calls, errors)
            checks.append((accepted, refused, read_back(port, limited.buyer, oid, errors)))

        load = f"{load_before} before, {loadavg()} after (other processes share the CPUs)"
        bad = report(rates, checks, rounds, duration, conns, args, load, errors)
        return bad or errors.count > 0

    return run_bench(body, env=env, procs=servers, logdir=logdir)


def report(rates, checks, rounds, duration, conns, args, load, errors) -> bool:
    """Prints the figures; True if the over-issue check found a problem."""
    med = {name: statistics.median(values) for name, values in rates.items()}
    labels = {"uncontended": "uncontended: 1 connection, one order",
              "contended": f"contended: {conns} connections, one order",
              "spread": f"spread: {conns} connections over {SPREAD_ORDERS} orders"}
    print()
    print(f"Workspace quota: POST /api/orders/<id>/generate (buyer), calls/s, median of {rounds} interleaved "
          f"round(s) of {duration:g} s")
    print(f"two orders servers, each gunicorn {' '.join(GUNICORN[:6])}; the rates use the first")
    if args.quick:
        print("QUICK smoke run: the figures are not meaningful")
    print(f"machine: {machine()}; load average {load}")
    print()
    width = max(len(v) for v in labels.values())
    print(f"{'generate':<{width}}  {'calls/s':>7}  rounds")
    for name, values in rates.items():
        print(f"{labels[name]:<{width}}  {med[name]:>7.0f}  {' '.join(f'{v:.0f}' for v in values)}")
    print()
    print(f"{'ratio (of the medians)':<{width}}  {'value':>7}  per round")
    for num, den in (("contended", "spread"), ("contended", "uncontended")):
        ratio = med[num] / med[den] if med[den] else 0.0
        paired = " ".join(f"{a / b:.2f}" if b else "-" for a, b in zip(rates[num], rates[den]))
        print(f"{num + ' / ' + den:<{width}}  {ratio:>7.2f}  {paired}")
    print()
    quota, calls = args.quota, args.calls
    print(f"Over-issue check: {len(checks)} round(s), each a fresh order with a quota of {quota}, {calls} calls "
          f"at once from {conns} connections alternating between the two servers")
    print(f"{'round':>5}  {'202':>4}  {'409':>4}  {'quota_used':>10}  {'generations':>11}  {'over':>4}  {'under':>5}")
    over_total = under_total = disagreements = 0
    for r, (accepted, refused, seen) in enumerate(checks, 1):
        used, listed = seen or (None, None)
        # over: units beyond the quota, whether in the answers or in what was stored
        over = max(accepted, used or 0, listed or 0) - quota
        under = min(calls, quota) - accepted
        disagree = seen is not None and not accepted == used == listed
        over_total += max(over, 0)
        under_total += max(under, 0)
        disagreements += disagree
        print(f"{r:>5}  {accepted:>4}  {refused:>4}  {used if seen else '-':>10}  {listed if seen else '-':>11}  "
              f"{max(over, 0):>4}  {max(under, 0):>5}{'  DISAGREE' if disagree else ''}")
    print(f"over-issued units: {over_total}{' (must be 0)' if over_total else ''}; under-issued: {under_total}; "
          f"read-back disagreeing with the answers: {disagreements} round(s)")
    print()
    errors.print(" request(s) failed")
    return over_total > 0 or disagreements > 0


if __name__ == "__main__":
    sys.exit(main())
