"""Messaging: the latency of one page on a small and on a large conversation, and posts per second.

Starts the orders and messaging services under gunicorn on a fresh PostgreSQL database and a Redis
database, makes paid orders through the orders API, bulk-inserts 100 messages on one order and
100,000 on another straight into the messaging tables (all already read, so a page is the plain
read path: access check, page query, unread count), then:

1. measures the latency of `GET /api/orders/<id>/messages` as the buyer, one request at a time on
   one keep-alive connection, for the first page and a page in the middle of each order, in
   interleaved rounds; prints medians, p95 and the large/small ratio against its target (≤ 1.5);
2. measures `POST /api/orders/<id>/messages` by the buyer (each one an `order.message` event
   relayed after commit) over 4 keep-alive connections: posts per second.

It reports, it does not gate: exit 0 whether or not the target is met, 1 if any request errored,
2 if the setup failed.

Settings (environment): BENCH_DATABASE_URL (default postgresql://postgres@127.0.0.1:5432/
orderdesk_bench_messaging; dropped, recreated and migrated on every run), BENCH_REDIS_URL (default
redis://127.0.0.1:6379/14; flushed before and after a run), LOG_LEVEL (the services', default INFO).
"""
from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.api import (GUNICORN, Conn, Errors, Seeder, Server, bench_urls, http_request, loadavg, log,  # noqa: E402
                       machine, measure, run_bench, service_env, start, vacuum_analyze)

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/orderdesk_bench_messaging"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/14"
SIZES = {"small": 100, "large": 100_000}
TARGET_RATIO = 1.5  # the large conversation's page latency ≤ this × the small one's


def seed_messages(url: str, order_id: str, n: int, wallet: str, agent_id: str) -> int:
    """n messages alternating buyer and agent, all read, inserted in bulk; returns the seq of the
    message in the middle (a page from there is a page in the middle of the conversation)."""
    from sqlalchemy import insert, select

    from services.messaging.models import Message, Thread
    from shared.db import make_engine
    from shared.ids import new_id

    engine = make_engine(url)
    start = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=n + 60)
    started = time.monotonic()
    with engine.begin() as conn:
        batch = []
        for i in range(n):
            at = start + dt.timedelta(seconds=i)
            client = i % 2 == 0
            batch.append({"id": new_id("message"), "order_id": order_id, "sender_type": "client" if client else "agent",
                          "sender_id": wallet if client else agent_id, "content": f"Seeded message {i}: " + "x" * 60,
                          "created_at": at, "read_at": at + dt.timedelta(seconds=1)})
            if len(batch) == 10_000 or i == n - 1:
                conn.execute(insert(Message), batch)
                batch = []
        conn.execute(insert(Thread), [{"order_id": order_id, "client_unread": 0, "agent_unread": 0,
                                       "message_count": n, "last_message_at": start + dt.timedelta(seconds=n)}])
        middle = conn.execute(select(Message.seq).where(Message.order_id == order_id).order_by(Message.seq)
                              .offset(n // 2).limit(1)).scalar_one()
    engine.dispose()
    log(f"  seeded {n} messages on {order_id} in {time.monotonic() - started:.1f} s")
    return middle


def latencies(port: int, request: bytes, count: int, errors: Errors) -> list[float]:
    """Milliseconds per request, one request at a time on one keep-alive connection."""
    conn = Conn(port)
    samples = []
    try:
        for _ in range(count):
            began = time.perf_counter()
            try:
                status, body = conn.request(request)
            except (OSError, ValueError) as exc:
                errors.add(f"page: {exc!r}")
                conn.close()
                continue
            elapsed = (time.perf_counter() - began) * 1000
            if status == 200:
                samples.append(elapsed)
            else:
                errors.add(f"page: {status} {body[:160].decode(errors='replace')!r}")
    finally:
        conn.close()
    return samples


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))] if ordered else 0.0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run (figures not meaningful)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds of page requests (default 5, quick 1)")
    parser.add_argument("--requests", type=int, help="page requests per figure per round (default 200, quick 30)")
    parser.add_argument("--duration", type=float, help="seconds per posts measurement (default 5, quick 1)")
    parser.add_argument("--connections", type=int, default=4, help="client connections for posts (default 4)")
    args = parser.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 5)
    per_round = args.requests or (30 if args.quick else 200)
    duration = args.duration or (1.0 if args.quick else 5.0)
    conns = args.connections

    database_url, redis_url = bench_urls(DEFAULT_DATABASE_URL, DEFAULT_REDIS_URL)
    env = service_env(database_url, redis_url)
    logdir = Path(tempfile.mkdtemp(prefix="orderdesk-bench-messaging-"))
    orders = Server("orders", "services.orders.wsgi:app", env, logdir, "/healthz")
    messaging = Server("messaging", "services.messaging.wsgi:app",
                       dict(env, ORDERS_URL=f"http://127.0.0.1:{orders.port}"), logdir, "/readyz")
    servers = [orders, messaging]
    errors = Errors()

    def body(load_before: str) -> bool:
        start(*servers)

        seeder = Seeder(orders.port)
        order_ids = seeder.orders(2 + conns, threads=2)  # paid and delivered: messaging is open
        agent_id = seeder.api.call("GET", "/api/agents/me", seeder.agent)["id"]
        buyer, wallet = seeder.buyer, seeder.wallet.address
        conversations = dict(zip(SIZES, order_ids))
        post_orders = order_ids[2:]
        log("seeding messages ...")
        middles = {name: seed_messages(database_url, conversations[name], n, wallet, agent_id)
                   for name, n in SIZES.items()}
        vacuum_analyze(database_url)

        from services.messaging.services import encode_cursor
        port = messaging.port
        pages = {}
        for name, oid in conversations.items():
            path = f"/api/orders/{oid}/messages"
            pages[f"{name}_first"] = http_request("GET", path, port, buyer)
            pages[f"{name}_middle"] = http_request("GET", f"{path}?after={encode_cursor(middles[name])}", port, buyer)

        log("warming up ...")
        for request in pages.values():
            latencies(port, request, max(10, per_round // 10), errors)
        samples: dict[str, list[float]] = {name: [] for name in pages}
        round_medians: dict[str, list[float]] = {name: [] for name in pages}
        for r in range(rounds):
            for name, request in pages.items():
                taken = latencies(port, request, per_round, errors)
                samples[name] += taken
                round_medians[name].append(statistics.median(taken) if taken else 0.0)
            log(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {v[-1]:.2f} ms" for n, v in round_medians.items()))

        message = b'{"content": "A benchmark message from the buyer."}'
        posts = [http_request("POST", f"/api/orders/{oid}/messages", port, buyer, message) for oid in post_orders]
        measure(port, posts, conns, min(1.0, duration), errors)  # warm-up
        post_rates = []
        for r in range(rounds):
            rate, _ = measure(port, posts, conns, duration, errors)
            post_rates.append(rate)
            log(f"  posts round {r + 1}/{rounds}: {rate:.0f}/s")

        load = f"{load_before} before, {loadavg()} after (other processes share the CPUs)"
        report(samples, round_medians, post_rates, rounds, per_round, duration, conns, args.quick, errors, load)
        return errors.count > 0

    return run_bench(body, env=env, procs=servers, logdir=logdir)


def report(samples, round_medians, post_rates, rounds, per_round, duration, conns, quick, errors, load) -> None:
    labels = {"small_first": "100 messages, first page", "small_middle": "100 messages, page from the middle",
              "large_first": "100,000 messages, first page", "large_middle": "100,000 messages, page from the middle"}
    med = {name: statistics.median(values) if values else 0.0 for name, values in samples.items()}
    print()
    print(f"Messaging: GET /api/orders/<id>/messages (buyer, 50 per page), {rounds} interleaved round(s) of "
          f"{per_round} sequential requests per figure; POST posts/s over {conns} keep-alive connections, "
          f"{duration:g} s per round")
    print(f"both servers gunicorn {' '.join(GUNICORN[:6])}")
    if quick:
        print("QUICK smoke run: the figures are not meaningful")
    print(f"machine: {machine()}; load average {load}")
    print()
    width = max(len(v) for v in labels.values())
    print(f"{'page':<{width}}  {'median ms':>9}  {'p95 ms':>7}  round medians")
    for name, values in samples.items():
        print(f"{labels[name]:<{width}}  {med[name]:>9.2f}  {p95(values):>7.2f}  "
              f"{' '.join(f'{v:.2f}' for v in round_medians[name])}")
    print()
    print(f"{'ratio large / small (medians)':<{width}}  {'value':>9}  {'target':<8}  per round")
    for kind in ("first", "middle"):
        small, large = med[f"small_{kind}"], med[f"large_{kind}"]
        ratio = large / small if small else 0.0
        verdict = "PASS" if ratio <= TARGET_RATIO else "ABOVE"
        paired = " ".join(f"{b / a:.2f}" if a else "-" for a, b in zip(round_medians[f"small_{kind}"],
                                                                        round_medians[f"large_{kind}"]))
        print(f"{kind + ' page':<{width}}  {ratio:>9.2f}  <= {TARGET_RATIO:.2f}  {verdict:<5}  {paired}")
    print()
    print(f"{'posts (buyer, with the order.message event)':<{width}}  {statistics.median(post_rates):>9.0f}/s  "
          f"rounds {' '.join(f'{v:.0f}' for v in post_rates)}")
    print()
    errors.print(" request(s) failed")


if __name__ == "__main__":
    sys.exit(main())
