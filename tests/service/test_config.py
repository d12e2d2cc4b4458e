"""Settings: read from NORMSERVE_* variables, checked, combined per model."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.config import Settings


def test_settings_come_from_prefixed_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NORMSERVE_REPOSITORY", "/srv/models")
    monkeypatch.setenv("NORMSERVE_PORT", "9000")
    monkeypatch.setenv("NORMSERVE_PROVIDER", "cuda")
    monkeypatch.setenv("NORMSERVE_REQUIRE_GPU", "true")
    monkeypatch.setenv("NORMSERVE_MAX_QUEUE_DELAY_MS", "2.5")
    monkeypatch.setenv("NORMSERVE_MODELS", '{"resnet18-bn": {"max_batch_size": 8, "max_queue_delay_ms": 5}}')
    settings = Settings()
    assert settings.repository == Path("/srv/models") and settings.port == 9000
    assert settings.provider == "cuda" and settings.require_gpu
    assert settings.models["resnet18-bn"].max_batch_size == 8


def test_per_model_batching_combines_override_default_and_the_verified_batch_size() -> None:
    settings = Settings(max_queue_delay_ms=2, max_batch_size=16, models={"big": {"max_batch_size": 4}})
    big = settings.batching("big", model_max_batch_size=32)
    assert (big.max_batch_size, big.max_queue_delay_s) == (4, 0.002)
    other = settings.batching("other", model_max_batch_size=64)
    assert other.max_batch_size == 16  # the server-wide cap
    assert settings.batching("small", model_max_batch_size=8).max_batch_size == 8  # never past what was verified


def test_the_idle_spin_reaches_every_model_s_batching_in_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().batching("any", model_max_batch_size=8).idle_spin_s == pytest.approx(200e-6)
    monkeypatch.setenv("NORMSERVE_IDLE_SPIN_US", "0")
    assert Settings().batching("any", model_max_batch_size=8).idle_spin_s == 0.0
    monkeypatch.setenv("NORMSERVE_IDLE_SPIN_US", "250")
    settings = Settings()
    assert settings.batching("any", model_max_batch_size=8).idle_spin_s == pytest.approx(250e-6)
    assert settings.batching("fixed", model_max_batch_size=0).idle_spin_s == pytest.approx(250e-6)


def test_a_model_without_a_batch_dimension_keeps_it_whatever_the_caps_say() -> None:
    settings = Settings(max_queue_delay_ms=2, max_batch_size=16, models={"fixed": {"max_batch_size": 4}})
    fixed = settings.batching("fixed", model_max_batch_size=0)
    assert (fixed.max_batch_size, fixed.max_queue_delay_s) == (0, 0.0)  # nothing to batch, so nothing to wait for
    assert settings.batching("other", model_max_batch_size=0).max_batch_size == 0


@pytest.mark.parametrize(
    ("variable", "value", "named"),
    [
        ("NORMSERVE_PROVIDER", "tpu", "provider"),
        ("NORMSERVE_QUEUE_LIMIT", "0", "queue_limit"),
        ("NORMSERVE_MODELS", '{"m": {"max_batch_size": 0}}', "max_batch_size"),
        ("NORMSERVE_MODELS", '{"m": {"batch": 4}}', "batch"),
        ("NORMSERVE_MAX_QUEUE_DELAY_MS", "-1", "max_queue_delay_ms"),
        ("NORMSERVE_IDLE_SPIN_US", "-5", "idle_spin_us"),
        ("NORMSERVE_IDLE_SPIN_US", "20000", "idle_spin_us"),  # past 10 ms it is a core burnt, not a wake-up saved
    ],
)
def test_a_bad_setting_is_refused_at_start_naming_it(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, named: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError, match=named):
        Settings()
