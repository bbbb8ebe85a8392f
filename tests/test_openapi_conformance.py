"""/openapi.json agrees with what the routes accept (issue 11, defect 9), checked with schemathesis
in-process on the ASGI app: for every operation, requests the schema allows are not refused as
invalid, nothing is a 500, and every answer's status and body are what the schema documents.

Deterministic (derandomized hypothesis) and small: a few examples per operation.
"""
from __future__ import annotations

import json

import hypothesis
import schemathesis
from hypothesis import HealthCheck, Phase
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import positive_data_acceptance

from handlers.openapi_bodies import RELEASE_RULES
from handlers.routes_adapters import STATE_RULES as ADAPTER_RULES
from handlers.routes_models import STATE_RULES as MODEL_RULES
from tests.api_support import make_api

# Answers a schema-valid request may get: auth and limits (documented per route), and for
# /format_input a 503 (this server runs no LM).
ALLOWED_REFUSALS = {401, 403, 404, 413, 429, 503}
EXAMPLES = {"/release_task": 25}  # the route with the most to agree on; the others take a few each


def _refusal_is_documented(case, response) -> bool:
    """A 400 for a schema-valid /release_task body must name a rule the schema says it cannot state;
    a 422 is an Idempotency-Key reused for another request (state, not the request's form)."""
    detail = json.loads(response.text)["detail"]
    if case.path == "/v1/chat/completions":  # loosely typed (any extra field, audio_config values): a
        return response.status_code in (400, 504) and bool(detail)  # value's 400 names it; 504: no worker ran it
    state = {**ADAPTER_RULES, **MODEL_RULES}.get(case.path, {}).get(response.status_code)
    if state:  # a refusal that depends on what is stored or run (the routes' STATE_RULES)
        return any(rule in detail for rule in state)
    rules = {400: RELEASE_RULES, 422: ("was already used",)}.get(response.status_code)
    if case.path != "/release_task" or rules is None:
        return False
    return any(rule in detail for rule in rules)


def _check(case) -> None:
    response = case.call()
    status = response.status_code
    assert status != 500, f"{case.method} {case.path}: {response.text}"
    if status >= 400 and status not in ALLOWED_REFUSALS:
        assert _refusal_is_documented(case, response), f"{case.method} {case.path}: {status} {response.text}"
    # status and content type documented, body conforming to the documented schema, ...
    case.validate_response(response, excluded_checks=[positive_data_acceptance, not_a_server_error])


def test_schema_valid_requests_are_accepted_and_answered_as_documented(settings):
    api = make_api(settings, openrouter_max_wait=0.2)  # no worker runs: a chat that waits answers 504 soon
    schema = schemathesis.openapi.from_asgi("/openapi.json", api.client.app)
    schema.config.generation.update(modes=[schemathesis.GenerationMode.POSITIVE])
    operations = [op.ok() for op in schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /release_task", "POST /query_result", "POST /cancel_task",
                                               "GET /v1/audio", "POST /v1/uploads", "POST /format_input",
                                               "POST /v1/chat/completions"}
    for operation in operations:
        @hypothesis.settings(max_examples=EXAMPLES.get(operation.path, 6), derandomize=True, deadline=None,
                             database=None, phases=[Phase.explicit, Phase.generate],
                             suppress_health_check=list(HealthCheck))
        @hypothesis.given(operation.as_strategy())
        def conforms(case):
            _check(case)

        conforms()
