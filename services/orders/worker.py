"""Celery entry point: `celery -A services.orders.worker worker -Q default` and `... beat`."""
from shared import logs

from . import workspace_tasks  # noqa: F401  (registers the workspaces worker's tasks)
from .tasks import app, settings

logs.configure("orders-worker", settings.log_level)

__all__ = ["app"]
