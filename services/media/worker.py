"""Celery entry point: `celery -A services.media.worker worker -Q media` (prefork, so the time
limits hold; a few processes, since each holds one image at a time)."""
from shared import logs

from .tasks import app, settings

logs.configure("media-worker", settings.log_level)

__all__ = ["app"]
