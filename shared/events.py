"""Who consumes which event: the one routing table the outbox relay reads.

A consumer is a Celery task (by name) on its own queue. Consumers may not be running yet
(their issue has not landed): their messages wait in the queue meanwhile.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

QUEUES = ("default", "media", "payouts", "workspaces", "webhooks")

ORDER_EVENTS = frozenset({
    "order.created", "order.quoted", "order.accepted", "order.paid", "order.started",
    "order.delivered", "order.revision_requested", "order.disputed", "order.completed",
    "order.cancelled", "order.payout_sent", "order.payout_failed", "order.refund_sent", "order.refund_failed",
    "order.message",  # a message on the order, from the messaging service's outbox
    "order.generation_requested",  # a workspace's buyer asked for a generation (dispatched to the agent)
})


@dataclass(frozen=True)
class Subscription:
    task: str
    queue: str
    events: frozenset
    # a finer filter on (event, data), so a consumer is not sent what it would only drop
    when: Callable[[str, dict], bool] | None = None


def buyers_news(event: str, data: dict) -> bool:
    """A completion or cancellation is the buyer's news when it settles a dispute; a message
    when the agent wrote it (services/orders/notifications.py says what each one tells)."""
    if event in ("order.completed", "order.cancelled"):
        return data.get("action") == "resolve"
    if event == "order.message":
        return data.get("sender_type") == "agent"
    return True


def agents_news(event: str, data: dict) -> bool:
    """Every order event, except the agent's own messages coming back to it."""
    return not (event == "order.message" and data.get("sender_type") == "agent")


SUBSCRIPTIONS = (
    # escrow is funded on payment; money moves on completion (payout) and on cancellation of a
    # paid order (refund); a failed payout can be retried; a blocked one resumes with a wallet
    Subscription("payouts.settle_order", "payouts", frozenset({"order.paid", "order.completed", "order.cancelled"})),
    Subscription("payouts.retry", "payouts", frozenset({"payout.retry_requested"})),
    Subscription("payouts.resume_agent", "payouts", frozenset({"agent.payout_wallet_set"})),
    # image deliverables get their watermarked previews (and URL images are fetched)
    Subscription("media.process_delivery", "media",
                 frozenset({"order.delivered", "media.retry_requested", "generation.completed"})),
    # a workspace's generation requests are dispatched to the agent
    Subscription("workspaces.dispatch", "workspaces", frozenset({"generation.created"})),
    # agents hear about every order event
    Subscription("webhooks.deliver_event", "webhooks", ORDER_EVENTS, agents_news),
    # buyers read what happened on their orders
    Subscription("orders.notify_buyer", "default", frozenset({
        "order.quoted", "order.delivered", "order.completed", "order.cancelled", "order.refund_sent",
        "order.message"}), buyers_news),
)


def consumers(event: str, data: dict | None = None) -> list[Subscription]:
    return [s for s in SUBSCRIPTIONS if event in s.events and (s.when is None or s.when(event, data or {}))]
