"""Celery task messages written to the Redis broker directly, many in one round trip.

Celery's `send_task` builds each message through kombu's producer machinery and sends it on its
own: about a third of a millisecond per message here, once per consumer of each event. A message
is only a JSON document pushed onto the queue's list, so the outbox builds the same document
itself (Celery's task protocol 2, as kombu's Redis transport stores it; tests/test_broker.py
holds it against what `send_task` writes) and pushes all of a commit's messages in one pipeline. Workers read them like any other: they are the same bytes.
"""
from __future__ import annotations

import base64
import json
import os
import socket
import uuid
from typing import NamedTuple

import redis

_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
_HOST = socket.gethostname()


class Task(NamedTuple):
    """A task to send: its name, queue and arguments, an id (a fresh one by default) and extra
    headers (the request id)."""
    name: str
    queue: str
    args: list
    kwargs: dict | None = None
    id: str | None = None
    headers: dict | None = None


def task_message(task: Task) -> str:
    """One task message (priority 0), serialised as kombu's Redis transport keeps it in the
    queue's list."""
    task_id = task.id or str(uuid.uuid4())
    body = json.dumps([task.args, task.kwargs or {}, _EMBED]).encode()
    return json.dumps({
        "body": base64.b64encode(body).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py", "task": task.name, "id": task_id, "shadow": None, "eta": None, "expires": None,
            "group": None, "group_index": None, "retries": 0, "timelimit": [None, None], "root_id": task_id,
            "parent_id": None, "argsrepr": f"<{len(task.args)} argument(s)>",
            "kwargsrepr": repr(task.kwargs or {}),
            "origin": f"gen{os.getpid()}@{_HOST}", "ignore_result": None, "replaced_task_nesting": 0,
            "stamped_headers": None, "stamps": {}, **(task.headers or {}),
        },
        "properties": {
            "correlation_id": task_id, "reply_to": None, "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": task.queue}, "priority": 0,
            "body_encoding": "base64", "delivery_tag": str(uuid.uuid4()),
        },
    })


class Publisher:
    """Pushes task messages onto their queues' lists, all of one batch in one pipeline. With
    `copies` > 1 (the FAULT_DUPLICATE_MESSAGES test fault) each message goes out that many times,
    each copy a message of its own, as a broker's redelivery would be."""

    def __init__(self, broker_url: str, copies: int = 1):
        self.client = redis.Redis.from_url(broker_url, socket_timeout=5, socket_connect_timeout=2)
        self.copies = copies

    def publish(self, tasks: list[Task], also=None) -> None:
        """Send the tasks' messages (and whatever `also(pipeline)` adds to the round trip).
        Raises redis.RedisError if the broker is out of reach; some may have gone out by then."""
        with self.client.pipeline(transaction=False) as pipe:
            for task in tasks:
                for _ in range(self.copies):
                    pipe.lpush(task.queue, task_message(task))
            if also is not None:
                also(pipe)
            pipe.execute()
