"""The URL-signing secret on AWS: a Secrets Manager secret the stack creates (ACESTEP_SIGNING_SECRET_ARN);
the webhook-signing secret likewise (ACESTEP_WEBHOOK_SECRET_ARN, its string read by `decode`).

Rotate with `aws secretsmanager put-secret-value` (or a rotation schedule): the old value becomes
AWSPREVIOUS, which stays accepted until the next rotation. The secret string is used as is (the
stack generates 64 random characters).
"""
from __future__ import annotations

from typing import Callable

from botocore.exceptions import ClientError

from ..signing_keys import SigningKeys
from .clients import AwsClient, error_code


class SecretsManagerSigningSecret:
    def __init__(self, client: AwsClient, secret_id: str, decode: Callable[[str], bytes] = str.encode):
        self._sm, self.secret_id, self._decode = client, secret_id, decode

    def load(self) -> SigningKeys:
        current = self._value("AWSCURRENT")
        if current is None:
            raise RuntimeError(f"the signing secret {self.secret_id} has no current value")
        previous = self._value("AWSPREVIOUS")
        return SigningKeys(current, (previous,) if previous is not None and previous != current else ())

    def _value(self, stage: str) -> bytes | None:
        try:
            value = self._sm.get_secret_value(SecretId=self.secret_id, VersionStage=stage)["SecretString"]
        except ClientError as exc:
            if error_code(exc) == "ResourceNotFoundException":
                return None
            raise
        return self._decode(value)
