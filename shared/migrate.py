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


def revision(migrations_dir: Path, url: str, message: str) -> None:
    """Autogenerate a migration from the models (against a database migrated to head)."""
    command.revision(alembic_config(migrations_dir, url), message=message, autogenerate=True)


def run_env(metadata, version_table: str) -> None:
    """The body of a service's migrations/env.py: its own metadata and its own version table, so
    several services can share one database. Autogenerate compares only the service's own tables
    (another service's tables in the same database are not this one's to drop), so removing a
    table is a migration written by hand."""
    from alembic import context

    from shared.db import make_engine

    def own(name, type_, parent_names) -> bool:
        return type_ != "table" or name in metadata.tables

    options = {"target_metadata": metadata, "version_table": version_table, "render_as_batch": True,
               "include_name": own}
    if context.is_offline_mode():
        context.configure(url=context.config.get_main_option("sqlalchemy.url"), literal_binds=True, **options)
        with context.begin_transaction():
            context.run_migrations()
        return

    def run(connection) -> None:
        context.configure(connection=connection, compare_type=True, **options)
        with context.begin_transaction():
            context.run_migrations()

    connection = context.config.attributes.get("connection")
    if connection is not None:
        run(connection)
        return
    engine = make_engine(context.config.get_main_option("sqlalchemy.url"))
    with engine.connect() as connection:
        run(connection)
    engine.dispose()
