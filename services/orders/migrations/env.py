"""Alembic environment for the orders service's own tables."""
from services.orders import models  # noqa: F401  (registers the tables)
from shared.db import Base
from shared.migrate import run_env

run_env(Base.metadata, "alembic_version_orders")
