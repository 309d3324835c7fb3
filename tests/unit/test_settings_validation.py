"""Configuration errors are reported, one line per problem naming the environment variable, never accepted."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from streamproc.cli import main
from streamproc.settings import (
    ENV_READ_ELSEWHERE,
    SECRET_FIELDS,
    Settings,
    SettingsError,
    describe_errors,
    env_warnings,
    load_settings,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only what a test sets: the developer's or CI's own STREAMPROC_ variables must not leak in."""
    for var in list(os.environ):
        if var.upper().startswith("STREAMPROC_"):
            monkeypatch.delenv(var)


def problems(monkeypatch: pytest.MonkeyPatch, **env: str) -> list[str]:
    for var, value in env.items():
        monkeypatch.setenv(f"STREAMPROC_{var}", value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    return caught.value.problems


def test_defaults_are_valid() -> None:
    s = Settings()
    assert load_settings() == s and env_warnings({}) == []
    # pydantic does not validate a default against its own constraints: pass each one in explicitly
    defaults = {name: field.get_default(call_default_factory=True) for name, field in Settings.model_fields.items()}
    assert Settings(**defaults) == s


# the five reported cases first, then the other rules; each with the exact line it must produce
@pytest.mark.parametrize(("env", "line"), [
    pytest.param({"ALERT_THRESHOLD": "1.7"}, "STREAMPROC_ALERT_THRESHOLD=1.7 must be less than or equal to 1",
                 id="churn-threshold-above-1"),
    pytest.param({"ALERT_REARM_THRESHOLD": "0.8"},
                 "STREAMPROC_ALERT_REARM_THRESHOLD=0.8 must be below STREAMPROC_ALERT_THRESHOLD=0.7",
                 id="rearm-above-alert"),
    pytest.param({"TIER_HIGH_SPEND": "400"},
                 "STREAMPROC_TIER_MEDIUM_SPEND=500.0 must be below STREAMPROC_TIER_HIGH_SPEND=400.0",
                 id="high-tier-below-medium"),
    pytest.param({"N_SEGMENTS": "0"}, "STREAMPROC_N_SEGMENTS=0 must be greater than or equal to 2", id="no-segments"),
    pytest.param({"CHURN_HORIZON_DAYS": "-30"}, "STREAMPROC_CHURN_HORIZON_DAYS=-30 must be greater than or equal to 1",
                 id="negative-horizon"),
    pytest.param({"ALERT_REARM_THRESHOLD": "0.7"},
                 "STREAMPROC_ALERT_REARM_THRESHOLD=0.7 must be below STREAMPROC_ALERT_THRESHOLD=0.7",
                 id="rearm-equal-to-alert"),
    pytest.param({"RISK_HIGH": "0.6"}, "STREAMPROC_ALERT_THRESHOLD=0.7 must not exceed STREAMPROC_RISK_HIGH=0.6",
                 id="alert-above-risk-high"),
    pytest.param({"RISK_CRITICAL": "0.75"},
                 "STREAMPROC_RISK_HIGH=0.8 must not exceed STREAMPROC_RISK_CRITICAL=0.75", id="high-above-critical"),
    pytest.param({"LIFECYCLE_AT_RISK_DAYS": "90"},
                 "STREAMPROC_LIFECYCLE_AT_RISK_DAYS=90 must be below STREAMPROC_LIFECYCLE_CHURNED_DAYS=90",
                 id="at-risk-not-before-churned"),
    pytest.param({"KAFKA_HEARTBEAT_INTERVAL_S": "10"},
                 "STREAMPROC_KAFKA_HEARTBEAT_INTERVAL_S=10.0 must be below STREAMPROC_KAFKA_SESSION_TIMEOUT_S=10.0",
                 id="heartbeat-not-below-session"),
    pytest.param({"KAFKA_CONTROLLER_PORT": "19092"},
                 "STREAMPROC_KAFKA_CONTROLLER_PORT=19092 must differ from STREAMPROC_KAFKA_PORT=19092",
                 id="same-local-kafka-ports"),
    pytest.param({"EXPIRE_AFTER_DAYS": "243"},
                 "STREAMPROC_EXPIRE_AFTER_DAYS=243 must exceed 243 days (3 x STREAMPROC_CHURN_HORIZON_DAYS + the days "
                 "to a snapshot's label): a customer must not be dropped before their last churn labels matured",
                 id="expiry-before-the-last-labels"),
    pytest.param({"N_SEGMENTS": "51"}, "STREAMPROC_N_SEGMENTS=51 must be less than or equal to 50", id="many-segments"),
    pytest.param({"WEB_PORT": "70000"}, "STREAMPROC_WEB_PORT=70000 must be less than or equal to 65535", id="port"),
    pytest.param({"MAX_PAYLOAD_BYTES": "2000000"},
                 "STREAMPROC_MAX_PAYLOAD_BYTES=2000000 must be less than or equal to 1000000", id="payload"),
    pytest.param({"CLV_RETENTION_PROBABILITY": "1.5"},
                 "STREAMPROC_CLV_RETENTION_PROBABILITY=1.5 must be less than or equal to 1", id="probability"),
    pytest.param({"SESSION_GAP_S": "0"}, "STREAMPROC_SESSION_GAP_S=0 must be greater than 0", id="interval"),
    pytest.param({"BATCH_LINGER_S": "-0.1"}, "STREAMPROC_BATCH_LINGER_S=-0.1 must be greater than or equal to 0",
                 id="linger"),
    pytest.param({"WINDOWS_DAYS": "[7, 0, 90]"}, "STREAMPROC_WINDOWS_DAYS[1]=0 must be greater than or equal to 1",
                 id="window-item"),
    pytest.param({"WINDOWS_DAYS": "7,30"},
                 "STREAMPROC_WINDOWS_DAYS=7,30 must be JSON (Extra data: line 1 column 2 (char 1))", id="not-json"),
    pytest.param({"KAFKA_HEAP": "1G"}, "STREAMPROC_KAFKA_HEAP=1G must match pattern '^[1-9][0-9]*[mg]$'", id="heap"),
    pytest.param({"RETENTION_ACTIONS": '{"hihg": {"critical": "call"}}'},
                 "STREAMPROC_RETENTION_ACTIONS={'hihg': {'critical': 'call'}} must be keyed by value tier "
                 "(high, medium, low), then risk level (critical, high, medium); unknown: hihg", id="action-typo"),
    pytest.param({"N_SEGMENTS": "abc"},
                 "STREAMPROC_N_SEGMENTS=abc must be a valid integer, unable to parse string as an integer",
                 id="type-error"),
])
def test_invalid_setting_is_one_line_naming_variable_value_and_rule(
        monkeypatch: pytest.MonkeyPatch, env: dict[str, str], line: str) -> None:
    assert problems(monkeypatch, **env) == [line]


@pytest.mark.parametrize("env", [
    {"N_SEGMENTS": "2"}, {"N_SEGMENTS": "50"}, {"RISK_HIGH": "0.7"}, {"RISK_CRITICAL": "0.8"},
    {"ALERT_THRESHOLD": "0.3", "ALERT_REARM_THRESHOLD": "0"}, {"ALERT_COOLDOWN_DAYS": "0"},
    {"MAX_PAYLOAD_BYTES": "1000000"}, {"BATCH_LINGER_S": "0"}, {"WEB_PORT": "65535"}, {"LOG_LEVEL": "debug"},
    {"KAFKA_HEAP": "512m"}, {"WINDOWS_DAYS": "[1]"}, {"TIER_MEDIUM_SPEND": "0", "TIER_HIGH_SPEND": "0.01"},
    {"RETENTION_ACTIONS": '{"high": {"critical": "call"}}'}, {"HTTP_TOKEN": "s3cret-token"},
], ids=str)
def test_boundaries_users_tune_are_accepted(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for var, value in env.items():
        monkeypatch.setenv(f"STREAMPROC_{var}", value)
    load_settings()


def test_every_problem_gets_its_own_line(monkeypatch: pytest.MonkeyPatch) -> None:
    # in the order of the fields in Settings
    assert problems(monkeypatch, ALERT_THRESHOLD="1.7", N_SEGMENTS="0", CHURN_HORIZON_DAYS="-1") == [
        "STREAMPROC_CHURN_HORIZON_DAYS=-1 must be greater than or equal to 1",
        "STREAMPROC_ALERT_THRESHOLD=1.7 must be less than or equal to 1",
        "STREAMPROC_N_SEGMENTS=0 must be greater than or equal to 2",
    ]


def test_every_broken_cross_field_rule_gets_its_own_line(monkeypatch: pytest.MonkeyPatch) -> None:
    assert problems(monkeypatch, ALERT_REARM_THRESHOLD="0.8", TIER_HIGH_SPEND="400") == [
        "STREAMPROC_ALERT_REARM_THRESHOLD=0.8 must be below STREAMPROC_ALERT_THRESHOLD=0.7",
        "STREAMPROC_TIER_MEDIUM_SPEND=500.0 must be below STREAMPROC_TIER_HIGH_SPEND=400.0",
    ]


def test_secrets_are_masked_in_messages(monkeypatch: pytest.MonkeyPatch) -> None:
    # a token read from a secret file with its trailing newline would never match a request's header
    found = problems(monkeypatch, HTTP_TOKEN="hunter2\n", PSEUDONYMIZE_KEY=" ")
    assert found == [
        "STREAMPROC_HTTP_TOKEN=********** must not start or end with whitespace",
        "STREAMPROC_PSEUDONYMIZE_KEY=********** must not be blank (unset it to turn the feature off)",
    ]


def test_secrets_are_masked_whatever_the_error() -> None:
    secrets = {"redis_password", "kafka_sasl_password", "http_token", "pseudonymize_key", "webhook_secret",
               "control_key", "model_signing_key"}
    assert secrets == SECRET_FIELDS
    with pytest.raises(ValidationError) as caught:
        Settings(kafka_sasl_password=12345)
    assert describe_errors(caught.value) == ["STREAMPROC_KAFKA_SASL_PASSWORD=********** must be a valid string"]


def test_rules_hold_for_keyword_construction_but_not_model_copy() -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(alert_rearm_threshold=0.8, n_segments=5)
    assert describe_errors(caught.value) == [
        "STREAMPROC_ALERT_REARM_THRESHOLD=0.8 must be below STREAMPROC_ALERT_THRESHOLD=0.7"]
    assert Settings(http_token=SecretStr("t"), alert_threshold=0.85, risk_high=0.9, risk_critical=0.95).risk_high == 0.9
    # tests tweak settings this way; a copy is not validated again, and must stay possible
    assert Settings().model_copy(update={"alert_threshold": 0.2}).alert_threshold == 0.2


def test_typo_warning_suggests_the_close_setting() -> None:
    assert env_warnings({"STREAMPROC_ALERT_TRESHOLD": "0.9", "STREAMPROC_NSEGMENTS": "3"}) == [
        "STREAMPROC_ALERT_TRESHOLD matches no setting (did you mean STREAMPROC_ALERT_THRESHOLD?)",
        "STREAMPROC_NSEGMENTS matches no setting (did you mean STREAMPROC_N_SEGMENTS?)",
    ]
    assert env_warnings({"STREAMPROC_ZZZ": "1"}) == ["STREAMPROC_ZZZ matches no setting"]


def test_known_allow_listed_and_foreign_variables_are_not_warned_about() -> None:
    assert "STREAMPROC_REQUIRE_COMPILED" in ENV_READ_ELSEWHERE
    assert not {name.removeprefix("STREAMPROC_").lower() for name in ENV_READ_ELSEWHERE} & set(Settings.model_fields)
    # pydantic-settings reads names in any case, so a lower-case name is not a typo either
    assert env_warnings({"STREAMPROC_REQUIRE_COMPILED": "1", "STREAMPROC_ALERT_THRESHOLD": "0.6",
                         "streamproc_redis_url": "redis://x", "PATH": "/bin", "OTHER_N_SEGMENTS": "x"}) == []


def test_every_variable_the_repository_sets_is_known() -> None:
    """The compose file, Dockerfile, Makefile and code set or read these: none may be warned about."""
    name = r"STREAMPROC_[A-Z0-9_]*[A-Z0-9]"
    scans = [(ROOT / "docker-compose.yml", rf"\b{name}\b"), (ROOT / "Dockerfile", rf"\b{name}\b"),
             (ROOT / "Makefile", rf"\b{name}\b")]
    # in Python, the string literals (prose mentions like STREAMPROC_X in a docstring are not variables)
    scans += [(path, rf"[\"']({name})[\"']") for folder in ("streamproc", "tests")
              for path in (ROOT / folder).rglob("*.py") if path != Path(__file__)]
    names = {found for path, pattern in scans if path.exists() for found in re.findall(pattern, path.read_text())}
    assert {"STREAMPROC_TRAINER_ENABLED", "STREAMPROC_REQUIRE_COMPILED", "STREAMPROC_STATE_DIR"} <= names
    assert env_warnings(dict.fromkeys(names, "")) == []


def test_cli_reports_bad_configuration_without_traceback(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("STREAMPROC_N_SEGMENTS", "abc")
    monkeypatch.setenv("STREAMPROC_HTTP_TOKEN", "hunter2 ")
    monkeypatch.setenv("STREAMPROC_ALERT_TRESHOLD", "0.9")
    with pytest.raises(SystemExit) as exited:
        main(["settings"])
    assert exited.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        "warning: STREAMPROC_ALERT_TRESHOLD matches no setting (did you mean STREAMPROC_ALERT_THRESHOLD?)",
        "error: invalid configuration:",
        "  STREAMPROC_HTTP_TOKEN=********** must not start or end with whitespace",
        "  STREAMPROC_N_SEGMENTS=abc must be a valid integer, unable to parse string as an integer",
    ]
    assert "Traceback" not in err and "hunter2" not in err


def test_cli_warns_about_a_typo_and_carries_on(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("STREAMPROC_ALERT_TRESHOLD", "0.9")
    assert main(["settings"]) == 0
    out, err = capsys.readouterr()
    assert '"alert_threshold": 0.7' in out
    assert err.splitlines() == [
        "warning: STREAMPROC_ALERT_TRESHOLD matches no setting (did you mean STREAMPROC_ALERT_THRESHOLD?)"]


def test_each_tunable_has_one_default_the_domain_configs() -> None:
    """The settings take their defaults from the domain's configs: mapped back (streamproc/config.py), the default
    settings give exactly the default configs, so no setting can drift from the domain's default."""
    from streamproc.config import churn_config, decode_limits, fold_config, model_config, rec_config
    from streamproc.domain.churn import ChurnConfig
    from streamproc.domain.customer import FoldConfig
    from streamproc.domain.events import DecodeLimits
    from streamproc.domain.model_config import ModelConfig
    from streamproc.domain.recommend import RecConfig

    defaults = Settings(_env_file=None)
    assert decode_limits(defaults) == DecodeLimits()
    assert fold_config(defaults) == FoldConfig()
    assert churn_config(defaults) == ChurnConfig()
    assert rec_config(defaults) == RecConfig()
    assert model_config(defaults) == ModelConfig()
    # and a setting given reaches its config (the mapping is not a constant)
    changed = Settings(_env_file=None, session_gap_s=60, rec_k=3, churn_horizon_days=30)
    assert fold_config(changed).session_gap_ms == 60_000
    assert rec_config(changed).k == 3 and model_config(changed).rec.k == 3
    assert churn_config(changed).horizon_days == 30
