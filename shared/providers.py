"""Which providers exist and how a request's `model` picks one.

`model` names a configured alias (`[models.NAME]` in the providers file: a route and its
fallback chain), or has the form `provider/model` (the prefix is stripped before the upstream
call), or is a bare model name for `anthropic`. Providers come from the environment
(ANTHROPIC_*, OPENAI_*) and, for several providers or keys, from a TOML file named by
FERRY_PROVIDERS_FILE. The api uses this for routing and validation only; keys are read by
workers (a key written `env:NAME` is taken from that variable when the worker starts).

A request may name its own fallback chain in the `x-ferry-fallbacks` header (comma-separated
routes), which replaces the alias's. The body's `fallbacks` field is Anthropic's own (a beta)
and is forwarded like any other field.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from shared.errors import InvalidRequest
from shared.settings import Settings

DEFAULT_PROVIDER = "anthropic"
MAX_FALLBACKS = 5


class KeyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str = Field(min_length=1)
    weight: float = Field(1.0, gt=0)
    # What the provider allows this key, if you know it (workers also learn it from the
    # provider's rate-limit headers; the lower figure wins): requests and tokens per minute,
    # and calls in flight at once (over all workers).
    rpm: float | None = Field(None, gt=0)
    tpm: float | None = Field(None, gt=0)
    max_concurrency: int | None = Field(None, ge=1)


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
    # Models this provider serves, listed by GET /v1/models (an Anthropic-type provider's own
    # list is fetched as well) and used as metric labels.
    models: tuple[str, ...] = ()


class ModelAlias(BaseModel):
    """`[models.NAME]`: a name clients use, the route it stands for, and its fallbacks."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=200)
    route: str = Field(min_length=1)
    fallbacks: tuple[str, ...] = Field((), max_length=MAX_FALLBACKS)
    display_name: str | None = None


@dataclass(frozen=True, slots=True)
class Route:
    provider: str
    model: str  # as the upstream knows it

    def __str__(self) -> str:
        return f"{self.provider}/{self.model}"


class ProviderConfigError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Resolution:
    """Where a request goes: its primary route and the routes tried after it."""

    primary: Route
    fallbacks: tuple[Route, ...] = ()


@dataclass(frozen=True)
class Providers:
    configs: dict[str, ProviderConfig]
    aliases: dict[str, ModelAlias] = field(default_factory=dict)

    def names(self) -> list[str]:
        return sorted(self.configs)

    def resolve(self, model: str, fallbacks_header: str | None = None) -> Resolution:
        """The routes for a request's `model` and its `x-ferry-fallbacks` header."""
        alias = self.aliases.get(model)
        primary = self.route(alias.route if alias else model)
        chain: tuple[str, ...] = alias.fallbacks if alias else ()
        field_name = "model"
        if fallbacks_header is not None:
            chain = tuple(part.strip() for part in fallbacks_header.split(",") if part.strip())
            field_name = "x-ferry-fallbacks"
            if len(chain) > MAX_FALLBACKS:
                raise InvalidRequest(
                    f"x-ferry-fallbacks: at most {MAX_FALLBACKS} routes, got {len(chain)}")
        fallbacks = tuple(self.route(self.aliases[f].route if f in self.aliases else f,
                                     field=f"{field_name} fallback {f!r}") for f in chain)
        return Resolution(primary, fallbacks)

    def known_models(self) -> set[str]:
        """Model names that come from configuration, not from clients (metric labels)."""
        names = set(self.aliases)
        for config in self.configs.values():
            names.update(config.models)
            names.update(f"{config.name}/{m}" for m in config.models)
        return names

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
    aliases: dict[str, ModelAlias] = {}
    if settings.providers_file:
        file_configs, aliases = _read_file(Path(settings.providers_file))
        configs.update(file_configs)
    providers = Providers(configs, aliases)
    for alias in aliases.values():  # an alias naming no configured provider is a typo
        try:
            providers.resolve(alias.name)
        except InvalidRequest as exc:
            raise ProviderConfigError(f"models.{alias.name}: {exc.message}") from None
    return providers


def _keys(secret: SecretStr | None) -> tuple[KeyConfig, ...]:
    return (KeyConfig(key=secret.get_secret_value()),) if secret else ()


def _read_file(path: Path) -> tuple[dict[str, ProviderConfig], dict[str, ModelAlias]]:
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ProviderConfigError(f"cannot read providers file {path}: {exc}") from exc
    table = data.get("providers", {})
    models = data.get("models", {})
    if not isinstance(table, dict) or not isinstance(models, dict) or not (table or models):
        raise ProviderConfigError(f"{path}: expected [providers.NAME] or [models.NAME] tables")
    out = {}
    for name, body in table.items():
        try:
            out[name] = ProviderConfig.model_validate({"name": name, **body})
        except (ValidationError, TypeError) as exc:
            raise ProviderConfigError(f"{path}: providers.{name}: {exc}") from exc
    aliases = {}
    for name, body in models.items():
        try:
            aliases[name] = ModelAlias.model_validate({"name": name, **body})
        except (ValidationError, TypeError) as exc:
            raise ProviderConfigError(f"{path}: models.{name}: {exc}") from exc
    return out, aliases
