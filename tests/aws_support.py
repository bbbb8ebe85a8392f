"""Test support for the AWS backend: moto in-process (mock_aws) or moto's HTTP server.

    with aws_backend(tmp_path, max_receives=2) as backend:
        backend.store.create(...)

Fake credentials and a fixed region are set first, so nothing here can reach real AWS.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Iterator, Optional

FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_SECURITY_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}


def use_fake_aws_credentials() -> None:
    os.environ.update(FAKE_AWS_ENV)
    # A developer's profile or config file must not leak in.
    for name in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        os.environ.pop(name, None)


def aws_settings(tmp_path, settings=None, **overrides):
    """AWS settings for tests; `settings` (optional) supplies everything but the AWS names."""
    from service.config import Settings

    base = settings or Settings(data_dir=str(tmp_path), visibility_timeout=30.0)
    base = base.model_copy(update=dict(backend="aws", aws_region="us-east-1", table_name="acestep-test-tasks",
                                       queue_url="acestep-test-tasks", bucket="acestep-test-audio"))
    return base.model_copy(update=overrides)


@contextlib.contextmanager
def aws_backend(tmp_path, settings=None, **setting_overrides) -> Iterator:
    """moto in-process: provision the resources and yield a Backend (backend.settings holds the names).

    `settings` is an optional base Settings (e.g. the test's fixture); overrides apply on top.
    """
    use_fake_aws_credentials()
    from moto import mock_aws

    from service.aws import make_aws_backend
    from service.aws.provision import provision

    with mock_aws():
        settings = provision(aws_settings(tmp_path, settings, **setting_overrides))
        backend = make_aws_backend(settings)
        backend.settings = settings  # handy for tests that need the queue/DLQ urls
        yield backend


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """moto's HTTP server on 127.0.0.1 (for presigned URLs and multi-process tests); yields its URL."""
    use_fake_aws_credentials()
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


_LAMBDA_PROBE = """
import json, os
from tests.aws_support import use_fake_aws_credentials, aws_settings
use_fake_aws_credentials()
from moto import mock_aws
with mock_aws():
    from service.aws.provision import provision
    s = provision(aws_settings("/tmp"))
    os.environ.update(ACESTEP_BACKEND="aws", ACESTEP_TABLE_NAME=s.table_name, ACESTEP_QUEUE_URL=s.queue_url,
                      ACESTEP_DLQ_URL=s.dlq_url, ACESTEP_BUCKET=s.bucket, **{extra_env!r})
    import entrypoints.lambda_api as lh
    report = {{}}
{body}
print(json.dumps(report))
"""


def run_lambda_probe(body: str, extra_env: Optional[dict] = None) -> dict:
    """Import the Lambda entry in a fresh interpreter over moto, as a cold start does, then run `body`
    inside mock_aws (with `lh` the entry module, `s` the provisioned settings, `json` and `os` in scope)
    and return the `report` dict it fills. No ACESTEP_ variable of this process leaks in."""
    code = _LAMBDA_PROBE.format(extra_env=extra_env or {}, body=textwrap.indent(textwrap.dedent(body), "    "))
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACESTEP_")}
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])
