"""`python -m services.orders.cli migrate|seed|revision -m MSG`"""
import json
import sys
from pathlib import Path

from shared import migrate

MIGRATIONS = Path(__file__).parent / "migrations"


def _seed(settings) -> None:
    from .seed import seed
    print(json.dumps(seed(settings), indent=2))


def main(argv: list[str] | None = None) -> int:
    return migrate.cli(argv, "orders", MIGRATIONS, lambda settings: settings.orders_db,
                       {"seed": ("create demo data and print how to use it (JSON)", _seed)})


if __name__ == "__main__":
    sys.exit(main())
