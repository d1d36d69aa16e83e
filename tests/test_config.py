from __future__ import annotations

from datetime import timedelta

import pytest
from pydantic import ValidationError

from app.config import Environment, LogFormat, Settings


def test_environment_variables_with_prefix_and_nested_groups(monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TUNEGATE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("TUNEGATE_MAX_REQUEST_BYTES", "2048")
    monkeypatch.setenv("TUNEGATE_LOG__LEVEL", "debug")
    monkeypatch.setenv("TUNEGATE_LOG__FORMAT", "console")
    monkeypatch.setenv("TUNEGATE_AUTH__LAST_USED_RESOLUTION", "PT5M")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-123")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9999/v1")
    settings = Settings()
    assert settings.data_dir == tmp_path / "data"
    assert settings.max_request_bytes == 2048
    assert settings.log.level == "DEBUG" and settings.log.format is LogFormat.console
    assert settings.auth.last_used_resolution == timedelta(minutes=5)
    assert settings.openai.api_key is not None
    assert settings.openai.api_key.get_secret_value() == "sk-test-123"
    assert settings.openai.base_url == "http://127.0.0.1:9999/v1"
    assert "sk-test-123" not in repr(settings)
    assert settings.env is Environment.development


@pytest.mark.parametrize("key", ["changeme", "admin", "short-key"])
def test_production_refuses_placeholder_bootstrap_keys(monkeypatch, tmp_path, key) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TUNEGATE_ENV", "production")
    monkeypatch.setenv("TUNEGATE_BOOTSTRAP_ADMIN_KEY", key)
    with pytest.raises(ValidationError, match="placeholder"):
        Settings()


def test_development_accepts_a_simple_bootstrap_key(monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TUNEGATE_BOOTSTRAP_ADMIN_KEY", "dev-admin")
    assert Settings().bootstrap_admin_key is not None


def test_bad_values_are_refused_with_the_variable_named(monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TUNEGATE_LOG__LEVEL", "LOUD")
    with pytest.raises(ValidationError, match="level"):
        Settings()


def test_a_malformed_openai_webhook_secret_stops_start_up(monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OPENAI_WEBHOOK_SECRET", "whsec_!!not-base64")
    with pytest.raises(ValidationError, match="OPENAI_WEBHOOK_SECRET: the webhook secret"):
        Settings()
