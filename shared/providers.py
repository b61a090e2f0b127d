"""Which providers exist and how a request's `model` picks one.

`model` of the form `provider/model` picks a configured provider and the prefix is stripped
before the upstream call; a bare model name goes to `anthropic`. Providers come from the
environment (ANTHROPIC_*, OPENAI_*) and, for several providers or keys, from a TOML file named
by FERRY_PROVIDERS_FILE. The api uses this for routing and validation only; keys are read by
workers (a key written `env:NAME` is taken from that variable when the worker starts).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from shared.errors import InvalidRequest
from shared.settings import Settings

DEFAULT_PROVIDER = "anthropic"


class KeyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str = Field(min_length=1)
    weight: float = Field(1.0, gt=0)


class ProviderConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")
    type: Literal["anthropic", "openai"]
    base_url: str
    keys: tuple[KeyConfig, ...] = ()
    timeout_s: float | None = Field(None, gt=0)
    max_attempts: int | None = Field(None, ge=1, le=20)
    retry_base_s: float | None = Field(None, ge=0)
    retry_max_s: float | None = Field(None, ge=0)
    key_cooldown_s: float | None = Field(None, ge=0)


@dataclass(frozen=True, slots=True)
class Route:
    provider: str
    model: str  # as the upstream knows it

    def __str__(self) -> str:
        return f"{self.provider}/{self.model}"


class ProviderConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Providers:
    configs: dict[str, ProviderConfig]

    def names(self) -> list[str]:
        return sorted(self.configs)

    def route(self, model: str, field: str = "model") -> Route:
        name, sep, rest = model.partition("/")
        if not sep:
            name, rest = DEFAULT_PROVIDER, model
        elif not rest:
            raise InvalidRequest(f"{field}: {model!r} names no model after the provider prefix")
        if name not in self.configs:
            raise InvalidRequest(
                f"{field}: provider {name!r} is not configured; configured providers: "
                + (", ".join(self.names()) or "none")
            )
        return Route(name, rest)


def load_providers(settings: Settings) -> Providers:
    configs: dict[str, ProviderConfig] = {}
    configs["anthropic"] = ProviderConfig(
        name="anthropic", type="anthropic", base_url=settings.anthropic_base_url,
        keys=_keys(settings.anthropic_api_key),
    )
    if settings.openai_api_key or settings.openai_base_url:
        configs["openai"] = ProviderConfig(
            name="openai", type="openai",
            base_url=settings.openai_base_url or "https://api.openai.com/v1",
            keys=_keys(settings.openai_api_key),
        )
    if settings.providers_file:
        configs.update(_read_file(Path(settings.providers_file)))
    return Providers(configs)


def _keys(secret: SecretStr | None) -> tuple[KeyConfig, ...]:
    return (KeyConfig(key=secret.get_secret_value()),) if secret else ()


def _read_file(path: Path) -> dict[str, ProviderConfig]:
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ProviderConfigError(f"cannot read providers file {path}: {exc}") from exc
    table = data.get("providers")
    if not isinstance(table, dict):
        raise ProviderConfigError(f"{path}: expected [providers.NAME] tables")
    out = {}
    for name, body in table.items():
        try:
            out[name] = ProviderConfig.model_validate({"name": name, **body})
        except (ValidationError, TypeError) as exc:
            raise ProviderConfigError(f"{path}: providers.{name}: {exc}") from exc
    return out
