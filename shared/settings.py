"""All configuration, as one frozen object loaded from the environment."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

CONSUMER_TIMEOUT_MARGIN_S = 60.0
LANES = ("async", "interactive", "batch", "webhooks")


def _env(name: str) -> AliasChoices:
    return AliasChoices(name, name.lower())


class Settings(BaseSettings):
    model_config = SettingsConfigDict(frozen=True, extra="ignore", populate_by_name=True)

    database_url: str = Field(
        "postgresql://postgres@127.0.0.1:5432/ferry", validation_alias=_env("DATABASE_URL")
    )
    amqp_url: str = Field("amqp://guest:guest@127.0.0.1:5672/", validation_alias=_env("AMQP_URL"))
    host: str = Field("0.0.0.0", validation_alias=_env("FERRY_HOST"))
    port: int = Field(8080, validation_alias=_env("FERRY_PORT"))
    namespace: str = Field(
        "ferry", pattern=r"^[A-Za-z0-9_.-]{1,100}$", validation_alias=_env("FERRY_NAMESPACE")
    )

    # Upstream (Anthropic). Credentials live only in the worker tier.
    anthropic_api_key: SecretStr | None = Field(None, validation_alias=_env("ANTHROPIC_API_KEY"))
    anthropic_base_url: str = Field(
        "https://api.anthropic.com", validation_alias=_env("ANTHROPIC_BASE_URL")
    )
    anthropic_version: str = Field(
        "2023-06-01", validation_alias=_env("FERRY_ANTHROPIC_VERSION")
    )
    openai_api_key: SecretStr | None = Field(None, validation_alias=_env("OPENAI_API_KEY"))
    openai_base_url: str | None = Field(None, validation_alias=_env("OPENAI_BASE_URL"))
    providers_file: str | None = Field(None, validation_alias=_env("FERRY_PROVIDERS_FILE"))
    key_cooldown_s: float = Field(60.0, ge=0, validation_alias=_env("FERRY_KEY_COOLDOWN"))
    inline_retry_max_s: float = Field(
        5.0, ge=0, validation_alias=_env("FERRY_INLINE_RETRY_MAX")
    )
    # Pacing (worker/pacing.py): an async job waits in its worker for its turn on a provider
    # key up to this long, and goes to a delay queue beyond it.
    pace_horizon_s: float = Field(60.0, gt=0, validation_alias=_env("FERRY_PACE_HORIZON"))
    # off: no pacing; each worker only honours the retry-after of the 429s it gets.
    pacing: bool = Field(True, validation_alias=_env("FERRY_PACING"))
    # 429s in a row (not attempts) a request takes before its rate-limit error is final.
    max_rate_limited: int = Field(10, ge=1, le=1000,
                                  validation_alias=_env("FERRY_MAX_RATE_LIMITED"))
    provider_timeout_s: float = Field(600.0, gt=0, validation_alias=_env("FERRY_PROVIDER_TIMEOUT"))
    provider_max_attempts: int = Field(
        4, ge=1, le=20, validation_alias=_env("FERRY_PROVIDER_MAX_ATTEMPTS")
    )
    retry_base_s: float = Field(0.5, ge=0, validation_alias=_env("FERRY_RETRY_BASE"))
    retry_max_s: float = Field(30.0, ge=0, validation_alias=_env("FERRY_RETRY_MAX"))

    broker_connect_timeout_s: float = Field(
        10.0, gt=0, validation_alias=_env("FERRY_BROKER_CONNECT_TIMEOUT"))
    broker_heartbeat_s: int = Field(15, ge=0, validation_alias=_env("FERRY_BROKER_HEARTBEAT"))
    # RabbitMQ closes the channel of a consumer that holds a message longer than this (its
    # `consumer_timeout`, 30 min by default): a job must finish well within it.
    broker_consumer_timeout_s: float = Field(
        1800.0, gt=0, validation_alias=_env("FERRY_BROKER_CONSUMER_TIMEOUT"))
    db_connect_timeout_s: float = Field(
        10.0, gt=0, validation_alias=_env("FERRY_DB_CONNECT_TIMEOUT"))

    # Worker
    worker_concurrency: int = Field(
        64, ge=1, le=10_000, validation_alias=_env("FERRY_WORKER_CONCURRENCY")
    )
    shutdown_grace_s: float = Field(30.0, ge=0, validation_alias=_env("FERRY_SHUTDOWN_GRACE"))
    # A job picked up this many times by workers that died or lost it under it is failed (it
    # may be what kills them). Counted in the job row, not by the broker.
    delivery_limit: int = Field(5, ge=1, le=50, validation_alias=_env("FERRY_DELIVERY_LIMIT"))
    # A running job's lease: a worker extends it every third of this; a job whose lease ran
    # out is picked up again (by the message the broker redelivers, or the reconciler's).
    lease_s: float = Field(30.0, ge=1, validation_alias=_env("FERRY_LEASE_SECONDS"))
    # All the time one delivery of a job may take (provider calls, retries and store writes).
    job_deadline_s: float = Field(1500.0, gt=0, validation_alias=_env("FERRY_JOB_DEADLINE"))
    # Reconciler (runs in the sweeper process): how often, and after how long a job whose
    # publish was never confirmed, or whose message went missing, is published again.
    reconcile_interval_s: float = Field(
        5.0, gt=0, validation_alias=_env("FERRY_RECONCILE_INTERVAL"))
    outbox_grace_s: float = Field(15.0, ge=0, validation_alias=_env("FERRY_OUTBOX_GRACE"))
    republish_after_s: float = Field(
        600.0, gt=0, validation_alias=_env("FERRY_REPUBLISH_AFTER"))
    queue_max_length: int = Field(
        1_000_000, ge=1, validation_alias=_env("FERRY_QUEUE_MAX_LENGTH")
    )

    lanes: str = Field("async,interactive,batch,webhooks",
                       validation_alias=_env("FERRY_WORKER_LANES"))
    # Message Batches: their requests run on a lane of their own, with this many in flight per
    # worker beside the async and interactive budgets, so a 100,000-request batch never holds
    # the slots single jobs and interactive requests need.
    batch_concurrency: int = Field(
        32, ge=1, le=10_000, validation_alias=_env("FERRY_BATCH_CONCURRENCY"))
    batch_expiry_s: float = Field(
        24 * 3600, gt=0, validation_alias=_env("FERRY_BATCH_EXPIRY"))
    batch_retention_s: int = Field(
        29 * 24 * 3600, ge=60, validation_alias=_env("FERRY_BATCH_RETENTION"))
    max_batch_body_bytes: int = Field(
        256 * 1024 * 1024, ge=1024, validation_alias=_env("FERRY_MAX_BATCH_BODY"))
    batch_create_timeout_s: float = Field(
        600.0, gt=0, validation_alias=_env("FERRY_BATCH_CREATE_TIMEOUT"))
    # The address clients reach Ferry at, for absolute URLs in answers (a batch's
    # results_url); unset: the scheme and Host of the request being answered.
    public_url: str | None = Field(None, validation_alias=_env("FERRY_PUBLIC_URL"))
    interactive_concurrency: int = Field(
        64, ge=1, le=10_000, validation_alias=_env("FERRY_INTERACTIVE_CONCURRENCY")
    )

    # Webhooks: deliveries in flight per worker (their own lane and prefetch, so a slow
    # receiver never holds a job slot), the time one attempt may take, and the retries.
    webhook_concurrency: int = Field(
        16, ge=1, le=10_000, validation_alias=_env("FERRY_WEBHOOK_CONCURRENCY"))
    webhook_timeout_s: float = Field(
        10.0, gt=0, le=300, validation_alias=_env("FERRY_WEBHOOK_TIMEOUT"))
    webhook_retry_base_s: float = Field(
        30.0, gt=0, validation_alias=_env("FERRY_WEBHOOK_RETRY_BASE"))
    webhook_retry_max_s: float = Field(
        1800.0, gt=0, validation_alias=_env("FERRY_WEBHOOK_RETRY_MAX"))
    webhook_max_attempts: int = Field(
        8, ge=1, le=30, validation_alias=_env("FERRY_WEBHOOK_MAX_ATTEMPTS"))

    # Interactive (sync and stream) requests
    pickup_timeout_s: float = Field(10.0, gt=0, validation_alias=_env("FERRY_PICKUP_TIMEOUT"))
    request_timeout_s: float = Field(600.0, gt=0, validation_alias=_env("FERRY_REQUEST_TIMEOUT"))
    stream_idle_timeout_s: float = Field(
        120.0, gt=0, validation_alias=_env("FERRY_STREAM_IDLE_TIMEOUT")
    )
    # The sync/stream queue: a classic queue on one node, or (`auto` with several AMQP_URL
    # nodes) a quorum queue, so that losing a node does not take the lane down with it.
    interactive_queue_type: Literal["auto", "classic", "quorum"] = Field(
        "auto", validation_alias=_env("FERRY_INTERACTIVE_QUEUE_TYPE"))
    interactive_max_queued: int = Field(
        10_000, ge=1, validation_alias=_env("FERRY_INTERACTIVE_MAX_QUEUED")
    )
    ping_interval_s: float = Field(10.0, gt=0, validation_alias=_env("FERRY_PING_INTERVAL"))
    # Admission (api/admission.py): new sync/stream requests are refused with 529 once the
    # queueing delay they meet (before a worker answers, over a queue longer than the
    # minimum; the api's event-loop lag) has stayed above its target for an interval; at once
    # when a request has waited for a worker past the wait, or past the in-flight cap.
    admission_target_s: float = Field(
        0.2, gt=0, validation_alias=_env("FERRY_ADMISSION_TARGET"))
    admission_lag_target_s: float = Field(
        0.2, gt=0, validation_alias=_env("FERRY_ADMISSION_LAG_TARGET"))
    admission_min_queue: int = Field(
        16, ge=0, validation_alias=_env("FERRY_ADMISSION_MIN_QUEUE"))
    admission_interval_s: float = Field(
        0.1, gt=0, validation_alias=_env("FERRY_ADMISSION_INTERVAL"))
    admission_wait_s: float = Field(1.0, gt=0, validation_alias=_env("FERRY_ADMISSION_WAIT"))
    admission_max_in_flight: int = Field(
        4096, ge=1, validation_alias=_env("FERRY_ADMISSION_MAX_IN_FLIGHT"))

    # Results
    result_ttl_default_s: int = Field(3600, ge=0, validation_alias=_env("FERRY_RESULT_TTL"))
    result_ttl_max_s: int = Field(
        7 * 24 * 3600, ge=0, validation_alias=_env("FERRY_RESULT_TTL_MAX")
    )
    sweep_interval_s: float = Field(30.0, gt=0, validation_alias=_env("FERRY_SWEEP_INTERVAL"))
    history_retention_days: float = Field(
        90, ge=0, validation_alias=_env("FERRY_HISTORY_RETENTION_DAYS")
    )  # 0 keeps history forever
    sweep_batch: int = Field(5000, ge=1, validation_alias=_env("FERRY_SWEEP_BATCH"))

    # Gateway keys: `keys` (callers need a key made with `ferry keys create`) or `off` (anyone
    # may call; jobs are bound to the hash of whatever credential is presented).
    auth: Literal["keys", "off"] = Field("keys", validation_alias=_env("FERRY_AUTH"))
    # Enables the admin API (/admin/v1/keys), guarded by this secret.
    admin_key: SecretStr | None = Field(None, validation_alias=_env("FERRY_ADMIN_KEY"))

    # Front door
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024, validation_alias=_env("FERRY_MAX_BODY"))
    # A request body must arrive within this (a client that stalls mid-body is cut off).
    body_timeout_s: float = Field(60.0, gt=0, validation_alias=_env("FERRY_BODY_TIMEOUT"))
    # Bodies larger than this are parsed in a helper process, not on the event loop.
    parse_offload_bytes: int = Field(
        1024 * 1024, ge=0, validation_alias=_env("FERRY_PARSE_OFFLOAD_BYTES"))
    db_pool_size: int = Field(10, ge=1, validation_alias=_env("FERRY_DB_POOL_SIZE"))

    metrics_port: int = Field(9100, ge=0, le=65535, validation_alias=_env("FERRY_METRICS_PORT"))
    metrics_host: str = Field("0.0.0.0", validation_alias=_env("FERRY_METRICS_HOST"))
    stats_interval_s: float = Field(5.0, gt=0, validation_alias=_env("FERRY_STATS_INTERVAL"))

    log_format: Literal["auto", "json", "console"] = Field(
        "auto", validation_alias=_env("FERRY_LOG_FORMAT")
    )
    log_level: str = Field("info", validation_alias=_env("FERRY_LOG_LEVEL"))

    @field_validator("amqp_url")
    @classmethod
    def _amqp_urls(cls, value: str) -> str:
        from shared.amqp import split_urls  # checks each node's URL

        split_urls(value)
        return value

    @field_validator("lanes")
    @classmethod
    def _known_lanes(cls, value: str) -> str:
        lanes = [lane.strip() for lane in value.split(",")]
        unknown = [lane for lane in lanes if lane not in LANES]
        if unknown or not lanes or len(set(lanes)) != len(lanes):
            raise ValueError(f"a comma-separated list of {', '.join(LANES)}, each at most once")
        return ",".join(lanes)

    @field_validator("anthropic_api_key", "openai_api_key", "admin_key", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        """`ANTHROPIC_API_KEY=` must not mean "the real API, with no key"."""
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _job_fits_the_consumer_timeout(self) -> Settings:
        margin = CONSUMER_TIMEOUT_MARGIN_S
        if self.job_deadline_s + margin > self.broker_consumer_timeout_s:
            raise ValueError(
                f"FERRY_JOB_DEADLINE ({self.job_deadline_s:g} s) must be at least {margin:g} s "
                f"below the broker's consumer timeout ({self.broker_consumer_timeout_s:g} s, "
                "FERRY_BROKER_CONSUMER_TIMEOUT): RabbitMQ would take the job away mid-call")
        if self.lease_s * 2 > self.job_deadline_s:
            raise ValueError("FERRY_LEASE_SECONDS must be at most half of FERRY_JOB_DEADLINE")
        return self

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        """Settings from an explicit environment mapping (tests pass their own)."""
        return cls.model_validate({k: v for k, v in environ.items()})

    @property
    def worker_lanes(self) -> frozenset[str]:
        return frozenset(self.lanes.split(","))

    @property
    def interactive_queue_kind(self) -> str:
        if self.interactive_queue_type != "auto":
            return self.interactive_queue_type
        return "quorum" if "," in self.amqp_url.strip(", ") else "classic"

    @property
    def interactive_queue(self) -> str:
        return f"{self.namespace}.interactive"

    @property
    def cancel_exchange(self) -> str:
        return f"{self.namespace}.cancel"

    @property
    def jobs_queue(self) -> str:
        return f"{self.namespace}.jobs"

    @property
    def batch_queue(self) -> str:
        return f"{self.namespace}.batch"

    @property
    def dead_letter_exchange(self) -> str:
        return f"{self.namespace}.dead"

    @property
    def dead_letter_queue(self) -> str:
        return f"{self.namespace}.jobs.dead"

    @property
    def webhooks_queue(self) -> str:
        return f"{self.namespace}.webhooks"

    @property
    def webhooks_dead_queue(self) -> str:
        return f"{self.namespace}.webhooks.dead"


# The environment each command reads, for its --help.
ENV_GROUPS: dict[str, tuple[str, ...]] = {
    "database": ("DATABASE_URL", "FERRY_DB_POOL_SIZE", "FERRY_DB_CONNECT_TIMEOUT"),
    "broker": ("AMQP_URL", "FERRY_NAMESPACE", "FERRY_BROKER_CONNECT_TIMEOUT",
               "FERRY_BROKER_HEARTBEAT", "FERRY_BROKER_CONSUMER_TIMEOUT",
               "FERRY_QUEUE_MAX_LENGTH", "FERRY_INTERACTIVE_MAX_QUEUED",
               "FERRY_INTERACTIVE_QUEUE_TYPE"),
    "api": ("FERRY_HOST", "FERRY_PORT", "FERRY_MAX_BODY", "FERRY_BODY_TIMEOUT",
            "FERRY_PARSE_OFFLOAD_BYTES", "FERRY_PICKUP_TIMEOUT", "FERRY_REQUEST_TIMEOUT",
            "FERRY_STREAM_IDLE_TIMEOUT", "FERRY_PING_INTERVAL", "FERRY_ADMISSION_TARGET",
            "FERRY_ADMISSION_INTERVAL", "FERRY_ADMISSION_LAG_TARGET", "FERRY_ADMISSION_MIN_QUEUE",
            "FERRY_ADMISSION_WAIT", "FERRY_ADMISSION_MAX_IN_FLIGHT",
            "FERRY_STATS_INTERVAL", "FERRY_METRICS_PORT", "FERRY_METRICS_HOST"),
    "auth": ("FERRY_AUTH", "FERRY_ADMIN_KEY"),
    "results": ("FERRY_RESULT_TTL", "FERRY_RESULT_TTL_MAX"),
    "batches": ("FERRY_MAX_BATCH_BODY", "FERRY_BATCH_CREATE_TIMEOUT", "FERRY_BATCH_EXPIRY",
                "FERRY_BATCH_RETENTION", "FERRY_PUBLIC_URL"),
    "providers": ("ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL", "FERRY_ANTHROPIC_VERSION",
                  "OPENAI_API_KEY", "OPENAI_BASE_URL", "FERRY_PROVIDERS_FILE",
                  "FERRY_KEY_COOLDOWN", "FERRY_PROVIDER_TIMEOUT",
                  "FERRY_PROVIDER_MAX_ATTEMPTS", "FERRY_RETRY_BASE", "FERRY_RETRY_MAX",
                  "FERRY_INLINE_RETRY_MAX", "FERRY_PACING", "FERRY_PACE_HORIZON",
                  "FERRY_MAX_RATE_LIMITED"),
    "worker": ("FERRY_WORKER_CONCURRENCY", "FERRY_INTERACTIVE_CONCURRENCY",
               "FERRY_WORKER_LANES", "FERRY_BATCH_CONCURRENCY", "FERRY_SHUTDOWN_GRACE",
               "FERRY_DELIVERY_LIMIT",
               "FERRY_LEASE_SECONDS", "FERRY_JOB_DEADLINE", "FERRY_METRICS_PORT",
               "FERRY_METRICS_HOST"),
    "webhooks": ("FERRY_WEBHOOK_CONCURRENCY", "FERRY_WEBHOOK_TIMEOUT",
                 "FERRY_WEBHOOK_RETRY_BASE", "FERRY_WEBHOOK_RETRY_MAX",
                 "FERRY_WEBHOOK_MAX_ATTEMPTS"),
    "sweeper": ("FERRY_SWEEP_INTERVAL", "FERRY_SWEEP_BATCH", "FERRY_HISTORY_RETENTION_DAYS",
                "FERRY_RECONCILE_INTERVAL", "FERRY_OUTBOX_GRACE", "FERRY_REPUBLISH_AFTER",
                "FERRY_LEASE_SECONDS", "FERRY_BATCH_EXPIRY", "FERRY_BATCH_RETENTION",
                "FERRY_METRICS_PORT", "FERRY_METRICS_HOST"),
    "logs": ("FERRY_LOG_FORMAT", "FERRY_LOG_LEVEL"),
}


def env_help(*groups: str) -> str:
    """`environment:` and one `NAME (default: X)` line per variable the groups read."""
    defaults: dict[str, object] = {}
    for field in Settings.model_fields.values():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            name = str(alias.choices[0])
            secret = field.annotation is not None and "SecretStr" in str(field.annotation)
            defaults[name] = "unset" if field.default is None else (
                "***" if secret else field.default)
    names: list[str] = []
    for group in groups:
        names += [n for n in ENV_GROUPS[group] if n not in names]
    lines = [f"  {name} (default: {defaults.get(name, 'unset')})" for name in names]
    return "environment:\n" + "\n".join(lines)
