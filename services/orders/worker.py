"""Celery entry point: `celery -A services.orders.worker worker -Q default` and `... beat`."""
from shared import logs

from . import webhook_tasks, workspace_tasks  # noqa: F401  (register the webhooks and workspaces workers' tasks)
from .tasks import app, settings

logs.configure("orders-worker", settings.log_level)

__all__ = ["app"]
