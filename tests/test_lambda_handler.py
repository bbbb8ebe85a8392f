"""The Lambda entry point imports without torch and answers API Gateway HTTP API events.

One probe (a fresh interpreter over moto, as a cold start) serves every test here: it costs seconds."""
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

def submit(i, source_ip, **headers):
    event = api_gateway_event("POST", "/release_task", {"prompt": "p", "audio_duration": 10, "inference_steps": 4})
    event["headers"].update(headers)
    event["requestContext"]["http"]["sourceIp"] = source_ip
    return lh.handler(event, None)["statusCode"]

# A made-up token and a made-up X-Forwarded-For per request, from one source address
report["rotating"] = [submit(i, "198.51.100.7", authorization=f"Bearer rnd-{i}",
                             **{"x-forwarded-for": f"203.0.113.{i}"}) for i in range(3)]
report["other_address"] = submit(9, "198.51.100.8", authorization="Bearer rnd-9")
"""


@pytest.fixture(scope="module")
def report() -> dict:
    pytest.importorskip("handlers.app", reason="handlers.app (the API) has not landed yet")
    return run_lambda_probe(_PROBE, {"ACESTEP_CALLER_MAX_QUEUED": "2", "ACESTEP_RATE_LIMIT_RPS": "0"})


def test_lambda_entry_imports_without_torch_and_serves_health(report):
    # None of these is in the Lambda package (base dependencies only), so importing one would crash there.
    assert report["heavy"] == [], report
    assert report["status"] == 200, report
    # the OpenAI-compatible API is mounted under /openrouter on the same function
    assert report["chat_status"] == 200 and json.loads(report["chat_body"])["service"] == "ACE-Step OpenRouter API"


def test_on_lambda_the_caller_is_api_gateways_source_ip_not_a_token_or_header(report):
    """No key configured: tokens and X-Forwarded-For are the client's word; sourceIp is API Gateway's."""
    assert report["rotating"] == [200, 200, 429], report
    assert report["other_address"] == 200, report
