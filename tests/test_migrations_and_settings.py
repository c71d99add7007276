"""The migrations build exactly the tables the models declare; settings parse the environment."""
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from services.orders import models  # noqa: F401
from services.payouts.models import Base as PayoutsBase
from services.messaging.models import Base as MessagingBase
from shared.db import Base
from shared.settings import load

METADATA = {"orders": Base.metadata, "payouts": PayoutsBase.metadata, "messaging": MessagingBase.metadata}


@pytest.mark.parametrize("service", sorted(METADATA))
def test_migrations_match_the_models(migrated, service):
    """Each service's migrations build its own tables (the test database holds every service's)."""
    metadata = METADATA[service]
    others = {t for name, m in METADATA.items() if name != service for t in m.tables}
    others |= {f"alembic_version_{name}" for name in METADATA}

    def own(name, type_, parent_names):
        return type_ != "table" or name not in others

    with migrated.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": False, "include_name": own})
        diff = compare_metadata(context, metadata)
    assert diff == []


def test_settings_come_from_the_environment():
    settings = load({"RATE_LIMITS": "off", "PLATFORM_FEE_BPS": "250", "ADMIN_API_KEYS": "a, b",
                     "REVIEW_WINDOW_SECONDS": "60"})
    assert settings.rate_limits is False and settings.platform_fee_bps == 250
    assert settings.admin_api_keys == ("a", "b") and settings.review_window_seconds == 60
    assert load({}).orders_db.startswith("sqlite:///") and load({}).rate_limits is True


def test_a_malformed_setting_names_itself():
    with pytest.raises(ValueError, match="PLATFORM_FEE_BPS"):
        load({"PLATFORM_FEE_BPS": "ten percent"})


def test_the_readme_documents_every_setting():
    import dataclasses
    from shared.settings import ROOT, Settings
    readme = (ROOT / "README.md").read_text()
    missing = [f.name.upper() for f in dataclasses.fields(Settings) if f"`{f.name.upper()}`" not in readme]
    assert missing == []


def test_the_broker_hands_back_a_killed_workers_message_after_the_visibility_timeout_setting():
    from shared.celery_app import make_celery
    conf = make_celery("t", load({"BROKER_VISIBILITY_TIMEOUT_SECONDS": "400"})).conf
    assert conf.broker_transport_options["visibility_timeout"] == 400
    assert make_celery("t", load({})).conf.broker_transport_options["visibility_timeout"] == 300


@pytest.mark.parametrize("env", [
    {"BROKER_VISIBILITY_TIMEOUT_SECONDS": "200"},  # the media time limit is 120 s by default
    {"BROKER_VISIBILITY_TIMEOUT_SECONDS": "30", "MEDIA_TASK_TIME_LIMIT_SECONDS": "10"},  # a payout takes 35 s
    {"WEBHOOK_TIMEOUT_SECONDS": "200"},
], ids=["media", "rail", "webhook"])
def test_a_visibility_timeout_a_task_could_outlast_is_refused_at_startup(env):
    """A message still being worked on would be handed out a second time."""
    from shared.celery_app import make_celery
    with pytest.raises(ValueError, match="BROKER_VISIBILITY_TIMEOUT_SECONDS"):
        make_celery("t", load(env))
