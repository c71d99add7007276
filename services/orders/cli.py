"""`python -m services.orders.cli migrate|seed|revision -m MSG`"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from shared import migrate
from shared.settings import load

MIGRATIONS = Path(__file__).parent / "migrations"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="services.orders.cli")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("migrate", help="create or upgrade the orders tables")
    sub.add_parser("seed", help="create demo data and print how to use it (JSON)")
    revision = sub.add_parser("revision", help="autogenerate a migration from the models")
    revision.add_argument("-m", "--message", required=True)
    args = parser.parse_args(argv)
    settings = load()
    if args.command == "migrate":
        migrate.upgrade(MIGRATIONS, settings.orders_db)
    elif args.command == "revision":
        migrate.revision(MIGRATIONS, settings.orders_db, args.message)
    else:
        from .seed import seed
        print(json.dumps(seed(settings), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
