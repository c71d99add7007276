"""Run a service's Alembic migrations from code (no alembic.ini to keep in step)."""
from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

from shared.db import normalize_url


def alembic_config(migrations_dir: Path, url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(migrations_dir))
    config.set_main_option("sqlalchemy.url", normalize_url(url).replace("%", "%%"))
    return config


def upgrade(migrations_dir: Path, url: str) -> None:
    command.upgrade(alembic_config(migrations_dir, url), "head")
