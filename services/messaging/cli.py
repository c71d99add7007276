"""`python -m services.messaging.cli migrate|revision -m MSG`"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shared import migrate
from shared.settings import load

MIGRATIONS = Path(__file__).parent / "migrations"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="services.messaging.cli")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("migrate", help="create or upgrade the messaging tables")
    revision = sub.add_parser("revision", help="autogenerate a migration from the models")
    revision.add_argument("-m", "--message", required=True)
    args = parser.parse_args(argv)
    settings = load()
    if args.command == "migrate":
        migrate.upgrade(MIGRATIONS, settings.messaging_db)
    else:
        migrate.revision(MIGRATIONS, settings.messaging_db, args.message)
    return 0


if __name__ == "__main__":
    sys.exit(main())
