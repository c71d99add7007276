"""Beat's schedule against the workers `make run` starts (services/processes.py): each entry's
message goes to a queue some worker takes, and that worker knows its task. A misnamed task or a
queue nobody takes would be dropped or pile up in production without a word."""
from __future__ import annotations

import importlib
import json
import subprocess
import sys
from functools import lru_cache

import pytest

from services.orders.tasks import app as beat_app
from services.processes import PROCESSES
from shared.settings import load

SETTINGS = load()
# how often each sweep runs, where a setting says it
INTERVALS = {
    "relay-outbox": SETTINGS.outbox_sweep_seconds,
    "fire-due-timers": SETTINGS.timer_sweep_seconds,
    "workspaces-sweep": SETTINGS.workspace_sweep_seconds,
    "webhooks-sweep": SETTINGS.webhook_sweep_seconds,
    "payouts-sweep": SETTINGS.payout_sweep_seconds,
}


def _arg(argv: tuple[str, ...], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def workers_by_queue() -> dict[str, str]:
    """queue -> the Celery app module of the worker process that takes it."""
    return {_arg(p.argv, "-Q"): _arg(p.argv, "-A") for p in PROCESSES if p.kind == "worker"}


@lru_cache(maxsize=None)
def tasks_of(module: str) -> frozenset[str]:
    """The tasks a worker started with `-A module` knows. Asked of a fresh interpreter: Celery adds
    a task made with `app.task` to every app finalized after it, so in one process that imported
    every worker's module, each app would seem to know the others' tasks."""
    out = subprocess.run([sys.executable, "-c", f"import json, {module} as m; print(json.dumps(sorted(m.app.tasks)))"],
                         capture_output=True, text=True, check=True, timeout=120).stdout
    return frozenset(json.loads(out.splitlines()[-1]))


def test_beat_runs_the_app_that_holds_the_schedule():
    (beat,) = [p for p in PROCESSES if p.kind == "beat"]
    assert importlib.import_module(_arg(beat.argv, "-A")).app is beat_app


@pytest.mark.parametrize("name", sorted(beat_app.conf.beat_schedule))
def test_each_entry_reaches_a_worker_that_knows_its_task(name):
    entry = beat_app.conf.beat_schedule[name]
    queue = entry.get("options", {}).get("queue", beat_app.conf.task_default_queue)
    workers = workers_by_queue()
    assert queue in workers, f"{name}: no worker takes queue {queue!r}"
    assert entry["task"] in tasks_of(workers[queue]), f"{name}: the {queue} worker has no task {entry['task']!r}"
    assert entry["schedule"] == INTERVALS.get(name, entry["schedule"]) and entry["schedule"] > 0


def test_every_sweep_with_a_setting_is_scheduled():
    assert set(INTERVALS) <= set(beat_app.conf.beat_schedule)
