"""All configuration, as one frozen object loaded from the environment."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


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
    provider_timeout_s: float = Field(600.0, gt=0, validation_alias=_env("FERRY_PROVIDER_TIMEOUT"))
    provider_max_attempts: int = Field(
        4, ge=1, le=20, validation_alias=_env("FERRY_PROVIDER_MAX_ATTEMPTS")
    )
    retry_base_s: float = Field(0.5, ge=0, validation_alias=_env("FERRY_RETRY_BASE"))
    retry_max_s: float = Field(30.0, ge=0, validation_alias=_env("FERRY_RETRY_MAX"))

    # Worker
    worker_concurrency: int = Field(
        64, ge=1, le=10_000, validation_alias=_env("FERRY_WORKER_CONCURRENCY")
    )
    shutdown_grace_s: float = Field(30.0, ge=0, validation_alias=_env("FERRY_SHUTDOWN_GRACE"))
    delivery_limit: int = Field(5, ge=1, le=100, validation_alias=_env("FERRY_DELIVERY_LIMIT"))
    queue_max_length: int = Field(
        1_000_000, ge=1, validation_alias=_env("FERRY_QUEUE_MAX_LENGTH")
    )

    lanes: str = Field(
        "async,interactive", pattern=r"^(async|interactive)(,(async|interactive))?$",
        validation_alias=_env("FERRY_WORKER_LANES"),
    )
    interactive_concurrency: int = Field(
        64, ge=1, le=10_000, validation_alias=_env("FERRY_INTERACTIVE_CONCURRENCY")
    )

    # Interactive (sync and stream) requests
    pickup_timeout_s: float = Field(10.0, gt=0, validation_alias=_env("FERRY_PICKUP_TIMEOUT"))
    request_timeout_s: float = Field(600.0, gt=0, validation_alias=_env("FERRY_REQUEST_TIMEOUT"))
    stream_idle_timeout_s: float = Field(
        120.0, gt=0, validation_alias=_env("FERRY_STREAM_IDLE_TIMEOUT")
    )
    interactive_max_queued: int = Field(
        10_000, ge=1, validation_alias=_env("FERRY_INTERACTIVE_MAX_QUEUED")
    )
    ping_interval_s: float = Field(10.0, gt=0, validation_alias=_env("FERRY_PING_INTERVAL"))

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

    # Front door
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024, validation_alias=_env("FERRY_MAX_BODY"))
    db_pool_size: int = Field(10, ge=1, validation_alias=_env("FERRY_DB_POOL_SIZE"))

    metrics_port: int = Field(9100, ge=0, le=65535, validation_alias=_env("FERRY_METRICS_PORT"))
    stats_interval_s: float = Field(5.0, gt=0, validation_alias=_env("FERRY_STATS_INTERVAL"))

    log_format: Literal["auto", "json", "console"] = Field(
        "auto", validation_alias=_env("FERRY_LOG_FORMAT")
    )
    log_level: str = Field("info", validation_alias=_env("FERRY_LOG_LEVEL"))

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        """Settings from an explicit environment mapping (tests pass their own)."""
        return cls.model_validate({k: v for k, v in environ.items()})

    @property
    def worker_lanes(self) -> frozenset[str]:
        return frozenset(self.lanes.split(","))

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
    def dead_letter_exchange(self) -> str:
        return f"{self.namespace}.dead"

    @property
    def dead_letter_queue(self) -> str:
        return f"{self.namespace}.jobs.dead"
