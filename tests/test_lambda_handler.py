"""The Lambda entry point imports without torch and answers an API Gateway HTTP API event."""
from __future__ import annotations

import json

import pytest

from tests.aws_support import run_lambda_probe

_PROBE = """
import sys
from entrypoints.snapstart import api_gateway_event
resp = lh.handler(api_gateway_event("GET", "/health", None), None)
chat_resp = lh.handler(api_gateway_event("GET", "/openrouter/health", None), None)
report.update(heavy=sorted(m for m in ("torch", "diffusers", "transformers", "numpy", "soundfile") if m in sys.modules),
              status=resp["statusCode"], body=resp["body"],
              chat_status=chat_resp["statusCode"], chat_body=chat_resp["body"])
"""


def test_lambda_entry_imports_without_torch_and_serves_health():
    pytest.importorskip("handlers.app", reason="handlers.app (the API) has not landed yet")
    report = run_lambda_probe(_PROBE)
    # None of these is in the Lambda package (base dependencies only), so importing one would crash there.
    assert report["heavy"] == [], report
    assert report["status"] == 200, report
    # the OpenAI-compatible API is mounted under /openrouter on the same function
    assert report["chat_status"] == 200 and json.loads(report["chat_body"])["service"] == "ACE-Step OpenRouter API"
