"""JSON logs that carry request_id, order_id and task_id across services and tasks."""
from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
import uuid

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
order_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("order_id", default=None)
task_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("task_id", default=None)

REQUEST_ID_HEADER = "X-Request-ID"


def new_request_id() -> str:
    return uuid.uuid4().hex


def clean_request_id(value: str | None) -> str:
    """Accept a caller's id only if it is short and plain, so logs cannot be forged."""
    if value and len(value) <= 64 and all(c.isalnum() or c in "-_" for c in value):
        return value
    return new_request_id()


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str):
        super().__init__()
        self.service = service
        self._second = (-1, "")  # the last second formatted, and its text: one strftime a second

    def _timestamp(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if self._second[0] != second:
            self._second = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
        return f"{self._second[1]}.{int(record.msecs):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": self._timestamp(record),
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name, var in (("request_id", request_id), ("order_id", order_id), ("task_id", task_id)):
            value = getattr(record, name, None) or var.get()
            if value:
                entry[name] = value
        for key in ("status", "method", "path", "duration_ms", "event", "task"):
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure(service: str, level: str = "INFO") -> None:
    logging.Formatter.converter = time.gmtime
    # what JsonFormatter never writes, logging need not collect for every record (the logging
    # docs' "Optimization" knobs): the caller's file and line, and thread and process details
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
