"""Secrets from Secrets Manager or SSM Parameter Store, so they never sit in the image or the task definition:
the API key, and a Hugging Face token for workers that download gated or private models."""
from __future__ import annotations

import json
import os
from typing import Mapping, MutableMapping, Optional

from ..config import Settings
from .clients import aws_client

SECRET_ARN_ENV = "ACESTEP_API_KEY_SECRET_ARN"
SSM_PARAM_ENV = "ACESTEP_API_KEY_SSM_PARAM"
HF_TOKEN_SECRET_ENV = "ACESTEP_HF_TOKEN_SECRET_ARN"


def resolve_secret_env(settings: Settings, env: Optional[Mapping[str, str]] = None) -> Settings:
    """Settings whose api_key is the secret named in the environment (a copy: Settings never change).

    ACESTEP_API_KEY_SECRET_ARN: a Secrets Manager secret holding the key as plain text or as JSON
    {"api_key": "..."}. ACESTEP_API_KEY_SSM_PARAM: an SSM parameter (SecureString is decrypted).
    When both are set the Secrets Manager one wins. Nothing set: settings are left alone.
    """
    env = os.environ if env is None else env
    arn = env.get(SECRET_ARN_ENV, "").strip()
    param = env.get(SSM_PARAM_ENV, "").strip()
    if arn:
        value = aws_client("secretsmanager", settings).get_secret_value(SecretId=arn)["SecretString"]
        return settings.model_copy(update={"api_key": _unwrap(value)})
    elif param:
        value = aws_client("ssm", settings).get_parameter(Name=param, WithDecryption=True)["Parameter"]["Value"]
        return settings.model_copy(update={"api_key": value.strip()})
    return settings


def resolve_hub_token(settings: Settings, env: Optional[MutableMapping[str, str]] = None) -> None:
    """Put the Hugging Face token named by ACESTEP_HF_TOKEN_SECRET_ARN into HF_TOKEN, where huggingface_hub
    reads it (plain text or JSON {"token": "..."}). The official ACE-Step repos are public: this is only
    for gated or private ones."""
    target: MutableMapping[str, str] = os.environ if env is None else env
    arn = target.get(HF_TOKEN_SECRET_ENV, "").strip()
    if not arn or target.get("HF_TOKEN"):
        return
    value = aws_client("secretsmanager", settings).get_secret_value(SecretId=arn)["SecretString"].strip()
    if value.startswith("{"):
        value = str(json.loads(value).get("token", "")).strip()
    target["HF_TOKEN"] = value


def _unwrap(secret_string: str) -> str:
    text = secret_string.strip()
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except ValueError:
            return text
        if isinstance(data, dict) and "api_key" in data:
            return str(data["api_key"]).strip()
    return text
