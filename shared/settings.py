"""Environment → typed settings, with the embedded defaults. The one place settings are named."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VAR = ROOT / "var"


def _bool(value: str) -> bool:
    return value.strip().lower() not in ("0", "off", "false", "no", "")


def _csv(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


@dataclass(frozen=True)
class Settings:
    # Storage and broker. Empty database URLs fall back to SQLite files under var/.
    database_url: str = ""
    orders_database_url: str = ""
    messaging_database_url: str = ""
    payouts_database_url: str = ""
    redis_url: str = "redis://127.0.0.1:6390/0"
    # A message a worker took and never acknowledged (the worker was killed) goes back to its
    # queue after this long; it must outlast the longest task (see the check in celery_app), and no
    # task is scheduled further ahead than half of it.
    broker_visibility_timeout_seconds: int = 300
    # Ports of the processes `make run` starts.
    orders_port: int = 5001
    messaging_port: int = 5002
    gateway_port: int = 8080
    embedded_redis_port: int = 6390
    # Service-to-service.
    orders_url: str = "http://127.0.0.1:5001"
    messaging_url: str = "http://127.0.0.1:5002"
    service_token: str = "dev-service-token-change-me"
    # Auth.
    admin_api_keys: tuple[str, ...] = ("dev-admin-key-change-me",)
    session_secret: str = "dev-session-secret-change-me"
    session_ttl_seconds: int = 24 * 3600
    nonce_ttl_seconds: int = 300
    # Rate limits (per caller, per minute window).
    rate_limits: bool = True
    rate_limit_per_minute: int = 300
    rate_limit_anonymous_per_minute: int = 60
    # file links (previews, originals) have a budget of their own: a page of previews is fetched
    # without credentials, and would otherwise spend its viewer's (or its whole network's) budget
    rate_limit_files_per_minute: int = 600
    # Messaging: posts per sender per hour; how long messaging trusts its copy of an order's parties
    # and state before asking the orders service again; event streams' heartbeat and lifetime.
    message_rate_limit_per_hour: int = 60
    messaging_access_ttl_seconds: int = 30
    messaging_stream_heartbeat_seconds: float = 15.0
    messaging_stream_max_seconds: float = 300.0
    # Payments.
    payment_verifier: str = "sandbox"
    treasury_solana: str = "TreasurySo1ana11111111111111111111111111111"
    treasury_base: str = "0x000000000000000000000000000000000000dead"
    platform_fee_bps: int = 1000
    # Chain verifiers (PAYMENT_VERIFIER=solana|base): JSON-RPC endpoints and the USDC token.
    solana_rpc_url: str = "https://api.mainnet-beta.solana.com"
    usdc_mint_solana: str = "EPjFWdd5AufqSSqeM2qN1xzybapC8G4wEGGkZwyTDt1v"
    base_rpc_url: str = "https://mainnet.base.org"
    usdc_contract_base: str = "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"
    base_min_confirmations: int = 12
    chain_rpc_timeout_seconds: float = 10.0
    # Payouts and refunds.
    payout_rail: str = "sandbox"
    payout_max_attempts: int = 8
    payout_retry_base_seconds: float = 5.0
    payout_retry_max_seconds: float = 600.0
    payout_sweep_seconds: float = 10.0
    rail_timeout_seconds: float = 10.0
    # Fault injection for the sandbox rail, for tests: e.g. "fail=3,timeout=1,ambiguous=2".
    sandbox_rail_faults: str = ""
    # Files: uploads, originals and previews, and the signed links that serve them.
    media_root: str = ""  # empty: var/media
    upload_max_bytes: int = 50 * 1024 * 1024
    unused_upload_ttl_seconds: int = 7 * 24 * 3600
    file_link_secret: str = "dev-file-link-secret-change-me"
    file_link_ttl_seconds: int = 900
    preview_max_edge: int = 1024
    media_max_pixels: int = 40_000_000
    media_fetch_max_bytes: int = 50 * 1024 * 1024
    media_fetch_timeout_seconds: float = 20.0
    media_fetch_allowed_hosts: tuple[str, ...] = ()
    media_task_time_limit_seconds: int = 120
    # Webhooks: endpoints must be public https unless their host is listed here (`host` or
    # `host:port`, for local development and tests); the request timeout; retries with exponential
    # backoff and jitter from the base to the cap, for the window; how long a rotated-out signing
    # secret keeps signing; how often beat hands due attempts to the webhooks worker.
    webhook_allowed_hosts: tuple[str, ...] = ()
    webhook_timeout_seconds: float = 10.0
    webhook_retry_base_seconds: float = 5.0
    webhook_retry_max_seconds: float = 3600.0
    webhook_retry_window_seconds: int = 24 * 3600
    webhook_secret_overlap_seconds: int = 24 * 3600
    webhook_sweep_seconds: float = 2.0
    # Fault injection for tests: publish every queue message twice.
    fault_duplicate_messages: bool = False
    # Durations (seconds) of the order timers.
    review_window_seconds: int = 48 * 3600
    quote_expiry_seconds: int = 7 * 24 * 3600
    default_turnaround_hours: int = 48
    # Workspaces (weekly and monthly services): how long a period lasts, and how long an agent
    # has to answer a generation before its unit of quota goes back to the buyer.
    workspace_weekly_seconds: int = 7 * 24 * 3600
    workspace_monthly_seconds: int = 30 * 24 * 3600
    generation_timeout_seconds: int = 3600
    # Beat sweep periods (seconds).
    outbox_sweep_seconds: float = 5.0
    timer_sweep_seconds: float = 30.0
    workspace_sweep_seconds: float = 15.0
    # Retention: how long replayable Idempotency-Key responses, and published events and fired
    # timers, are kept before the hourly prune deletes them.
    idempotency_ttl_seconds: int = 24 * 3600
    retention_days: int = 30
    # Logging.
    log_level: str = "INFO"

    @property
    def orders_db(self) -> str:
        return self.orders_database_url or self.database_url or f"sqlite:///{VAR / 'orders.db'}"

    @property
    def messaging_db(self) -> str:
        return self.messaging_database_url or self.database_url or f"sqlite:///{VAR / 'messaging.db'}"

    @property
    def media_path(self) -> Path:
        return Path(self.media_root) if self.media_root else VAR / "media"

    @property
    def payouts_db(self) -> str:
        return self.payouts_database_url or self.database_url or f"sqlite:///{VAR / 'payouts.db'}"

    def replace(self, **changes) -> "Settings":
        return dataclasses.replace(self, **changes)


_CONVERTERS = {int: int, float: float, bool: _bool, str: str, tuple: _csv}


def load(env: dict | None = None, **overrides) -> Settings:
    """Read every field from the environment variable of the same name in upper case."""
    env = os.environ if env is None else env
    values = {}
    for f in dataclasses.fields(Settings):
        raw = env.get(f.name.upper())
        if raw is None:
            continue
        kind = type(f.default)  # the default's type says how to parse the variable
        try:
            values[f.name] = _CONVERTERS[kind](raw)
        except ValueError as exc:
            raise ValueError(f"setting {f.name.upper()}={raw!r} is not a valid {kind}") from exc
    values.update(overrides)
    return Settings(**values)
