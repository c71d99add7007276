"""`python -m services.messaging.cli migrate|revision -m MSG`"""
import sys
from pathlib import Path

from shared import migrate

MIGRATIONS = Path(__file__).parent / "migrations"

if __name__ == "__main__":
    sys.exit(migrate.cli(None, "messaging", MIGRATIONS, lambda settings: settings.messaging_db))
