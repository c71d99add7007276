"""The quota under real concurrency: 100 `generate` calls at once, spread over two orders
processes (gunicorn, as `make run` starts them), on a workspace with a quota of 25. Exactly 25
are accepted, 75 refused with `quota_exhausted`, and the workspace says 25 used.

On PostgreSQL (CI) the processes race on the order's row lock and the conditional UPDATE of the
quota; on SQLite the database's single writer serializes them. Both must give the same answer."""
from __future__ import annotations

import os
import threading
from collections import Counter

import requests
from sqlalchemy import func, select

from services.orders.models import Generation
from tests.support.net import GunicornProcess
from tests.test_workspaces import Workspace

CALLS, QUOTA = 100, 25


def test_100_concurrent_generate_calls_on_two_processes_reserve_exactly_the_quota(api, migrated, redis_url):
    env = {k: v for k, v in os.environ.items() if not k.endswith("DATABASE_URL")}
    env.update(DATABASE_URL=migrated.url, REDIS_URL=redis_url, RATE_LIMITS="off", LOG_LEVEL="WARNING")
    processes = [GunicornProcess("services.orders.wsgi:app", env, threads=16) for _ in range(2)]
    try:
        for process in processes:
            process.wait_ready()
        ws = Workspace(api, quota=QUOTA)
        barrier = threading.Barrier(CALLS)
        results: list[tuple[int, str | None]] = []
        lock = threading.Lock()

        def call(n: int) -> None:
            url = f"{processes[n % 2].url}/api/orders/{ws.oid}/generate"
            with requests.Session() as http:
                barrier.wait()
                response = http.post(url, headers=ws.buyer.headers, json={"prompt": f"prompt {n}"}, timeout=60)
            body = response.json()
            with lock:
                results.append((response.status_code, body.get("code")))

        threads = [threading.Thread(target=call, args=(n,)) for n in range(CALLS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)

        assert Counter(results) == {(202, None): QUOTA, (409, "quota_exhausted"): CALLS - QUOTA}, Counter(results)
        for process in processes:  # both processes see the same, whichever served the calls
            workspace = requests.get(f"{process.url}/api/orders/{ws.oid}", headers=ws.buyer.headers,
                                     timeout=10).json()["data"]["workspace"]
            assert (workspace["quota_used"], workspace["generations_pending"]) == (QUOTA, QUOTA)
        with migrated.transaction() as session:
            assert session.scalar(select(func.count()).select_from(Generation)
                                  .where(Generation.order_id == ws.oid)) == QUOTA
    finally:
        for process in processes:
            process.stop()
