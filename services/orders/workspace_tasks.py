"""The workspaces worker (queue `workspaces`; the orders Celery app, its own process): dispatches
each generation to its agent, gives back the quota of generations nobody answered in time, and
closes workspaces at their period's end. Every step is safe to run twice or concurrently: each
re-checks its row under the order's lock."""
from __future__ import annotations

import logging

from shared import logs
from shared.db import Database, utcnow

from . import services, workspaces
from .tasks import app, runtime

log = logging.getLogger(__name__)


@app.task(name="workspaces.dispatch", acks_late=True)
def dispatch(message: dict) -> bool:
    """A `generation.created` event: tell the agent."""
    logs.order_id.set(message.get("order_id"))
    db, rt = runtime()
    with db.transaction() as session:
        return workspaces.dispatch(session, rt, message["data"]["generation_id"])


@app.task(name="workspaces.sweep", acks_late=True)
def sweep() -> dict:
    db, rt = runtime()
    return sweep_workspaces(db, rt)


def sweep_workspaces(db: Database, rt: services.Runtime, now=None) -> dict:
    """Close expired workspaces, time out unanswered generations, dispatch those whose message
    was lost; each in its own transaction so one bad row cannot hold up the rest."""
    now = now or utcnow()
    # closing first: a closed workspace's unanswered generations expire, nothing to time out or dispatch
    steps = (("closed", workspaces.expired_workspace_ids, lambda s, i: workspaces.close(s, rt, i, now)),
             ("timed_out", workspaces.overdue_ids, lambda s, i: workspaces.time_out(s, rt, i, now)),
             ("dispatched", workspaces.undispatched_ids, lambda s, i: workspaces.dispatch(s, rt, i, now)))
    counts = {}
    for name, find, step in steps:
        with db.transaction() as session:
            ids = find(session, now)
        done = 0
        for id_ in ids:
            try:
                with db.transaction() as session:
                    done += bool(step(session, id_))
            except Exception:
                log.exception("workspaces: %s %s failed; the next sweep tries again", name, id_)
        counts[name] = done
    if any(counts.values()):
        log.info("workspaces sweep: %s", counts)
    return counts
