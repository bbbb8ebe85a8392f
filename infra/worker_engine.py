"""The worker engine's memory and LM settings as CDK context keys.

Each key is the name of the worker's setting (service/config.py's Settings field, `quantize` for
ACESTEP_QUANTIZE). A given value becomes that variable in the worker container's environment only: the API
Lambda runs no engine. An empty value sets nothing, so the engine's own default applies. Each value goes
through the settings loader the worker starts with (service.config.load_settings), so a value the worker
would refuse at every start stops `cdk synth` instead, naming the key; so do values the worker takes one by one
but not together (quantize=int8 with lm_backend=vllm: engine.lm.backend_choice.quantize_refusal, the rule the
worker's LM load applies).
"""
from __future__ import annotations

from typing import Mapping

from engine.lm.backend_choice import quantize_refusal  # torch-free: the rule the worker's LM load applies
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
    return _checked_together(env)


def _checked_together(env: dict[str, str]) -> dict[str, str]:
    """`env` when the worker would start with all of it; else EngineOptionError naming the keys and what to set."""
    given = " ".join(f"-c {key}={env[VARIABLE[key]]}" for key in KEYS if VARIABLE[key] in env)
    try:
        settings = load_settings(env=env, dotenv_path=None)
    except ConfigError as exc:
        raise EngineOptionError(f"CDK context keys {given}: the workers would refuse them at start; {exc}") from None
    # vLLM is chosen by lm_backend=vllm here; `auto` picks it only in an image that has it (WITH_VLLM), unknown at synth
    refusal = quantize_refusal(settings.lm_backend, settings.lm_quantization)
    if refusal:
        raise EngineOptionError(f"CDK context keys {given}: every worker would refuse to start: {refusal}. As "
                                "context keys: -c quantize_lm=none or -c lm_backend=pt")
    return env
