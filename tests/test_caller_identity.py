"""Who a caller is, for the per-caller task limits and the request rate (handlers/caller.py).

A client-chosen token is not an identity: without a configured key (the default) a made-up
Bearer token or body ai_token per request must not buy a fresh set of limits, and neither may a
made-up X-Forwarded-For unless the peer is a configured proxy (ACESTEP_TRUSTED_PROXIES).
"""
from __future__ import annotations

import httpx
import pytest
from fastapi.testclient import TestClient

from entrypoints.bootstrap import build_openrouter_app
from handlers.app import create_app
from service.config import ConfigError, load_settings
from service.embedded import make_embedded_backend
from tests.listener_support import listening

PROMPT = {"prompt": "lo-fi piano", "audio_duration": 10, "inference_steps": 4}
CHAT = {"messages": [{"role": "user", "content": "<prompt>lo-fi piano</prompt>"}],
        "audio_config": {"duration": 10}, "inference_steps": 4}


def _apps(settings, **overrides):
    """(ACE-Step client, chat client, backend) on one backend, as bootstrap wires them; no worker."""
    settings = settings.model_copy(update=overrides)
    backend = make_embedded_backend(settings)
    api = create_app(settings, backend)
    return TestClient(api), TestClient(build_openrouter_app(settings, api)), backend


def test_made_up_tokens_do_not_escape_the_callers_task_limit_without_a_key(settings):
    api, chat, backend = _apps(settings, caller_max_queued=3, rate_limit_rps=0, openrouter_max_wait=0.05)
    codes = [api.post("/release_task", json=PROMPT, headers={"Authorization": f"Bearer rnd-{i}"}).status_code
             for i in range(3)]
    assert codes == [200, 200, 200]
    r = api.post("/release_task", json=PROMPT, headers={"Authorization": "Bearer rnd-3"})
    assert r.status_code == 429 and "ACESTEP_CALLER_MAX_QUEUED" in r.text, r.text
    r = api.post("/release_task", json={**PROMPT, "ai_token": "rnd-body"})
    assert r.status_code == 429, r.text
    r = chat.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer rnd-chat"})
    assert r.status_code == 429, r.text
    assert backend.queue.size() == 3


def test_made_up_tokens_do_not_escape_the_request_rate_without_a_key(settings):
    api, chat, _ = _apps(settings, rate_limit_rps=0.5)  # a burst of one request, then one per 2 s
    bad = {"prompt": "p", "audio_duration": 1}  # 400, but a POST counts like any other
    assert api.post("/release_task", json=bad, headers={"Authorization": "Bearer rnd-0"}).status_code == 400
    for i, (client, path) in enumerate(((api, "/release_task"), (chat, "/v1/chat/completions")), 1):
        r = client.post(path, json=bad, headers={"Authorization": f"Bearer rnd-{i}"})
        assert r.status_code == 429 and "ACESTEP_RATE_LIMIT_RPS" in r.text, r.text


def test_a_configured_key_names_its_holder_and_a_wrong_one_is_the_address(settings):
    api, _, _ = _apps(settings, api_key="sk-real", caller_max_queued=1, rate_limit_rps=0)
    good = {"Authorization": "Bearer sk-real"}
    assert api.post("/release_task", json=PROMPT, headers=good).status_code == 200
    r = api.post("/release_task", json=PROMPT, headers=good)
    assert r.status_code == 429, r.text  # the key holder's one task is queued
    # The key in the body authenticates, but the rate limiter (before the body is read) counts the
    # address: so do the task limits, and the address has nothing queued yet.
    assert api.post("/release_task", json={**PROMPT, "ai_token": "sk-real"}).status_code == 200
    r = api.post("/release_task", json={**PROMPT, "ai_token": "sk-real"})
    assert r.status_code == 429, r.text


def test_the_key_in_the_body_is_counted_as_one_caller_by_both_limits(settings):
    """Issue 22: the rate limiter and the task limits must see the same caller for one request."""
    api, _, _ = _apps(settings, api_key="sk-real", caller_max_queued=1, rate_limit_rps=0.5)
    assert api.post("/release_task", json=PROMPT, headers={"Authorization": "Bearer sk-real"}).status_code == 200
    # Rate: a fresh bucket (the address's); task limits: the same fresh caller, so not the key's 429.
    r = api.post("/release_task", json={**PROMPT, "ai_token": "sk-real"})
    assert r.status_code == 200, r.text
    r = api.post("/release_task", json={**PROMPT, "ai_token": "sk-real"})
    assert r.status_code == 429 and "ACESTEP_RATE_LIMIT_RPS" in r.text, r.text


def test_trusted_proxies_must_be_addresses_or_networks():
    assert load_settings(env={"ACESTEP_TRUSTED_PROXIES": "10.0.0.0/8, 192.168.1.7"},
                         dotenv_path=None).trusted_proxies == ["10.0.0.0/8", "192.168.1.7"]
    with pytest.raises(ConfigError, match="ACESTEP_TRUSTED_PROXIES"):
        load_settings(env={"ACESTEP_TRUSTED_PROXIES": "proxy.example"}, dotenv_path=None)


@pytest.mark.parametrize("trusted", [[], ["127.0.0.0/8"]])
def test_forwarded_for_names_the_client_only_from_a_trusted_proxy(settings, trusted):
    with listening(settings, caller_max_queued=2, rate_limit_rps=0, trusted_proxies=trusted) as (host, port), httpx.Client(base_url=f"http://{host}:{port}", timeout=30) as client:
        codes = [client.post("/release_task", json=PROMPT, headers={"X-Forwarded-For": f"203.0.113.{i}"}).status_code
                 for i in range(3)]
    # Untrusted (the default), the header is the client's word: one caller, the loopback peer.
    assert codes == ([200, 200, 429] if not trusted else [200, 200, 200]), codes
