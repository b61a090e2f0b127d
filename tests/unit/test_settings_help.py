"""Every setting Ferry reads is listed in some command's --help (shared/settings.ENV_GROUPS)."""

from __future__ import annotations

from pydantic import AliasChoices

from shared.settings import ENV_GROUPS, Settings, env_help


def test_every_setting_is_in_a_help_group() -> None:
    names = {str(field.validation_alias.choices[0])
             for field in Settings.model_fields.values()
             if isinstance(field.validation_alias, AliasChoices)}
    grouped = {name for group in ENV_GROUPS.values() for name in group}
    assert sorted(names - grouped) == []


def test_the_pacing_settings_show_their_defaults() -> None:
    text = env_help("providers")
    assert "FERRY_PACE_HORIZON (default: 60.0)" in text
    assert "FERRY_MAX_RATE_LIMITED (default: 10)" in text
    assert "FERRY_PACING (default: True)" in text
