"""The Lambda entry point imports without torch and answers an API Gateway HTTP API event."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_PROBE = """
import json, sys
from tests.aws_support import use_fake_aws_credentials, aws_settings
use_fake_aws_credentials()
from moto import mock_aws
with mock_aws():
    from service.aws.provision import provision
    s = provision(aws_settings("/tmp"))
    import os
    os.environ.update(ACESTEP_BACKEND="aws", ACESTEP_TABLE_NAME=s.table_name, ACESTEP_QUEUE_URL=s.queue_url,
                      ACESTEP_DLQ_URL=s.dlq_url, ACESTEP_BUCKET=s.bucket)
    import entrypoints.lambda_api as lh
    event = {
        "version": "2.0", "routeKey": "$default", "rawPath": "/health", "rawQueryString": "",
        "headers": {"host": "example.execute-api.us-east-1.amazonaws.com"},
        "requestContext": {"http": {"method": "GET", "path": "/health", "sourceIp": "1.2.3.4",
                                    "protocol": "HTTP/1.1", "userAgent": "t"},
                           "domainName": "example.execute-api.us-east-1.amazonaws.com",
                           "requestId": "r", "stage": "$default", "accountId": "1", "apiId": "a",
                           "time": "now", "timeEpoch": 0},
        "isBase64Encoded": False,
    }
    resp = lh.handler(event, None)
    chat = dict(event, rawPath="/openrouter/health",
                requestContext=dict(event["requestContext"], http=dict(event["requestContext"]["http"],
                                                                      path="/openrouter/health")))
    chat_resp = lh.handler(chat, None)
heavy = sorted(m for m in ("torch", "diffusers", "transformers", "numpy", "soundfile") if m in sys.modules)
print(json.dumps({"heavy": heavy, "status": resp["statusCode"], "body": resp["body"],
                  "chat_status": chat_resp["statusCode"], "chat_body": chat_resp["body"]}))
"""


def test_lambda_entry_imports_without_torch_and_serves_health():
    pytest.importorskip("handlers.app", reason="handlers.app (the API) has not landed yet")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACESTEP_")}
    out = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    # None of these is in the Lambda package (base dependencies only), so importing one would crash there.
    assert report["heavy"] == [], report
    assert report["status"] == 200, report
    # the OpenAI-compatible API is mounted under /openrouter on the same function
    assert report["chat_status"] == 200 and json.loads(report["chat_body"])["service"] == "ACE-Step OpenRouter API"
