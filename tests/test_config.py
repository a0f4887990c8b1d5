from pathlib import Path

import pytest
from pydantic import ValidationError

from config import Settings

ROOT = Path(__file__).resolve().parent.parent


def _example_keys() -> list[str]:
    lines = (ROOT / ".env.example").read_text().splitlines()
    return [ln.split("=", 1)[0] for ln in lines if ln and not ln.startswith("#")]


def test_env_example_lists_every_setting_once():
    keys = _example_keys()
    assert len(keys) == len(set(keys)), "a setting is listed twice"
    assert set(keys) == set(Settings.model_fields)


def test_env_example_has_a_comment_above_each_setting():
    lines = (ROOT / ".env.example").read_text().splitlines()
    for index, line in enumerate(lines):
        if line and not line.startswith("#"):
            assert lines[index - 1].startswith("#"), f"no comment above {line}"


def test_env_example_values_parse():
    values = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line and not line.startswith("#"):
            key, value = line.split("=", 1)
            values[key] = value
    settings = Settings(_env_file=None, **values)
    assert settings.API_KEYS == ["dev-key"]


def test_stream_url_is_derived_from_public_base_url():
    settings = Settings(_env_file=None, PUBLIC_BASE_URL="https://voice.acme.io/")
    assert settings.media_stream_url == "wss://voice.acme.io/twilio/media"
    assert settings.public_url("/twilio/status") == "https://voice.acme.io/twilio/status"


def test_api_keys_from_comma_separated_env(monkeypatch):
    monkeypatch.setenv("API_KEYS", "a, b,,c")
    assert Settings(_env_file=None).API_KEYS == ["a", "b", "c"]


def test_production_refuses_placeholder_secrets():
    with pytest.raises(ValidationError, match="WEBHOOK_SIGNING_SECRET"):
        Settings(_env_file=None, ENVIRONMENT="production", API_KEYS=["k1"], TWILIO_AUTH_TOKEN="t")
    with pytest.raises(ValidationError, match="CONSOLE_SECRET"):
        Settings(
            _env_file=None,
            ENVIRONMENT="production",
            API_KEYS=["k1"],
            TWILIO_AUTH_TOKEN="t",
            WEBHOOK_SIGNING_SECRET="a-long-random-secret",
        )
    ok = Settings(
        _env_file=None,
        ENVIRONMENT="production",
        API_KEYS=["k1"],
        TWILIO_AUTH_TOKEN="t",
        WEBHOOK_SIGNING_SECRET="a-long-random-secret",
        CONSOLE_SECRET="another-long-random-secret",
    )
    assert ok.ENVIRONMENT == "production"
