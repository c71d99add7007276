"""Celery entry point: `celery -A services.payouts.worker worker -Q payouts`."""
from shared import logs

from .tasks import app, settings

logs.configure("payouts-worker", settings.log_level)

__all__ = ["app"]
