"""Payout latency and drain time of the payout path, against a bare Celery round trip (`bench/payouts.py`).

Starts what carries a payout, the way services/processes.py starts it (the orders service under
gunicorn, the `default` worker that runs the outbox sweep, the `payouts` worker, beat), plus a no-op
Celery worker (bench/noop_worker.py) on the same Redis, on a fresh PostgreSQL database. Seeds an
agent with a payout wallet, a buyer and delivered orders through the HTTP API, then measures:

1. payout latency: orders approved one at a time; from the approve's 200 answer to the client
   seeing the payout `sent` in the `payouts` table. By default the client is told, as the
   baseline's client is: a trigger the bench adds to its own database NOTIFYs when a payout row
   becomes `sent`, which PostgreSQL delivers when that transaction commits (`--observe poll`
   reads the row every `--poll-ms` instead, which adds half a period and the reads' load);
2. the baseline: publish a no-op task, wait (BLPOP) until the worker has run it, one at a time;
3. the ratio of the two medians, against the target (payout p50 at most 3 × the bare p50);
4. drain: approve N orders as fast as a thread pool can, time until the last payout is `sent`.

It reports, it does not gate: exit 0 whether or not the target is met, 1 if any request errored
or any payout did not reach `sent`, 2 if the setup failed.

Settings (environment): BENCH_DATABASE_URL (default postgresql://postgres@127.0.0.1:5432/
orderdesk_bench_payouts; dropped and migrated fresh each run), BENCH_REDIS_URL (default
redis://127.0.0.1:6379/14; flushed before and after), LOG_LEVEL (the services', default WARNING).
"""
from __future__ import annotations

import argparse
import http.client
import os
import statistics
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import noop_worker, payout_floor  # noqa: E402  (the baseline's and the floor's names)
from bench.api import (Api, Errors, Proc, Reader, Seeder, SetupError, bench_urls, free_port, loadavg, log,  # noqa: E402
                       machine, pct, run_bench, service_env, start, vacuum_analyze)

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/orderdesk_bench_payouts"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/14"  # not bench/api.py's 15: both may run at once
TARGET_RATIO = 3.0  # payout p50 ≤ this × bare Celery round trip p50
# Settings that would change the path measured: the sweeps stay at their defaults (so a payout
# goes the event-driven way), no injected faults, and each service's database is the bench's.
CLEARED = ("PAYOUT_SWEEP_SECONDS", "OUTBOX_SWEEP_SECONDS", "TIMER_SWEEP_SECONDS", "SANDBOX_RAIL_FAULTS",
           "FAULT_DUPLICATE_MESSAGES", "PAYOUT_RAIL")
STALL_SECONDS = 30.0  # a payout not sent after this (three sweeps) is reported as an error


# --- processes -------------------------------------------------------------------------------

def replaced(argv: tuple[str, ...], option: str, value: str) -> list[str]:
    out = list(argv)
    out[out.index(option) + 1] = value
    return out


def processes(env: dict, logdir: Path, port: int, rail_port: int) -> list[Proc]:
    """The table's orders server, default and payouts workers and beat, exactly as `make run` starts
    them except for the orders port and beat's schedule file; then the baseline worker, built by the
    table's own worker() with the flags the brief fixes (concurrency 1), and the floor's worker and
    rail, built the same way (the rail with the orders server's settings)."""
    from services import processes as table

    by_name = {p.name: p for p in table.PROCESSES}
    orders, default, payouts, beat = (by_name[n] for n in ("orders", "worker-default", "worker-payouts", "beat"))
    noop = table.worker(noop_worker.QUEUE, concurrency=1, app="bench.noop_worker")
    floor = table.worker(payout_floor.QUEUE, concurrency=1, app="bench.payout_floor")
    floor_rail = table.web("floor-rail", "bench.payout_floor:rail", rail_port)
    return [
        Proc("orders", replaced(orders.argv, "--bind", f"127.0.0.1:{port}"), env, logdir,
             f"http://127.0.0.1:{port}/healthz"),
        Proc("worker-default", list(default.argv), env, logdir),
        Proc("worker-payouts", list(payouts.argv), env, logdir),
        Proc("beat", replaced(beat.argv, "--schedule", str(logdir / "celerybeat-schedule")), env, logdir),
        Proc("worker-noop", list(noop.argv), env, logdir),
        Proc("worker-floor", list(floor.argv), env, logdir),
        Proc("floor-rail", list(floor_rail.argv), env, logdir, f"http://127.0.0.1:{rail_port}/healthz"),
    ]


def describe(procs: list[Proc]) -> str:
    def flag(argv, name, default="?"):
        return argv[argv.index(name) + 1] if name in argv else default
    parts = []
    for p in procs:
        if p.name == "orders":
            parts.append(f"orders gunicorn {flag(p.argv, '--workers')}×{flag(p.argv, '--threads')} threads")
        elif p.name.startswith("worker"):
            parts.append(f"{p.name} -c {flag(p.argv, '--concurrency')}")
        else:
            parts.append(p.name)
    return ", ".join(parts)


# --- storage -------------------------------------------------------------------------------

# The bench's observation of `sent`, in its own database only: PostgreSQL delivers a NOTIFY when
# the transaction that made the row `sent` commits, as the no-op's RPUSH reaches the baseline's
# BLPOP. The payload is the column naming what was paid (TG_ARGV[0]).
CHANNEL = "bench_sent"
SENT_NOTICES = f"""
CREATE OR REPLACE FUNCTION bench_notify_sent() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.status = 'sent' AND (TG_OP = 'INSERT' OR OLD.status IS DISTINCT FROM 'sent') THEN
    PERFORM pg_notify('{CHANNEL}', to_jsonb(NEW) ->> TG_ARGV[0]);
  END IF;
  RETURN NULL;
END $$;
CREATE TRIGGER bench_sent AFTER INSERT OR UPDATE OF status ON payouts
  FOR EACH ROW EXECUTE FUNCTION bench_notify_sent('order_id');
CREATE TRIGGER bench_sent AFTER INSERT OR UPDATE OF status ON floor_payouts
  FOR EACH ROW EXECUTE FUNCTION bench_notify_sent('id');
"""


class Watcher:
    """Waits for `sent` by LISTENing on its own connection (observe="notify"), or by reading the
    row every `poll` seconds (observe="poll"), given how to read it."""

    def __init__(self, database_url: str, observe: str, poll: float):
        import psycopg

        self.observe, self.poll = observe, poll
        self.conn = psycopg.connect(payout_floor.plain_url(database_url), autocommit=True)
        self.told: set[str] = set()  # notices taken while waiting for another one
        if observe == "notify":
            self.conn.execute(SENT_NOTICES)
            self.conn.execute(f"LISTEN {CHANNEL}")

    def close(self) -> None:
        self.conn.close()

    def wait(self, key: str, is_sent, timeout: float) -> float | None:
        """Seconds from now until `key` is seen sent (`is_sent()` reads its row), or None."""
        started = time.perf_counter()
        while True:
            if self.observe == "notify":
                if key in self.told:
                    self.told.discard(key)
                    return time.perf_counter() - started
                left = timeout - (time.perf_counter() - started)
                if left <= 0:
                    return None
                for notice in self.conn.notifies(timeout=left, stop_after=1):
                    self.told.add(notice.payload)
                continue
            if is_sent():
                return time.perf_counter() - started
            if time.perf_counter() - started > timeout:
                return None
            time.sleep(self.poll)


class Tables(Reader):
    def payout(self, order_id: str) -> tuple[str | None, object, bool]:
        """(status, sent_at, reported to the orders service) of the order's payout; None before it exists."""
        row = self.conn.execute(
            "SELECT status, sent_at, reported_version >= version FROM payouts WHERE order_id = %s AND kind = 'payout'",
            (order_id,), prepare=True).fetchone()
        return row if row else (None, None, False)

    def statuses(self) -> dict[str, int]:
        return dict(self.conn.execute("SELECT status, count(*) FROM payouts GROUP BY status", prepare=True).fetchall())

    def backlog(self) -> int:
        """Work still in flight anywhere on the path: unpublished events, order events the payouts
        worker has not taken, payouts not finished or not reported. 0 means the system is idle."""
        return self.conn.execute("""
            SELECT (SELECT count(*) FROM outbox_events WHERE published_at IS NULL)
                 + (SELECT count(*) FROM outbox_events
                    WHERE event IN ('order.paid', 'order.completed', 'order.cancelled'))
                 - (SELECT count(*) FROM payouts_processed_events)
                 + (SELECT count(*) FROM payouts WHERE status = 'pending' OR reported_version < version)
        """).fetchone()[0]

    def last_sent_at(self, order_ids: list[str]):
        return self.conn.execute("SELECT max(sent_at) FROM payouts WHERE order_id = ANY(%s)",
                                 (order_ids,)).fetchone()[0]

    def timeline(self, order_ids: list[str]) -> dict[str, dict]:
        """Per order, the path's timestamps (all from this machine's clock, UTC)."""
        rows = self.conn.execute("""
            SELECT p.order_id, e.created_at, rc.started_at, st.created_at, rc.finished_at, p.sent_at
            FROM payouts p
            JOIN outbox_events e ON e.order_id = p.order_id AND e.event = 'order.completed'
            LEFT JOIN rail_calls rc ON rc.payout_id = p.id AND rc.attempt = 1
            LEFT JOIN sandbox_transfers st ON st.idempotency_key = 'payout:' || p.id
            WHERE p.kind = 'payout' AND p.order_id = ANY(%s)
        """, (order_ids,)).fetchall()
        return {r[0]: dict(zip(MARKS, r[1:])) for r in rows}


# The timestamps timeline() reads, in path order (its columns' order); labels for the report. The
# path is the one of a payout whose destination the completion names: the rail is called first,
# then the settlement, the payout (sent) and the call are recorded in one transaction.
MARKS = ("event_created", "send_started", "transfer_recorded", "rail_answered", "sent")
MARK_LABELS = {
    "event_created": "order.completed written (approve's transaction)",
    "answered": "approve answered 200 at the client",
    "send_started": "rail called (rail_calls.started_at)",
    "transfer_recorded": "sandbox rail recorded the transfer (orders)",
    "rail_answered": "rail answer taken (rail_calls.finished_at)",
    "sent": "recording began (payouts.sent_at)",
    "observed": "seen `sent` by the client",
}


def wait_idle(tables: Tables, procs: list[Proc], what: str, timeout: float = 300) -> None:
    started = time.monotonic()
    while (left := tables.backlog()) > 0:
        for p in procs:
            p.check()
        if time.monotonic() - started > timeout:
            raise SetupError(f"{what}: {left} item(s) still in flight after {timeout:.0f} s; see the worker logs")
        time.sleep(0.05)
    log(f"{what}: idle after {time.monotonic() - started:.1f} s")


# --- measurements ----------------------------------------------------------------------------

def approve(api: Api, buyer: str, oid: str) -> None:
    """One approve; once more on a fresh connection if gunicorn had closed the idle keep-alive one
    (its 2 s keep-alive ends between phases). Had the first try gone through, the second would
    answer 409 and count as an error, so a retry cannot hide anything."""
    try:
        api.call("PATCH", f"/api/orders/{oid}", buyer, {"action": "approve"}, expect=(200,))
    except (BrokenPipeError, http.client.RemoteDisconnected):
        api.call("PATCH", f"/api/orders/{oid}", buyer, {"action": "approve"}, expect=(200,))


@dataclass
class Sample:
    order_id: str
    answered_at: float  # epoch seconds, right after the approve's 200
    observed: float | None = None  # seconds until the client saw `sent`
    by_sent_at: float | None = None  # seconds until payouts.sent_at


def payout_latency(api: Api, buyer: str, tables: Tables, watcher: Watcher, ids: list[str],
                   errors: Errors) -> list[Sample]:
    """Approve each order and wait for its payout to be `sent` before the next: latency, not
    queueing. Before the next order it also waits for the payout's report to the orders service,
    so one order's tail does not run into the next one's measurement."""
    samples = []
    for oid in ids:
        try:
            approve(api, buyer, oid)
        except (SetupError, OSError, http.client.HTTPException) as exc:
            errors.add(f"approve {oid}: {exc}")
            continue
        answered = time.perf_counter()
        sample = Sample(oid, time.time())
        samples.append(sample)
        waited = watcher.wait(oid, lambda: tables.payout(oid)[0] in ("sent", "failed", "blocked"), STALL_SECONDS)
        while True:
            status, sent_at, reported = tables.payout(oid)
            if status in ("failed", "blocked"):
                errors.add(f"payout of {oid} is {status}")
                break
            if status == "sent" and waited is not None:
                sample.observed, sample.by_sent_at = waited, sent_at.timestamp() - sample.answered_at
                if reported:
                    break
            if time.perf_counter() - answered > STALL_SECONDS:
                errors.add(f"payout of {oid} is {status or 'not created'} (reported: {reported}) "
                           f"after {STALL_SECONDS:.0f} s")
                break
            time.sleep(0.002)
    return samples


class Bare:
    """The baseline: publish a no-op task with a Celery app built like the services' own, then
    BLPOP until the worker has run it. One client and one Redis connection for the whole run."""

    def __init__(self, redis_url: str, env: dict):
        import redis

        from shared.celery_app import make_celery
        from shared.settings import load

        self.client = make_celery("bench-client", load(env))
        self.redis = redis.Redis.from_url(redis_url, socket_timeout=30)

    def close(self) -> None:
        self.client.close()
        self.redis.close()

    def trip(self, timeout: float = 10, alive=lambda: None) -> float | None:
        """Seconds for one round trip, or None if the worker ran nothing within `timeout`."""
        token = uuid.uuid4().hex
        started = time.perf_counter()
        self.client.send_task(noop_worker.TASK, args=[token], queue=noop_worker.QUEUE)
        while True:
            got = self.redis.blpop([noop_worker.DONE], timeout=1)
            elapsed = time.perf_counter() - started
            if got is not None:
                if got[1].decode() == token:
                    return elapsed
                continue  # a late run of an earlier trip that timed out
            alive()
            if elapsed > timeout:
                return None

    def trips(self, n: int, errors: Errors) -> list[float]:
        times = []
        for i in range(n):
            elapsed = self.trip()
            if elapsed is None:
                errors.add(f"no-op round trip {i}: not run within 10 s")
            else:
                times.append(elapsed)
        return times


class Floor:
    """The floor (bench/payout_floor.py): publish its event to its worker, then wait for its
    payout row to be `sent`, exactly as payout_latency() waits for a real payout."""

    def __init__(self, bare: Bare, database_url: str, watcher: Watcher):
        import psycopg

        self.client = bare.client
        self.watcher = watcher
        self.conn = psycopg.connect(database_url, autocommit=True)

    def close(self) -> None:
        self.conn.close()

    def _sent(self, payout_id: str) -> bool:
        row = self.conn.execute("SELECT status FROM floor_payouts WHERE id = %s", (payout_id,),
                                prepare=True).fetchone()
        return row is not None and row[0] == "sent"

    def trip(self, timeout: float = 10) -> float | None:
        payout_id = "pay_" + uuid.uuid4().hex[:20]
        started = time.perf_counter()
        self.client.send_task(payout_floor.TASK, args=[payout_id, "A" * 44, 4050], queue=payout_floor.QUEUE)
        waited = self.watcher.wait(payout_id, lambda: self._sent(payout_id), timeout)
        return None if waited is None else time.perf_counter() - started

    def trips(self, n: int, errors: Errors) -> list[float]:
        times = []
        for i in range(n):
            elapsed = self.trip()
            if elapsed is None:
                errors.add(f"floor payout {i}: not sent within 10 s")
            else:
                times.append(elapsed)
        return times


def drain(seeder: Seeder, tables: Tables, ids: list[str], threads: int, errors: Errors) -> dict:
    """Approve every order from a thread pool at once; time from the first approve until the last
    of their payouts is `sent` (reading their rows every 10 ms). With a backlog, the payouts sweep
    (every 10 s) joins in, as it would in production: that is part of what is measured."""
    api, buyer = seeder.api, seeder.buyer
    before = tables.statuses()
    failed_approves: list[str] = []

    def one(oid):
        try:
            approve(api, buyer, oid)
        except (SetupError, OSError, http.client.HTTPException) as exc:
            failed_approves.append(oid)
            errors.add(f"drain approve {oid}: {exc}")

    wall, started = time.time(), time.perf_counter()
    pool = ThreadPoolExecutor(threads)
    futures = [pool.submit(one, oid) for oid in ids]
    approved_in = None
    last_change, last_sent, next_log = started, -1, started + 5
    try:
        while True:
            now = time.perf_counter()
            if approved_in is None and all(f.done() for f in futures):
                approved_in = now - started
            counts = tables.statuses()
            sent = counts.get("sent", 0) - before.get("sent", 0)
            stuck = sum(counts.get(s, 0) - before.get(s, 0) for s in ("failed", "blocked"))
            if sent != last_sent:
                last_sent, last_change = sent, now
            if approved_in is not None and sent + stuck >= len(ids) - len(failed_approves):
                break
            if now - last_change > STALL_SECONDS:
                errors.add(f"drain: no payout sent for {STALL_SECONDS:.0f} s ({sent}/{len(ids)} sent)")
                break
            if now >= next_log:
                log(f"  {sent}/{len(ids)} sent after {now - started:.0f} s")
                next_log += 5
            time.sleep(0.01)
        elapsed = time.perf_counter() - started
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    if stuck:
        errors.add(f"drain: {stuck} payout(s) failed or blocked")
    last = tables.last_sent_at(ids)
    return {"orders": len(ids), "sent": sent, "threads": threads, "seconds": elapsed,
            "approved_in": approved_in or elapsed, "by_sent_at": (last.timestamp() - wall) if last else None}


# --- the run ---------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run (figures not meaningful)")
    parser.add_argument("--orders", type=int, help="orders for the latency figure (default 500, quick 20)")
    parser.add_argument("--trips", type=int, help="bare no-op round trips (default 400, quick 40)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds of the three latencies (default 25, quick 4)")
    parser.add_argument("--drain", type=int, help="orders approved at once for the drain (default 1000, quick 50)")
    parser.add_argument("--threads", type=int, default=8, help="approving threads in the drain (default 8)")
    parser.add_argument("--observe", choices=("notify", "poll"), default="notify",
                        help="how the client sees a payout `sent`: told at commit (default) or by reading it")
    parser.add_argument("--poll-ms", type=float, default=2.0, help="with --observe poll: the read interval (default 2)")
    args = parser.parse_args(argv)
    n_orders = args.orders if args.orders is not None else (20 if args.quick else 500)
    n_trips = args.trips if args.trips is not None else (40 if args.quick else 400)
    n_drain = args.drain if args.drain is not None else (50 if args.quick else 1000)
    rounds = max(1, args.rounds if args.rounds is not None else (4 if args.quick else 25))
    warm_orders = 3 if args.quick else 20
    warm_trips = 10 if args.quick else 50
    poll = args.poll_ms / 1000

    database_url, redis_url = bench_urls(DEFAULT_DATABASE_URL, DEFAULT_REDIS_URL)
    port, rail_port = free_port(), free_port()
    env = service_env(database_url, redis_url, CLEARED, ORDERS_URL=f"http://127.0.0.1:{port}",
                      LOG_LEVEL=os.environ.get("LOG_LEVEL", "WARNING"), PYTHONUNBUFFERED="1",
                      **{payout_floor.RAIL_URL: f"http://127.0.0.1:{rail_port}"})
    logdir = Path(tempfile.mkdtemp(prefix="orderdesk-bench-payouts-"))
    procs = processes(env, logdir, port, rail_port)
    errors = Errors()
    opened: list = []  # run_bench closes them before it stops the processes

    def alive() -> None:
        for p in procs:
            p.check()

    def body(load_before: str) -> bool:
        start(*procs)
        payout_floor.create_tables(payout_floor.plain_url(database_url))
        tables = Tables(database_url)
        opened.append(tables)
        bare = Bare(redis_url, env)
        opened.append(bare)
        if bare.trip(timeout=60, alive=alive) is None:  # the first one waits for the worker to start
            raise SetupError(f"the no-op worker ran nothing in 60 s; see {procs[-1].log}")
        watcher = Watcher(database_url, args.observe, poll)
        opened.append(watcher)
        floor = Floor(bare, payout_floor.plain_url(database_url), watcher)
        opened.append(floor)
        if floor.trip(timeout=60) is None:
            raise SetupError(f"the floor's worker sent nothing in 60 s; see {logdir}")

        seeder = Seeder(port, payout_wallet=True)
        ids = seeder.orders(warm_orders + n_orders + n_drain)
        warm, timed, drained = ids[:warm_orders], ids[warm_orders:warm_orders + n_orders], ids[warm_orders + n_orders:]
        wait_idle(tables, procs, "after seeding")
        vacuum_analyze(database_url)

        log(f"warming up: {warm_orders} payouts, {warm_trips} no-op round trips ...")
        payout_latency(seeder.api, seeder.buyer, tables, watcher, warm, errors)
        bare.trips(warm_trips, errors)
        floor.trips(warm_trips, errors)
        # the three interleaved in rounds (each round in another order), so all see the same machine
        log(f"payout latency over {n_orders} orders one at a time, {n_trips} bare round trips and "
            f"{n_trips} floor payouts, in {rounds} interleaved rounds ...")
        samples: list[Sample] = []
        trips: list[float] = []
        floors: list[float] = []
        measures = [lambda i: samples.extend(payout_latency(seeder.api, seeder.buyer, tables, watcher,
                                                             timed[share(n_orders, i, rounds)], errors)),
                    lambda i: trips.extend(bare.trips(len(range(n_trips)[share(n_trips, i, rounds)]), errors)),
                    lambda i: floors.extend(floor.trips(len(range(n_trips)[share(n_trips, i, rounds)]), errors))]
        for i in range(rounds):
            for k in range(len(measures)):
                measures[(i + k) % len(measures)](i)
        timeline = tables.timeline(timed)
        load_mid = loadavg()

        wait_idle(tables, procs, "before the drain")
        log(f"drain: approving {n_drain} orders with {args.threads} threads ...")
        drained_result = drain(seeder, tables, drained, args.threads, errors) if drained else None
        alive()

        load = f"{load_before} before, {load_mid} after the latency phase, {loadavg()} after (shared machine)"
        report(args, procs, samples, trips, floors, timeline, drained_result, errors, load)
        return errors.count > 0

    return run_bench(body, env=env, procs=procs, logdir=logdir, closing=opened)


def share(n: int, i: int, rounds: int) -> slice:
    """Round i's part of n items shared out over `rounds` rounds."""
    return slice(n * i // rounds, n * (i + 1) // rounds)


def report(args, procs, samples: list[Sample], trips: list[float], floors: list[float], timeline: dict,
           drained: dict | None, errors: Errors, load: str) -> None:
    ms = 1000
    seen = "NOTIFY at commit" if args.observe == "notify" else f"seen by polling ({args.poll_ms:g} ms)"
    observed = [s.observed for s in samples if s.observed is not None]
    by_sent_at = [s.by_sent_at for s in samples if s.by_sent_at is not None]

    def row(label, values):
        if not values:
            return f"{label:<36}  {'-':>7}"
        return (f"{label:<36}  {statistics.median(values) * ms:>7.1f}  {pct(values, 99) * ms:>7.1f}  "
                f"{statistics.fmean(values) * ms:>7.1f}  {max(values) * ms:>7.1f}  {len(values):>5}")

    print()
    print("Payout path: approve answered (200) -> payout `sent`, one order at a time, against a bare")
    print("Celery round trip (publish a no-op task, BLPOP until its worker ran it) on the same Redis")
    if args.quick:
        print("QUICK smoke run: the figures are not meaningful")
    print(f"processes: {describe(procs)}")
    print(f"machine: {machine()}; load average {load}")
    print()
    print(f"{'latency (ms)':<36}  {'p50':>7}  {'p99':>7}  {'mean':>7}  {'max':>7}  {'n':>5}")
    print(row(f"payout, {seen}", observed))
    print(row("payout, by payouts.sent_at", by_sent_at))
    print(row("bare Celery no-op round trip", trips))
    print(row(f"floor payout, {seen}", floors))
    print()
    if observed and trips:
        ratio = statistics.median(observed) / statistics.median(trips)
        verdict = "PASS" if ratio <= TARGET_RATIO else "ABOVE"
        print(f"{'ratio payout p50 / bare p50':<36}  {ratio:>7.2f}  target <= {TARGET_RATIO:.2f}  {verdict}")
    if floors and trips:
        print(f"{'ratio floor p50 / bare p50':<36}  {statistics.median(floors) / statistics.median(trips):>7.2f}"
              "  (the least any payout does, bench/payout_floor.py)")
    if observed and floors:
        print(f"{'ratio payout p50 / floor p50':<36}  {statistics.median(observed) / statistics.median(floors):>7.2f}")
    print()

    # Each order's path as offsets from its approve's answer; a step is the time since the line above.
    offsets: dict[str, list[float]] = {}
    steps: dict[str, list[float]] = {}
    order = ["event_created", "answered", *MARKS[1:], "observed"]
    for s in samples:
        marks = timeline.get(s.order_id)
        if marks is None or s.observed is None:
            continue
        t = {k: v.timestamp() for k, v in marks.items() if v is not None}
        t["answered"], t["observed"] = s.answered_at, s.answered_at + s.observed
        previous = None
        for mark in order:
            if mark in t:
                offsets.setdefault(mark, []).append(t[mark] - s.answered_at)
                if previous is not None:
                    steps.setdefault(mark, []).append(t[mark] - t[previous])
                previous = mark
    if offsets:
        print("where the time goes: ms from the approve's answer at the client (median over the orders),")
        print("and each step since the line above (median and p99); timestamps from the tables")
        print(f"  {'':<50}  {'at':>7}  {'step':>7}  {'p99':>7}")
        for mark in order:
            if mark in offsets:
                step = steps.get(mark)
                text = f"  {statistics.median(step) * ms:>7.1f}  {pct(step, 99) * ms:>7.1f}" if step else ""
                print(f"  {MARK_LABELS[mark]:<50}  {statistics.median(offsets[mark]) * ms:>7.1f}{text}")
        print()

    if drained:
        rate = drained["sent"] / drained["seconds"] if drained["seconds"] else 0.0
        print(f"drain: {drained['orders']} delivered orders approved at once from {drained['threads']} threads "
              f"(all answered after {drained['approved_in']:.1f} s)")
        by_sent_at_text = f"; by payouts.sent_at {drained['by_sent_at']:.1f} s" if drained["by_sent_at"] else ""
        print(f"  last payout seen sent after {drained['seconds']:.1f} s{by_sent_at_text}: {rate:.1f} payouts/s "
              f"({drained['sent']}/{drained['orders']} sent)")
        print()
    errors.print()


if __name__ == "__main__":
    sys.exit(main())
