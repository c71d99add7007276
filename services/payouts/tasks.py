"""The payouts worker's Celery tasks (queue `payouts`). Each is safe to run twice or concurrently."""
from __future__ import annotations

import logging
from functools import lru_cache

import redis

from shared.celery_app import make_celery, max_countdown
from shared.db import Database, utcnow
from shared.internal import InternalClient, Unavailable
from shared.outbox import first_sight
from shared.settings import load

from .engine import Attempt, Engine
from .models import Payout
from .rails import make_rail

log = logging.getLogger(__name__)
settings = load()
app = make_celery("payouts", settings)
app.conf.task_default_queue = "payouts"
QUEUE = "payouts"
# the sweep leaves alone what changed this recently: its own message is most likely still queued
SWEEP_GRACE_SECONDS = 30.0


@lru_cache(maxsize=1)
def engine() -> Engine:
    orders = InternalClient(settings.orders_url, settings.service_token, timeout=settings.rail_timeout_seconds)
    cache = redis.Redis.from_url(settings.redis_url, socket_timeout=2, socket_connect_timeout=2)
    return Engine(settings, Database(settings.payouts_db), orders, make_rail(settings, orders, cache))


def _send_later(payout_id: str, countdown: float | None = None) -> None:
    if countdown is not None and countdown > max_countdown(settings):
        return  # too far ahead for the broker to hold: the sweep sends it when it is due
    try:
        send.apply_async(args=[payout_id], queue=QUEUE, countdown=countdown)
    except Exception:  # the broker is down: the sweep finds the payout due and sends it
        log.warning("could not queue payout %s; the sweep will", payout_id, exc_info=True)


@app.task(name="payouts.settle_order", acks_late=True, bind=True)
def settle_order(self, message: dict) -> list[str]:
    """An order event: fund the escrow (paid), or settle the order (completed, cancelled) and
    send what it owes right here, without another trip through the queue. What the event names a
    destination for is paid first and recorded after, in one transaction with the settlement;
    anything else takes the recorded way (settle and claim, then the rail)."""
    e = engine()
    calls = e.pay_first(message, first_sight=first_sight(self.request))
    if calls is not None:
        settled = e.record_paid(message, calls)
        for payout_id, status in settled:
            if status is None:
                attempt(e, payout_id)
            else:
                followed_up(e, payout_id, status)
        return [payout_id for payout_id, _ in settled]
    due = e.take_and_claim(message)
    for item in due:
        if isinstance(item, Attempt):  # claimed with the settlement: straight to the rail
            followed_up(e, item.payout_id, e.transfer(item))
        else:
            attempt(e, item)
    return [item.payout_id if isinstance(item, Attempt) else item for item in due]


@app.task(name="payouts.send", acks_late=True)
def send(payout_id: str) -> str:
    return attempt(engine(), payout_id)


def attempt(e: Engine, payout_id: str) -> str:
    """One attempt at a payout, its report to the orders service, and a wake-up for the retry."""
    return followed_up(e, payout_id, e.send(payout_id))


def followed_up(e: Engine, payout_id: str, status: str) -> str:
    e.report(payout_id)
    if status == "pending":  # a retry is scheduled: wake up when it is due
        with e.db.transaction() as session:
            payout = session.get(Payout, payout_id)
            due = payout.next_attempt_at if payout else None
        if due is not None:
            _send_later(payout_id, countdown=max((due - utcnow()).total_seconds(), 0))
    return status


@app.task(name="payouts.retry", acks_late=True)
def retry(message: dict) -> bool:
    e = engine()
    payout_id = message["data"]["payout_id"]
    restarted = e.retry(payout_id)
    if restarted:
        e.report(payout_id)
        _send_later(payout_id)
    return restarted


@app.task(name="payouts.resume_agent", acks_late=True)
def resume_agent(message: dict) -> int:
    """The agent set a payout wallet: its blocked payouts go out now."""
    e = engine()
    resumed = e.unblock(e.blocked_ids(message["data"]["agent_id"]))
    for payout_id in resumed:
        _send_later(payout_id)
    return len(resumed)


@app.task(name="payouts.prune", acks_late=True)
def prune() -> int:
    return engine().prune(utcnow())


@app.task(name="payouts.sweep", acks_late=True)
def sweep() -> dict:
    return run_sweep(engine())


def run_sweep(e: Engine) -> dict:
    """Pick up what lost or delayed messages left: settlements not recorded, payouts due,
    blocked payouts whose agent now has a wallet, reports the orders service has not taken."""
    counts = {"recorded": 0, "due": 0, "unblocked": 0, "reported": 0}
    try:
        counts["recorded"] = e.catch_up(grace_seconds=SWEEP_GRACE_SECONDS)
    except Unavailable as exc:
        log.warning("sweep: the orders service is unavailable (%s)", exc)
    for agent_id in e.blocked_agents():
        try:
            has_wallet = bool(e.orders.get(f"/internal/agents/{agent_id}")["payout_wallet"])
        except Exception as exc:  # the orders service is down or the agent is gone: next sweep
            log.warning("sweep: cannot read agent %s (%s)", agent_id, exc)
            continue
        if has_wallet:
            for payout_id in e.unblock(e.blocked_ids(agent_id)):
                _send_later(payout_id)
                counts["unblocked"] += 1
    for payout_id in e.due_ids(utcnow(), grace_seconds=SWEEP_GRACE_SECONDS):
        _send_later(payout_id)
        counts["due"] += 1
    for payout_id in e.unreported_ids(utcnow(), grace_seconds=SWEEP_GRACE_SECONDS):
        counts["reported"] += e.report(payout_id)
    if any(counts.values()):
        log.info("payouts sweep %s", counts)
    return counts
