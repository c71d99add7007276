"""Celery task messages written to the Redis broker directly, many in one round trip.

Celery's `send_task` builds each message through kombu's producer machinery and sends it on its
own: about a third of a millisecond per message here, once per consumer of each event. A message
is only a JSON document pushed onto the queue's list, so the outbox builds the same document
itself (Celery's task protocol 2, as kombu's Redis transport stores it; tests/test_broker.py
holds it against what `send_task` writes) and pushes all of a commit's messages in one round
trip. Workers read them like any other: they are the same bytes.
"""
from __future__ import annotations

import base64
import json
import os
import socket
import uuid
from json.encoder import encode_basestring_ascii as _q  # a JSON string, as json.dumps writes it
from typing import NamedTuple

import redis

from shared.redisconn import Commands

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


# the parts of a message that are the same in every one, serialised once
_FIXED_HEADERS = {"lang": "py", "shadow": None, "eta": None, "expires": None, "group": None, "group_index": None,
                  "retries": 0, "timelimit": [None, None], "parent_id": None, "ignore_result": None,
                  "replaced_task_nesting": 0, "stamped_headers": None, "stamps": {}}
_FIXED_HEADERS_JSON = json.dumps(_FIXED_HEADERS)[1:-1]
_FIXED_PROPERTIES = {"reply_to": None, "delivery_mode": 2, "priority": 0, "body_encoding": "base64"}
_FIXED_PROPERTIES_JSON = json.dumps(_FIXED_PROPERTIES)[1:-1]
# the headers every message sets itself: extra headers with these names take the plain way
_OWN_HEADERS = frozenset(_FIXED_HEADERS) | {"task", "id", "root_id", "argsrepr", "kwargsrepr", "origin"}


def task_body(task: Task) -> str:
    """A task message's body (its arguments), as it travels: JSON, base64-encoded."""
    return base64.b64encode(json.dumps([task.args, task.kwargs or {}, _EMBED]).encode()).decode()


def task_message(task: Task) -> str:
    """One task message (priority 0), serialised as kombu's Redis transport keeps it in the
    queue's list."""
    return _Messages().message(task)


class _Messages:
    """Writes the messages of one batch: the constant parts are serialised once per process, and
    what several messages share (an event's arguments, its extra headers) once per batch."""

    def __init__(self):
        self._bodies: dict = {}
        self._extras: dict = {}

    def message(self, task: Task) -> str:
        key = (id(task.args), id(task.kwargs))
        body = self._bodies.get(key)
        if body is None:
            body = self._bodies[key] = task_body(task)
        extra = task.headers
        if extra and not _OWN_HEADERS.isdisjoint(extra):
            return _plain_message(task, body)
        # by the dict's id: the batch's tasks hold their headers, so no id is reused meanwhile
        extra_json = self._extras.get(id(extra)) if extra else ""
        if extra_json is None:
            extra_json = self._extras[id(extra)] = "".join(f", {_q(k)}: {json.dumps(v)}" for k, v in extra.items())
        task_id = _q(task.id or str(uuid.uuid4()))
        return (f'{{"body": "{body}", "content-encoding": "utf-8", "content-type": "application/json", '
                f'"headers": {{{_FIXED_HEADERS_JSON}, "task": {_q(task.name)}, "id": {task_id}, '
                f'"root_id": {task_id}, "argsrepr": "<{len(task.args)} argument(s)>", '
                f'"kwargsrepr": {_q(repr(task.kwargs or {}))}, "origin": {_q(f"gen{os.getpid()}@{_HOST}")}'
                f'{extra_json}}}, "properties": {{{_FIXED_PROPERTIES_JSON}, "correlation_id": {task_id}, '
                f'"delivery_info": {{"exchange": "", "routing_key": {_q(task.queue)}}}, '
                f'"delivery_tag": "{uuid.uuid4()}"}}}}')


def _plain_message(task: Task, body: str) -> str:
    """task_message, built as one dict (extra headers replace the message's own)."""
    task_id = task.id or str(uuid.uuid4())
    return json.dumps({
        "body": body, "content-encoding": "utf-8", "content-type": "application/json",
        "headers": {**_FIXED_HEADERS, "task": task.name, "id": task_id, "root_id": task_id,
                    "argsrepr": f"<{len(task.args)} argument(s)>", "kwargsrepr": repr(task.kwargs or {}),
                    "origin": f"gen{os.getpid()}@{_HOST}", **(task.headers or {})},
        "properties": {**_FIXED_PROPERTIES, "correlation_id": task_id,
                       "delivery_info": {"exchange": "", "routing_key": task.queue},
                       "delivery_tag": str(uuid.uuid4())},
    })


class Publisher:
    """Pushes task messages onto their queues' lists, all of one batch in one pipeline. With
    `copies` > 1 (the FAULT_DUPLICATE_MESSAGES test fault) each message goes out that many times,
    each copy a message of its own, as a broker's redelivery would be."""

    def __init__(self, broker_url: str, copies: int = 1):
        self.client = redis.Redis.from_url(broker_url, socket_timeout=5, socket_connect_timeout=2)
        self.commands = Commands.of(self.client)
        self.copies = copies

    def publish(self, tasks: list[Task], also=None) -> None:
        """Send the tasks' messages (and the commands `also(commands)` appends to the list, as
        tuples) in one round trip. Raises redis.RedisError if the broker is out of reach; some
        may have gone out by then."""
        messages = _Messages()
        commands = [("LPUSH", task.queue, messages.message(task)) for task in tasks for _ in range(self.copies)]
        if also is not None:
            also(commands)
        if commands:
            self.commands.run(commands)
