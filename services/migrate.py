"""`python -m services.migrate`: create or upgrade every service's own tables."""
from __future__ import annotations

import sys

from shared import migrate
from shared.settings import Settings, load


def targets(settings: Settings):
    """(service, migrations folder, database URL) of each service that owns tables."""
    from services.orders.cli import MIGRATIONS as ORDERS
    from services.payouts.cli import MIGRATIONS as PAYOUTS
    from services.messaging.cli import MIGRATIONS as MESSAGING
    return [("orders", ORDERS, settings.orders_db), ("payouts", PAYOUTS, settings.payouts_db),
            ("messaging", MESSAGING, settings.messaging_db)]


def main() -> int:
    for _service, folder, url in targets(load()):
        migrate.upgrade(folder, url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
