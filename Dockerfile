# One image for every Python process: orders, messaging, the Celery workers, beat, migrate.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
# Dependencies first, so code changes reuse the installed layer.
COPY requirements.txt .
RUN pip install -r requirements.txt

# The code, not the local .venv or var/ (which are host-specific).
COPY shared/ shared/
COPY services/ services/
RUN useradd --create-home --uid 10001 app && mkdir -p var/log && chown -R app var
USER app

# No CMD: docker-compose.yml gives each service its command from services/processes.py.
