"""Alembic environment for the messaging service's own tables."""
from services.messaging.models import Base
from shared.migrate import run_env

run_env(Base.metadata, "alembic_version_messaging")
