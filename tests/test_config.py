"""Settings: ACESTEP_* names, CLI > environment > .env > default, list and bool forms, ConfigError."""
from __future__ import annotations

import pytest

from entrypoints.api_server import child_env
from service.config import ENV_NAMES, ConfigError, Settings, load_settings


def test_keywords_in_code_and_no_assignment_after_build(tmp_path):
    s = Settings(data_dir=str(tmp_path), visibility_timeout=30.0, max_upload_mb=2)
    assert (s.data_dir, s.visibility_timeout, s.max_upload_bytes) == (str(tmp_path), 30.0, 2 * 1024 * 1024)
    with pytest.raises(ValueError, match="frozen"):
        s.queue_maxsize = 10  # frozen: what was built with these settings never sees them change
    changed = s.model_copy(update={"queue_maxsize": 10})
    assert (changed.queue_maxsize, s.queue_maxsize) == (10, 200)


def test_code_built_settings_ignore_the_shell(monkeypatch):
    monkeypatch.setenv("ACESTEP_API_KEY", "from-shell")
    assert Settings().api_key == ""


def test_precedence_cli_then_environment_then_dotenv_then_default(tmp_path, monkeypatch):
    dotenv = tmp_path / ".env"
    dotenv.write_text("ACESTEP_API_PORT=1111\nACESTEP_DATA_DIR=/from-file\nACESTEP_DEVICE=cpu\n")
    monkeypatch.setenv("ACESTEP_API_PORT", "2222")
    monkeypatch.setenv("ACESTEP_DATA_DIR", "/from-env")
    monkeypatch.setenv("ACESTEP_DEVICE", "")  # so that undoing the test also removes what .env set
    monkeypatch.delenv("ACESTEP_DEVICE")
    s = load_settings({"data_dir": "/from-cli", "host": None}, dotenv_path=str(dotenv))
    assert (s.data_dir, s.port, s.device, s.host) == ("/from-cli", 2222, "cpu", "127.0.0.1")


def test_values_from_strings():
    s = load_settings(env={"ACESTEP_ALLOWED_AUDIO_DIRS": " /a, /b ,,", "ACESTEP_BATCH_TASKS": "off",
                           "ACESTEP_AVG_JOB_SECONDS": "2.5", "ACESTEP_API_KEY": "", "AWS_REGION": "eu-west-1"},
                      dotenv_path=None)
    assert s.allowed_audio_dirs == ["/a", "/b"] and s.batch_compatible_tasks is False
    assert s.avg_job_seconds == 2.5 and s.api_key == "" and s.aws_region == "eu-west-1"
    assert s.public_base_url == ""
    base = load_settings(env={"ACESTEP_PUBLIC_BASE_URL": "https://api.example.com/prefix/"}, dotenv_path=None)
    assert base.public_base_url == "https://api.example.com/prefix"  # joined with "/v1/audio?...": no "//"


@pytest.mark.parametrize("name,value", [
    ("ACESTEP_API_PORT", "eighty"), ("ACESTEP_QUEUE_MAXSIZE", "0"), ("ACESTEP_BACKEND", "gcp"),
    ("ACESTEP_ALLOW_DOWNLOAD", "maybe"), ("ACESTEP_PUBLIC_BASE_URL", "api.example.com"),
    ("ACESTEP_PUBLIC_BASE_URL", "https://api.example.com/?x=1"),
])
def test_bad_values_are_a_config_error_naming_the_variable(name, value):
    with pytest.raises(ConfigError) as info:
        load_settings(env={name: value}, dotenv_path=None)
    assert name in str(info.value) and repr(value) in str(info.value)


def test_init_llm_reads_its_spellings_as_true_false_auto_and_refuses_a_typo():
    """The worker reads only true/false/auto (entrypoints/bootstrap.py); a typo was once read as auto."""
    read = {v: load_settings(env={"ACESTEP_INIT_LLM": v}, dotenv_path=None).init_llm
            for v in ("True", "1", "yes", "on", "false", "0", "No", "off", "auto")}
    assert read == {"True": "true", "1": "true", "yes": "true", "on": "true", "false": "false", "0": "false",
                    "No": "false", "off": "false", "auto": "auto"}
    with pytest.raises(ConfigError, match=r"ACESTEP_INIT_LLM .*true, false or auto \(or 1/yes/on for true, "
                                          r"0/no/off for false\) \(got 'ture'\)"):
        load_settings({"init_llm": "ture"}, env={}, dotenv_path=None)  # as `acestep-api --init-llm ture` gives it


def test_child_env_round_trips(tmp_path):
    s = Settings(data_dir=str(tmp_path), cors_origins=["http://a:1", "http://b"], allow_download=False,
                 api_key="sk", queue_workers=3, aws_region="eu-west-2")
    env = child_env(s)
    assert set(ENV_NAMES) <= set(env)
    assert load_settings(env=env, dotenv_path=None) == s
