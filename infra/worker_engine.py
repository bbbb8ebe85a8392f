"""The worker engine's memory and LM settings as CDK context keys.

Each key is the name of the worker's setting (service/config.py's Settings field, `quantize` for
ACESTEP_QUANTIZE). A given value becomes that variable in the worker container's environment only: the API
Lambda runs no engine. An empty value sets nothing, so the engine's own default applies. Each value goes
through the settings loader the worker starts with (service.config.load_settings), so a value the worker
would refuse at every start stops `cdk synth` instead, naming the key.
"""
from __future__ import annotations

from typing import Mapping

from service.config import ENV_NAMES, ConfigError, load_settings

KEYS = ("quantize", "quantize_dit", "quantize_lm", "offload", "init_llm", "lm_model_path", "lm_backend", "lm_device")
VARIABLE = {attr: name for name, attr in ENV_NAMES.items() if attr in KEYS}  # quantize -> ACESTEP_QUANTIZE


class EngineOptionError(ValueError):
    """A context key's value that the worker's settings loader refuses."""


def worker_environment(values: Mapping[str, str]) -> dict[str, str]:
    """{key: value} (the context keys above) -> the worker's variables for the non-empty ones, each checked."""
    env: dict[str, str] = {}
    for key in KEYS:
        value = str(values.get(key) or "").strip()
        if not value:
            continue
        name = VARIABLE[key]
        try:
            load_settings(env={name: value}, dotenv_path=None)
        except ConfigError as exc:
            raise EngineOptionError(f"CDK context key `{key}` (-c {key}={value}): the workers' {name} would "
                                    f"refuse it at start; {exc}") from None
        env[name] = value
    return env
