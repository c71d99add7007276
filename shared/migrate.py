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


def cli(argv, service: str, migrations_dir: Path, url_of, extra=None) -> int:
    """A service's `python -m services.<name>.cli migrate|revision -m MSG` (and `extra` commands:
    a dict of name → (help, function of settings))."""
    import argparse

    from shared.settings import load

    parser = argparse.ArgumentParser(prog=f"services.{service}.cli")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("migrate", help=f"create or upgrade the {service} tables")
    revision_parser = sub.add_parser("revision", help="autogenerate a migration from the models")
    revision_parser.add_argument("-m", "--message", required=True)
    for name, (help_text, _fn) in (extra or {}).items():
        sub.add_parser(name, help=help_text)
    args = parser.parse_args(argv)
    settings = load()
    if args.command == "migrate":
        upgrade(migrations_dir, url_of(settings))
    elif args.command == "revision":
        revision(migrations_dir, url_of(settings), args.message)
    else:
        extra[args.command][1](settings)
    return 0
