"""Signed URLs are keyed with a random, stored, rotatable secret, never with the API key (issue 11, defect 5)."""
from __future__ import annotations

import hashlib
import hmac
import os
import stat
import time

from service.signed_urls import audio_url, url_keys, verify
from service.config import Settings
from service.embedded import make_embedded_backend
from service.embedded.signing_secret import FILE_NAME, FileSigningSecret

KEY = "outputs/t/1-0.mp3"
TTL = 3600


def _sig_and_expiry(url: str) -> tuple[str, str]:
    query = dict(p.split("=", 1) for p in url.split("?", 1)[1].split("&"))
    return query["sig"], query["expires"]


def test_the_api_key_cannot_be_recovered_from_a_signed_url(tmp_path):
    keys = url_keys(make_embedded_backend(Settings(api_key="hunter2", data_dir=str(tmp_path / "a"))))
    sig, exp = _sig_and_expiry(audio_url(keys, KEY, TTL))
    # The old derivation (prefix + API key) no longer matches: a dictionary attack on the key has nothing to test.
    old = hmac.new(b"acestep-audio:hunter2", f"audio\n{KEY}\n{exp}".encode(), hashlib.sha256).hexdigest()
    assert sig != old
    # Same API key, another service: another secret.
    other = url_keys(make_embedded_backend(Settings(api_key="hunter2", data_dir=str(tmp_path / "b"))))
    assert not verify(other, "audio", KEY, exp, sig) and verify(keys, "audio", KEY, exp, sig)


def test_the_embedded_secret_is_random_private_and_shared_by_processes_of_one_data_dir(tmp_path):
    first, second = FileSigningSecret(str(tmp_path)), FileSigningSecret(str(tmp_path))
    keys = first.load()
    assert len(keys.current) == 32 and second.load() == keys
    mode = stat.S_IMODE(os.stat(tmp_path / FILE_NAME).st_mode)
    assert mode == 0o600


def test_rotation_keeps_old_urls_valid_for_the_grace_window_only(tmp_path):
    secret = FileSigningSecret(str(tmp_path), grace_seconds=3600)
    sig, exp = _sig_and_expiry(audio_url(secret.load, KEY, TTL))
    secret.rotate()
    new_sig, _ = _sig_and_expiry(audio_url(secret.load, KEY, TTL))
    assert new_sig != sig
    assert verify(secret.load, "audio", KEY, exp, sig)  # handed out before the rotation: still plays
    secret.grace_seconds = 0  # the grace window has passed
    assert not verify(secret.load, "audio", KEY, exp, sig)
    assert verify(secret.load, "audio", KEY, exp, new_sig)


def test_aws_secret_rotation_accepts_the_previous_value(tmp_path):
    from tests.aws_support import aws_backend

    with aws_backend(tmp_path) as backend:
        from service.aws.clients import aws_client
        from service.aws.signing_secret import SecretsManagerSigningSecret

        arn = backend.settings.signing_secret_arn
        assert arn  # provision (and the CDK stack) create it
        secret = SecretsManagerSigningSecret(aws_client("secretsmanager", backend.settings), arn)
        sig, exp = _sig_and_expiry(audio_url(secret.load, KEY, TTL))
        aws_client("secretsmanager", backend.settings).put_secret_value(SecretId=arn, SecretString="rotated" * 8)
        assert verify(secret.load, "audio", KEY, exp, sig)  # AWSPREVIOUS
        assert _sig_and_expiry(audio_url(secret.load, KEY, TTL))[0] != sig
        assert time.time() < int(exp)
