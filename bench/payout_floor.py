"""The floor of bench/payouts.py: the least any exactly-once payout must do after its event is
published, with nothing of Order desk's code in it, measured the way a payout is.

A worker built like the services' own (shared.celery_app, started through services.processes
with concurrency 1, as the bench's no-op worker is) takes the event and
1. calls the rail over HTTP (one POST through a urllib3 pool, as the services' internal client
   does) to a gunicorn app started with the orders service's settings, which records the transfer
   once per key (one INSERT … ON CONFLICT DO NOTHING and a durable commit), as any rail must;
2. records the payout sent (one INSERT and a durable commit).
The bench sees `sent` by polling the row, as it sees a real payout's.

Order desk also records the payout and its attempt before the call (so an attempt that died is
on record), keeps a double-entry ledger, and goes through its web framework and ORM; the floor
does none of that. It relies on the rail's key alone: a crash before step 2 is redelivered and
calls again with the same key. No exactly-once payout can do less than a queue hop, a durable
transfer behind an HTTP call, and a durable record of it.

celery -A bench.payout_floor worker -Q bench_floor ...   (the worker)
gunicorn bench.payout_floor:rail                         (the rail)
"""
from __future__ import annotations

import json
import os
import secrets
import threading
from functools import lru_cache

import psycopg
import urllib3
from flask import Flask, jsonify, request

from shared import logs
from shared.celery_app import make_celery
from shared.settings import load

QUEUE = "bench_floor"
TASK = "bench.floor_payout"
RAIL_URL = "BENCH_FLOOR_RAIL_URL"  # the environment variable naming the rail's address

SCHEMA = """
DROP TABLE IF EXISTS floor_payouts, floor_transfers;
CREATE TABLE floor_payouts (id text PRIMARY KEY, amount_cents bigint NOT NULL, destination text NOT NULL,
                            status text NOT NULL, tx_ref text, created_at timestamptz NOT NULL,
                            sent_at timestamptz);
CREATE TABLE floor_transfers (tx_ref text PRIMARY KEY, idempotency_key text NOT NULL UNIQUE,
                              destination text NOT NULL, amount_cents bigint NOT NULL,
                              created_at timestamptz NOT NULL);
"""

settings = load()
app = make_celery("bench-floor", settings)
logs.configure("bench-floor-worker", settings.log_level)


def create_tables(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(SCHEMA)


def plain_url(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


_local = threading.local()


def _conn() -> psycopg.Connection:
    """One connection per thread (gunicorn's threads; the worker's one process), kept open."""
    conn = getattr(_local, "conn", None)
    if conn is None or conn.closed:
        conn = _local.conn = psycopg.connect(plain_url(os.environ["DATABASE_URL"]))
    return conn


@lru_cache(maxsize=1)
def _rail_pool() -> urllib3.HTTPConnectionPool:
    return urllib3.connection_from_url(os.environ[RAIL_URL], maxsize=4, retries=False,
                                       timeout=urllib3.Timeout(connect=5, read=5))


@app.task(name=TASK, acks_late=True)
def floor_payout(payout_id: str, destination: str, amount_cents: int) -> None:
    answer = _rail_pool().urlopen("POST", "/rail", headers={"Content-Type": "application/json"}, body=json.dumps(
        {"idempotency_key": f"payout:{payout_id}", "to": destination, "amount_cents": amount_cents}).encode())
    tx_ref = json.loads(answer.data)["data"]["tx_ref"]
    conn = _conn()
    with conn.transaction():
        conn.execute("INSERT INTO floor_payouts (id, amount_cents, destination, status, tx_ref, created_at, sent_at) "
                     "VALUES (%s, %s, %s, 'sent', %s, now(), now()) ON CONFLICT (id) DO NOTHING",
                     (payout_id, amount_cents, destination, tx_ref), prepare=True)


rail = Flask(__name__)


@rail.get("/healthz")
def healthz():
    return jsonify({"success": True, "data": {"status": "ok"}})


@rail.post("/rail")
def rail_transfer():
    body = request.get_json()
    conn = _conn()
    with conn.transaction():
        row = conn.execute(
            "INSERT INTO floor_transfers (tx_ref, idempotency_key, destination, amount_cents, created_at) "
            "VALUES (%s, %s, %s, %s, now()) ON CONFLICT (idempotency_key) DO NOTHING RETURNING tx_ref",
            ("sbx_" + secrets.token_hex(32), body["idempotency_key"], body["to"], body["amount_cents"]),
            prepare=True).fetchone()
        if row is None:
            row = conn.execute("SELECT tx_ref FROM floor_transfers WHERE idempotency_key = %s",
                               (body["idempotency_key"],), prepare=True).fetchone()
    return jsonify({"success": True, "data": {"tx_ref": row[0]}}), 201
