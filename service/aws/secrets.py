"""The API key from Secrets Manager or SSM Parameter Store, so it never sits in the image or the task definition."""
from __future__ import annotations

import json
import os
from typing import Mapping, Optional

from ..config import Settings
from .clients import aws_client

SECRET_ARN_ENV = "ACESTEP_API_KEY_SECRET_ARN"
SSM_PARAM_ENV = "ACESTEP_API_KEY_SSM_PARAM"


def resolve_secret_env(settings: Settings, env: Optional[Mapping[str, str]] = None) -> Settings:
    """Fill settings.api_key from the secret named in the environment; returns the same settings.

    ACESTEP_API_KEY_SECRET_ARN: a Secrets Manager secret holding the key as plain text or as JSON
    {"api_key": "..."}. ACESTEP_API_KEY_SSM_PARAM: an SSM parameter (SecureString is decrypted).
    When both are set the Secrets Manager one wins. Nothing set: settings are left alone.
    """
    env = os.environ if env is None else env
    arn = env.get(SECRET_ARN_ENV, "").strip()
    param = env.get(SSM_PARAM_ENV, "").strip()
    if arn:
        value = aws_client("secretsmanager", settings).get_secret_value(SecretId=arn)["SecretString"]
        settings.api_key = _unwrap(value)
    elif param:
        value = aws_client("ssm", settings).get_parameter(Name=param, WithDecryption=True)["Parameter"]["Value"]
        settings.api_key = value.strip()
    return settings


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
