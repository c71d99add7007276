"""Engines, sessions and the one transaction per request or task.

Views, services and models never commit: the wrapper (the Flask hooks below, or
`Database.transaction()` in tasks and scripts) owns the transaction. Work another process
must do after a commit is registered with `after_commit(session, fn)`.
"""
from __future__ import annotations

import datetime as dt
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import psycopg
from flask import Flask, g, request
from psycopg.rows import dict_row
from sqlalchemy import DateTime, Table, bindparam, create_engine, event, text
from sqlalchemy import exc as exc_
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.types import TypeDecorator


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def isoformat(value: dt.datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class UTCDateTime(TypeDecorator):
    """Aware UTC datetimes in and out, on SQLite (which keeps no zone) as on PostgreSQL."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime")
        value = value.astimezone(dt.timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        return value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None else value.astimezone(dt.timezone.utc)


def normalize_url(url: str) -> str:
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://"):]
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    return url


def make_engine(url: str) -> Engine:
    url = normalize_url(url)
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):
            # WAL lets readers run beside the one writer; foreign keys are off by default in SQLite
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn):
            # writers take the write lock up front so two of them queue instead of failing midway
            read_only = conn.get_execution_options().get("read_only", False)
            conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

        return engine
    # no pre-ping: it costs a round trip per request; a dropped connection fails one request (503)
    # and is replaced, and recycling retires connections before servers or proxies time them out
    return create_engine(url, pool_size=10, max_overflow=10, pool_recycle=1800)


class Base(DeclarativeBase):
    pass


def insert(session: Session, table):
    """An INSERT of the session's dialect, for `on_conflict_do_update` (both dialects speak it).
    SQLAlchemy compiles these anew on every execution; see insert_or_skip for a hot path."""
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    return dialect.insert(table)


def insert_or_skip(table: Table, columns: tuple[str, ...], unique: str, returning: tuple[str, ...], rows: int = 1):
    """`INSERT … ON CONFLICT (unique) DO NOTHING RETURNING …`: the row's `returning` columns, or
    no row if one with the same `unique` value is there (a concurrent insert of it is waited for).
    Plain SQL that PostgreSQL and SQLite both speak, with the columns' types on the way in and out,
    so SQLAlchemy caches its compiled form (it does not cache dialect INSERTs with ON CONFLICT).
    With `rows` > 1, one statement for that many rows, bound as `<column>_<row>` (see row_params);
    what comes back is the rows inserted, in no particular order."""
    names = [columns] if rows == 1 else [tuple(f"{c}_{i}" for c in columns) for i in range(rows)]
    values = ", ".join("(" + ", ".join(":" + name for name in row) + ")" for row in names)
    sql = (f"INSERT INTO {table.name} ({', '.join(columns)}) VALUES {values} "
           f"ON CONFLICT ({unique}) DO NOTHING RETURNING {', '.join(returning)}")
    return (text(sql).bindparams(*(bindparam(name, type_=table.c[c].type)
                                   for row in names for name, c in zip(row, columns)))
            .columns(*(table.c[c] for c in returning)))


def row_params(rows: list[dict]) -> dict:
    """The parameters of an insert_or_skip statement for several rows."""
    return {f"{column}_{i}": value for i, row in enumerate(rows) for column, value in row.items()}


def after_commit(session: Session, fn: Callable[[], None]) -> None:
    session.info.setdefault("after_commit", []).append(fn)


def _run_after_commit(session: Session) -> None:
    for fn in session.info.pop("after_commit", []):
        fn()


class Database:
    def __init__(self, url: str):
        self.url = normalize_url(url)
        self.engine = make_engine(self.url)
        self.sessionmaker = sessionmaker(self.engine, expire_on_commit=False)
        # reads need no transaction on PostgreSQL (no BEGIN/COMMIT round trips) and no write lock on SQLite
        options = {"read_only": True}
        if self.is_postgres:
            options["isolation_level"] = "AUTOCOMMIT"
        self.read_sessionmaker = sessionmaker(self.engine.execution_options(**options), expire_on_commit=False)
        self._driver_sql: dict = {}  # row_of's statements, compiled for the driver

    @property
    def is_postgres(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """One unit of work: commit on success, roll back on any exception."""
        session = self.sessionmaker()
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            session.info.pop("after_commit", None)
            raise
        finally:
            session.close()
        _run_after_commit(session)

    def row_of(self, statement, params: dict) -> dict | None:
        """Run one statement (a text() whose work is all in itself, atomic on its own) and return
        its first row as a dict, or None. On PostgreSQL it runs in autocommit on a pooled
        connection straight through the driver: no BEGIN/COMMIT round trips, and without a Session
        or a result object about half the client time. The driver's errors come out as
        SQLAlchemy's (an IntegrityError, or an OperationalError once the dropped connection is
        discarded). On SQLite it is a transaction of its own."""
        if not self.is_postgres:
            with self.transaction() as session:
                row = session.execute(statement, params).mappings().first()
                return dict(row) if row is not None else None
        sql = self._driver_sql.get(statement)
        if sql is None:
            sql = self._driver_sql[statement] = str(statement.compile(dialect=self.engine.dialect))
        fairy = self.engine.raw_connection()
        try:
            driver = fairy.driver_connection
            driver.autocommit = True
            try:
                with driver.cursor(row_factory=dict_row) as cursor:
                    cursor.execute(sql, params, prepare=True)
                    return cursor.fetchone()
            finally:
                if not driver.closed:
                    driver.autocommit = False
        except psycopg.IntegrityError as exc:
            raise exc_.IntegrityError(sql, params, exc) from exc
        except psycopg.OperationalError as exc:
            fairy.invalidate(exc)
            raise exc_.OperationalError(sql, params, exc) from exc
        finally:
            fairy.close()

    # Flask wiring: one session per request, committed only for a successful response.
    def init_app(self, app: Flask, on_commit_error: Callable[[Exception], object]) -> None:
        app.extensions["db"] = self

        @app.after_request
        def _commit(response):
            session: Session | None = g.pop("db_session", None)
            if session is None:
                return response
            try:
                if response.status_code < 400:
                    session.commit()
                else:
                    session.rollback()
            except Exception as exc:  # a conflict found at commit time is the client's 409, not a 500
                session.rollback()
                session.info.pop("after_commit", None)
                session.close()
                return on_commit_error(exc)
            session.close()
            if response.status_code < 400:
                _run_after_commit(session)
            else:
                session.info.pop("after_commit", None)
            return response

        @app.teardown_request
        def _close(_exc):
            self.discard()

    def discard(self) -> None:
        """Roll back and close the current request's session now, whatever the response will be:
        nothing it did is to be committed."""
        session: Session | None = g.pop("db_session", None)
        if session is not None:
            session.rollback()
            session.close()

    def session(self) -> Session:
        """The current request's session, opened on first use (read-only for GET and HEAD)."""
        if "db_session" not in g:
            read = request.method in ("GET", "HEAD")
            g.db_session = (self.read_sessionmaker if read else self.sessionmaker)()
        return g.db_session
