"""Alembic environment for the payouts worker's own tables."""
from services.payouts.models import Base
from shared.migrate import run_env

run_env(Base.metadata, "alembic_version_payouts")
