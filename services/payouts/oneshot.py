"""A settlement whose transfers were paid first, recorded in one statement (PostgreSQL).

Engine.record_paid writes the same rows through a Session on SQLite, and whenever this statement
finds the event taken or the order settled already: about seven round trips and a commit, on
every payout's way to `sent`. Here one statement on an autocommit connection makes them all or
none of the settlement's: the event taken (the rest is written only if this statement took it),
the payment's posting if it is not there yet, the settlement's posting (the payouts, their rail
calls and their `sent:` postings only if this statement made it), and the entries of each
posting it made. tests/test_payouts.py runs the same cases through both ways.
"""
from __future__ import annotations

import datetime as dt

from sqlalchemy import text
from sqlalchemy.dialects import postgresql

from shared.db import Database

from . import ledger
from .models import Payout, RailCall

_STATEMENTS: dict[tuple, object] = {}
_PG = postgresql.dialect()
# the postings in order: the payment's and the settlement's are made only if the event is taken
# now (CTE `e`), each `sent:` one only if the settlement is made now (CTE `t1`)
_KINDS = ("fund", "settle")


def record(db: Database, event_id: str, now: dt.datetime, payouts: list[dict], postings: list[tuple],
           calls: list[dict]) -> tuple[bool, bool]:
    """Write what Engine.record_paid would, for `payouts` all created now (as engine.settlement
    decided them), their `postings` (payment, settlement, then one `sent:` per sent payout) and
    the finished rail `calls`. Returns (taken, settled): whether this statement took the event,
    and made the settlement. Unless both, it wrote at most the event and the payment's posting."""
    entries = [list(ledger.checked(key, posting).items()) for key, _order, _kind, posting in postings]
    columns = sorted(payouts[0])
    shape = (tuple(columns), tuple(len(e) for e in entries), len(payouts), len(calls))
    statement = _STATEMENTS.get(shape)
    if statement is None:
        statement = _STATEMENTS.setdefault(shape, _build(*shape))
    params = {"event_id": event_id, "now": now, "order_id": postings[0][1]}
    for i, (key, _order, _kind, _entries) in enumerate(postings):
        params[f"k{i}"] = key
        for j, (account, cents) in enumerate(entries[i]):
            params[f"e{i}_{j}_a"], params[f"e{i}_{j}_c"] = account, cents
    for i, payout in enumerate(payouts):
        params.update({f"p{i}_{c}": payout[c] for c in columns})
    for i, call in enumerate(calls):
        params.update({f"c{i}_{c}": call[c] for c in _CALL_COLUMNS})
    row = db.row_of(statement, params)
    return bool(row["taken"]), bool(row["settled"])


_CALL_COLUMNS = ("payout_id", "idempotency_key", "attempt", "outcome", "tx_ref", "error", "started_at", "finished_at")


def _typed(table, column: str, param: str) -> str:
    return f"CAST(:{param} AS {table.c[column].type.compile(dialect=_PG)})"


def _values(table, columns, prefix: str, rows: int) -> str:
    return ", ".join("(" + ", ".join(_typed(table, c, f"{prefix}{i}_{c}") for c in columns) + ")"
                     for i in range(rows))


def _build(columns: tuple, entry_counts: tuple, payouts: int, calls: int):
    ledger = "INSERT INTO ledger_transactions (key, order_id, kind, created_at)"
    ctes = ["e AS (INSERT INTO payouts_processed_events (id, processed_at) VALUES (:event_id, :now) "
            "ON CONFLICT (id) DO NOTHING RETURNING id)"]
    for i in range(len(entry_counts)):
        kind, after = (_KINDS[i], "e") if i < len(_KINDS) else ("sent", "t1")
        ctes.append(f"t{i} AS ({ledger} SELECT :k{i}, :order_id, '{kind}', :now FROM {after} "
                    f"ON CONFLICT (key) DO NOTHING RETURNING id)")
    entries = " UNION ALL ".join(
        f"SELECT t{i}.id, v.account, v.cents FROM t{i}, (VALUES "
        + ", ".join(f"(CAST(:e{i}_{j}_a AS VARCHAR(100)), CAST(:e{i}_{j}_c AS INTEGER))" for j in range(n))
        + ") v(account, cents)"
        for i, n in enumerate(entry_counts) if n)
    ctes.append(f"le AS (INSERT INTO ledger_entries (transaction_id, account, amount_cents) {entries})")
    payout_table = Payout.__table__
    ctes.append(f"p AS (INSERT INTO payouts ({', '.join(columns)}) SELECT * FROM (VALUES "
                f"{_values(payout_table, columns, 'p', payouts)}) v WHERE EXISTS (SELECT 1 FROM t1) RETURNING id)")
    if calls:
        ctes.append(f"c AS (INSERT INTO rail_calls ({', '.join(_CALL_COLUMNS)}) SELECT * FROM (VALUES "
                    f"{_values(RailCall.__table__, _CALL_COLUMNS, 'c', calls)}) v WHERE EXISTS (SELECT 1 FROM p))")
    return text("WITH " + ",\n".join(ctes) +
                "\nSELECT (SELECT count(*) FROM e) AS taken, (SELECT count(*) FROM t1) AS settled")
