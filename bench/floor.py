"""The floor of bench/api.py's approve: the least that any honest approve must do in this stack
(Flask, psycopg 3, PostgreSQL, Redis), served by gunicorn exactly like the orders service, so its
throughput says what the best possible Python approve could reach on this machine.

`PATCH /orders/<id> {"action": "approve"}`:
1. authenticates the caller: its bearer token looked up in an in-process dict (a session cache hit);
2. parses the JSON body and requires the approve action;
3. in one durable transaction on this thread's own connection, by default in ONE round trip:
   moves the buyer's delivered order to `completed` (a conditional `UPDATE ... RETURNING`),
   inserts its timeline entry and its `order.completed` outbox event (with the payout due),
   counts the completion on the agent; if the order is not the buyer's delivered order, nothing
   is written (409). How it is sent, BENCH_FLOOR_MODE:
   - `cte` (the default, the fastest measured): one statement, `WITH o AS (UPDATE ... RETURNING),
     t AS (INSERT timeline ... FROM o), x AS (INSERT outbox ... FROM o), a AS (UPDATE agents ...
     FROM o) SELECT ... FROM o, x`, on an autocommit connection: its own transaction, committed
     durably (the server's default synchronous_commit) before the answer;
   - `pipeline`: the four statements in psycopg's pipeline mode with one Sync (an implicit
     transaction, committed at the Sync); the three after the UPDATE find the order's row only
     if this transaction's UPDATE completed it (its xmin);
   - `statements`: the earlier floor, one statement per round trip (BEGIN, the four, COMMIT);
4. after the commit, publishes the event: one Redis `LPUSH` of its JSON;
5. answers with a small JSON view of the order.

No ORM, no schema, no logging, no cached views: what it leaves out, a real approve may spend
its time on; what it keeps, every approve must pay. The bench calls `setup` (tables, the buyer's
session, the warm-up's orders) on its migrated database and `seed` for the measured rounds; the
app reads BENCH_FLOOR_DATABASE_URL (a libpq URL) and BENCH_FLOOR_REDIS_URL.
"""
from __future__ import annotations

import json
import os
import secrets
import threading

import psycopg
import redis
from flask import Flask, jsonify, request

BUYER = "FloorBuyer1111111111111111111111111111111111"
AGENT = "agt_floor0000000000000000"
PRICE_CENTS = 4500  # the bench's fixed-price service: $45.00
FEE_BPS = 1000  # the platform's default fee
EVENTS = "floor:events"  # the Redis list the events are published to
# The buyer's session, as a session cache holds it once the token was verified.
SESSIONS = {"floor-" + "7Kx2QmV9rT4wLp8ZbN3cYd6F": BUYER}

app = Flask(__name__)
_local = threading.local()  # one database connection per gunicorn thread
_redis: redis.Redis | None = None


def _db() -> psycopg.Connection:
    conn = getattr(_local, "conn", None)
    if conn is None or conn.closed:
        conn = _local.conn = psycopg.connect(os.environ["BENCH_FLOOR_DATABASE_URL"],
                                             autocommit=MODE != "statements")
    return conn


def _publisher() -> redis.Redis:
    global _redis
    if _redis is None:  # one client (and connection pool) per worker process, made after the fork
        _redis = redis.Redis.from_url(os.environ["BENCH_FLOOR_REDIS_URL"])
    return _redis


def _usd(cents: int) -> str:
    return f"{cents // 100}.{cents % 100:02d}"


def _event(order_id: str, agent_id: str, price_cents: int) -> tuple[str, str]:
    """(event id, its JSON): the `order.completed` event with the payout the agent is due."""
    fee = (price_cents * FEE_BPS + 5000) // 10_000  # half up to the cent
    event_id = "evt_" + secrets.token_hex(10)
    payload = json.dumps({"id": event_id, "event": "order.completed", "order_id": order_id, "data": {
        "action": "approve", "from": "delivered", "to": "completed", "held_usd": _usd(price_cents),
        "payout_due": {"id": "pay_" + secrets.token_hex(10), "agent_id": agent_id, "gross_usd": _usd(price_cents),
                       "fee_usd": _usd(fee), "amount_usd": _usd(price_cents - fee)}}})
    return event_id, payload


@app.get("/healthz")
def healthz():
    return jsonify({"success": True})


@app.patch("/orders/<order_id>")
def approve(order_id: str):
    auth = request.headers.get("Authorization", "")
    buyer = SESSIONS.get(auth[7:]) if auth.startswith("Bearer ") else None
    if buyer is None:
        return jsonify({"success": False, "error": "unauthorized"}), 401
    body = request.get_json(silent=True)
    if not isinstance(body, dict) or body.get("action") != "approve":
        return jsonify({"success": False, "error": "bad request"}), 400

    conn = _db()
    try:
        row = TRANSACTIONS[MODE](conn, order_id, buyer)
    except BaseException:
        try:
            conn.rollback()
        except psycopg.Error:
            conn.close()  # a broken connection: this thread's next request opens another
        raise
    if row is None:  # not the buyer's, or not delivered (any more): nothing was written
        return jsonify({"success": False, "error": "conflict"}), 409
    oid, agent_id, price_cents, version, status, payload = row
    _publisher().lpush(EVENTS, payload)  # after the commit: consumers never see an event that did not happen
    return jsonify({"success": True, "data": {"id": oid, "status": status, "version": version,
                                              "agent_id": agent_id, "price_usd": _usd(price_cents)}})


# --- the transaction, one way per mode ---------------------------------------------------------
# Each returns (id, agent_id, price_cents, version, status, the event's JSON) once committed, or
# None, having written nothing, when the order is not the buyer's delivered order.

_COMPLETE = ("UPDATE floor_orders SET status = 'completed', version = version + 1, updated_at = now(), "
             "completed_at = now() WHERE id = %(id)s AND status = 'delivered' AND buyer = %(buyer)s")


def _usd_sql(cents: str) -> str:
    """SQL for `_usd`: whole dollars, a point, two digits of cents."""
    return f"(({cents}) / 100)::text || '.' || lpad((({cents}) %% 100)::text, 2, '0')"  # %% : psycopg's %


# The `order.completed` event with the payout due, built from the completed row `o` (id, agent_id,
# price_cents, fee): the same fields as `_event`'s, stored as jsonb and published as its text.
_FEE_SQL = f"(price_cents * {FEE_BPS} + 5000) / 10000"  # half up to the cent, as in `_event`
_PAYLOAD_SQL = (
    "jsonb_build_object('id', %(event_id)s::text, 'event', 'order.completed', 'order_id', o.id, "
    "'data', jsonb_build_object('action', 'approve', 'from', 'delivered', 'to', 'completed', "
    f"'held_usd', {_usd_sql('o.price_cents')}, 'payout_due', jsonb_build_object("
    "'id', %(payout_id)s::text, 'agent_id', o.agent_id, "
    f"'gross_usd', {_usd_sql('o.price_cents')}, 'fee_usd', {_usd_sql('o.fee')}, "
    f"'amount_usd', {_usd_sql('o.price_cents - o.fee')})))")


def _ids(order_id: str, buyer: str) -> dict:
    return {"id": order_id, "buyer": buyer, "event_id": "evt_" + secrets.token_hex(10),
            "payout_id": "pay_" + secrets.token_hex(10)}


def _statements(conn: psycopg.Connection, order_id: str, buyer: str):
    """One statement per round trip (BEGIN, four statements, COMMIT: six round trips); the event
    built in Python once the order's row is back."""
    with conn.cursor() as cur:
        cur.execute(_COMPLETE + " RETURNING id, agent_id, price_cents, version, status",
                    {"id": order_id, "buyer": buyer})
        row = cur.fetchone()
        if row is None:
            conn.rollback()
            return None
        oid, agent_id, price_cents, version, status = row
        cur.execute("INSERT INTO floor_timeline (order_id, at, actor, action, from_status, to_status) "
                    "VALUES (%s, now(), %s, 'approve', 'delivered', 'completed')", (oid, buyer))
        event_id, payload = _event(oid, agent_id, price_cents)
        cur.execute("INSERT INTO floor_outbox (id, event, order_id, payload, created_at) "
                    "VALUES (%s, 'order.completed', %s, %s::jsonb, now())", (event_id, oid, payload))
        # last, as the real approve does: the agent's row lock is held only until the commit
        cur.execute("UPDATE floor_agents SET completed_orders = completed_orders + 1 WHERE id = %s", (agent_id,))
    conn.commit()  # durable: the server's default synchronous_commit
    return oid, agent_id, price_cents, version, status, payload


# The order's row as this transaction's UPDATE left it: its xmin is this transaction's id. Without
# that UPDATE (0 rows) no id is assigned and `pg_current_xact_id_if_assigned()` is NULL: no row.
_COMPLETED_HERE = (f"(SELECT id, agent_id, price_cents, {_FEE_SQL} AS fee FROM floor_orders "
                   "WHERE id = %(id)s AND xmin = pg_current_xact_id_if_assigned()::xid) o")
_PIPELINE_TIMELINE = ("INSERT INTO floor_timeline (order_id, at, actor, action, from_status, to_status) "
                      f"SELECT o.id, now(), %(buyer)s, 'approve', 'delivered', 'completed' FROM {_COMPLETED_HERE}")
_PIPELINE_OUTBOX = ("INSERT INTO floor_outbox (id, event, order_id, payload, created_at) "
                    f"SELECT %(event_id)s, 'order.completed', o.id, {_PAYLOAD_SQL}, now() FROM {_COMPLETED_HERE} "
                    "RETURNING payload::text")
_PIPELINE_AGENT = ("UPDATE floor_agents SET completed_orders = completed_orders + 1 "
                   f"FROM {_COMPLETED_HERE} WHERE floor_agents.id = o.agent_id")


def _pipeline(conn: psycopg.Connection, order_id: str, buyer: str):
    """The four statements in psycopg's pipeline mode, sent together with one Sync: one wait for all
    the answers. On this autocommit connection the statements up to the Sync are one implicit
    transaction, committed at the Sync (durably, the same commit as COMMIT's) or rolled back whole
    if any fails. (With autocommit off psycopg sends BEGIN with a Sync of its own first: two round
    trips.) The three after the UPDATE cannot wait for its answer, so each finds the order's row
    only if this transaction's UPDATE completed it."""
    params = _ids(order_id, buyer)
    with conn.cursor() as order, conn.cursor() as outbox, conn.cursor() as other:
        with conn.pipeline():  # leaving the block sends the Sync and reads every answer
            order.execute(_COMPLETE + " RETURNING id, agent_id, price_cents, version, status", params)
            other.execute(_PIPELINE_TIMELINE, params)
            outbox.execute(_PIPELINE_OUTBOX, params)
            other.execute(_PIPELINE_AGENT, params)
        row = order.fetchone()
        return None if row is None else (*row, outbox.fetchone()[0])


# The whole transition as one statement: the timeline, outbox and agent writes read the UPDATE's
# RETURNING rows, so they happen exactly when it completed the order.
_CTE = (f"WITH o AS ({_COMPLETE} RETURNING id, agent_id, price_cents, version, status, {_FEE_SQL} AS fee), "
        "t AS (INSERT INTO floor_timeline (order_id, at, actor, action, from_status, to_status) "
        "SELECT o.id, now(), %(buyer)s, 'approve', 'delivered', 'completed' FROM o), "
        "x AS (INSERT INTO floor_outbox (id, event, order_id, payload, created_at) "
        f"SELECT %(event_id)s, 'order.completed', o.id, {_PAYLOAD_SQL}, now() FROM o RETURNING payload), "
        "a AS (UPDATE floor_agents SET completed_orders = completed_orders + 1 FROM o "
        "WHERE floor_agents.id = o.agent_id) "
        "SELECT o.id, o.agent_id, o.price_cents, o.version, o.status, x.payload::text FROM o, x")


def _cte(conn: psycopg.Connection, order_id: str, buyer: str):
    """The one statement on this autocommit connection: its own transaction, committed (durably, the
    same commit as COMMIT's) before the server answers: one round trip, no BEGIN or COMMIT."""
    with conn.cursor() as cur:
        cur.execute(_CTE, _ids(order_id, buyer))
        return cur.fetchone()


TRANSACTIONS = {"statements": _statements, "pipeline": _pipeline, "cte": _cte}
DEFAULT_MODE = "cte"  # the fastest (docs/performance.md): the floor is the least an approve can do
MODE = os.environ.get("BENCH_FLOOR_MODE", DEFAULT_MODE)
if MODE not in TRANSACTIONS:
    raise SystemExit(f"BENCH_FLOOR_MODE must be one of {', '.join(TRANSACTIONS)}, not {MODE!r}")


# --- the bench's side --------------------------------------------------------------------------

SCHEMA = """
CREATE TABLE floor_agents (id text PRIMARY KEY, completed_orders int NOT NULL DEFAULT 0);
CREATE TABLE floor_orders (
    id text PRIMARY KEY, buyer text NOT NULL, agent_id text NOT NULL,
    status text NOT NULL, version int NOT NULL, price_cents bigint NOT NULL,
    created_at timestamptz NOT NULL, updated_at timestamptz NOT NULL, completed_at timestamptz);
CREATE INDEX floor_orders_buyer_created ON floor_orders (buyer, created_at);
CREATE TABLE floor_timeline (
    id bigserial PRIMARY KEY, order_id text NOT NULL, at timestamptz NOT NULL,
    actor text NOT NULL, action text NOT NULL, from_status text, to_status text NOT NULL);
CREATE INDEX floor_timeline_order ON floor_timeline (order_id);
CREATE TABLE floor_outbox (
    id text PRIMARY KEY, event text NOT NULL, order_id text NOT NULL, payload jsonb NOT NULL,
    created_at timestamptz NOT NULL);
CREATE INDEX floor_outbox_created ON floor_outbox (created_at);
"""


def seed(database_url: str, n: int) -> list[str]:
    """`n` new delivered orders of the buyer with the agent; their ids (random, as real ids are)."""
    ids = ["ord_" + secrets.token_hex(10) for _ in range(n)]
    with psycopg.connect(database_url) as conn:  # one transaction, committed on leaving
        conn.execute("INSERT INTO floor_orders (id, buyer, agent_id, status, version, price_cents, created_at, "
                     "updated_at) SELECT unnest(%s::text[]), %s, %s, 'delivered', 3, %s, now(), now()",
                     (ids, BUYER, AGENT, PRICE_CENTS))
    return ids


def setup(database_url: str, orders: int) -> tuple[str, list[str]]:
    """Create the floor's tables in the bench's (fresh) database, its agent and `orders` delivered
    orders; returns the buyer's bearer token and those orders' ids."""
    with psycopg.connect(database_url) as conn:
        conn.execute(SCHEMA)
        conn.execute("INSERT INTO floor_agents (id) VALUES (%s)", (AGENT,))
    token, = SESSIONS
    return token, seed(database_url, orders)
