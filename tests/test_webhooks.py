"""Webhooks: which URLs are called (no SSRF), the Standard Webhooks signature (checked with the
reference library), retries, the outbox that survives a restart, slow receivers, never blocking
the worker, on both backends (embedded and AWS through moto)."""
from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer, ThreadingHTTPServer
from pathlib import Path

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from engine.request import GenerationRequest
from service.config import Settings
from service.signed_urls import url_keys
from service.task_payload import entry_for
from service.task_payload import build_notifier
from service.cancellation import cancel_task
from service.submission import submit_task
from service.webhooks import WebhookNotifier, WebhookRefused, check_target, secret_text, vet_target
from service.webhooks import targets
from service.worker import Worker
from tests.api_support import make_api
from tests.drip_receiver import DripReceiver
from tests.live_server import poll_until
from tests.support_engine import SineEngine

KEY = "sk-hook"


@pytest.fixture(autouse=True)
def _close_notifiers(monkeypatch):
    """Every notifier a test makes (its own, the apps') stops reading the outbox when the test ends:
    moto's in-process tables share one name, so a leftover reader would take the next test's webhooks."""
    made = []
    original = WebhookNotifier.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(WebhookNotifier, "__init__", init)
    yield
    for notifier in made:
        notifier.close(5)


def public(host, port):
    return ["93.184.216.34"]


@pytest.mark.parametrize("url, why", [
    ("ftp://example.com/x", "http:// or https://"), ("http:///nohost", "with a host"),
    ("https://user:pw@example.com/", "credentials"), ("http://127.0.0.1:9/x", "private, loopback"),
    ("http://localhost/x", "private, loopback"), ("http://10.0.0.5/x", "private"),
    ("http://169.254.169.254/latest/meta-data", "private, loopback"), ("http://[::1]/x", "private"),
    ("http://192.168.1.1/x", "private"), ("http://0.0.0.0/x", "private"), ("https://example.com:99999/", "port"),
    ("http://[::1", "not a valid URL"), ("http://[nope]/", "not a valid URL"), (5, "http(s) URL"),
    # IPv6 forms that reach a private IPv4 address: NAT64, 6to4, IPv4-compatible, IPv4-mapped
    ("http://[64:ff9b::a00:1]/x", "private"), ("http://[64:ff9b::7f00:1]/x", "private"),
    ("http://[2002:a00:1::1]/x", "private"), ("http://[2002:a9fe:a9fe::]/x", "private"),
    ("http://[::10.0.0.1]/x", "private"), ("http://[::127.0.0.1]/x", "private"), ("http://[::ffff:10.0.0.1]/x", "private"),
    ("http://[64:ff9b:1::5db8:d822]/x", "private"),  # NAT64 local-use prefix: never a public host
])
def test_private_and_malformed_targets_are_refused(url, why):
    with pytest.raises(WebhookRefused) as info:
        check_target(url, allow_private=False)
    assert why in str(info.value)


def test_names_are_checked_by_every_address_they_resolve_to():
    target = check_target("https://hooks.example.com/a?b=1", allow_private=False, resolver=public)
    assert (target.host, target.port, target.path, target.address) == ("hooks.example.com", 443, "/a?b=1",
                                                                       "93.184.216.34")
    with pytest.raises(WebhookRefused):  # one private address among public ones is enough to refuse
        check_target("https://x.example.com/", False, resolver=lambda h, p: ["93.184.216.34", "10.1.2.3"])
    with pytest.raises(WebhookRefused, match="cannot resolve"):
        check_target("https://nx.invalid/", False, resolver=lambda h, p: (_ for _ in ()).throw(OSError("nx")))
    assert check_target("http://127.0.0.1:8080/hook", allow_private=True).address == "127.0.0.1"
    with pytest.raises(WebhookRefused, match="private"):  # a name may resolve to an IPv6 form of a private IPv4
        check_target("https://x.example.com/", False, resolver=lambda h, p: ["64:ff9b::c0a8:101"])


def test_ipv6_forms_of_public_ipv4_addresses_stay_allowed():
    for address in ("64:ff9b::5db8:d822", "2002:5db8:d822::1", "2606:4700:4700::1111"):  # NAT64, 6to4, native
        assert check_target(f"http://[{address}]/h", allow_private=False).address == address


def test_a_silent_dns_server_costs_the_submit_a_bounded_wait_off_the_event_loop(monkeypatch):
    release = threading.Event()
    monkeypatch.setattr(targets, "resolve", lambda host, port: release.wait(10) and [])
    monkeypatch.setattr(targets, "RESOLVE_SECONDS", 0.3)

    async def scenario():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        other = asyncio.ensure_future(ticker())
        started = time.monotonic()
        with pytest.raises(WebhookRefused, match="timed out"):
            await vet_target("https://slow.example.com/hook", allow_private=False)
        waited = time.monotonic() - started
        other.cancel()
        return waited, ticks

    try:
        waited, ticks = asyncio.run(scenario())
    finally:
        release.set()
    assert waited < 3  # the lookup's limit, not the resolver's own (10 s here)
    assert ticks >= 5  # the event loop went on serving meanwhile


class Receiver:
    """A webhook endpoint on 127.0.0.1: records each POST; answers `statuses` in turn, then 200."""

    def __init__(self, statuses=()):
        self.posts: list[tuple[dict, bytes]] = []
        self.statuses = list(statuses)
        self.got = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.posts.append((dict(self.headers), body))
                self.send_response(receiver.statuses.pop(0) if receiver.statuses else 200)
                self.end_headers()
                receiver.got.set()

            def log_message(self, *args):
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook?src=test"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def _notifier(settings, backend, **kw) -> WebhookNotifier:
    notifier = build_notifier(settings.model_copy(update={"api_key": KEY, "webhook_allow_private": True}), backend)
    notifier.backoff = kw.pop("backoff", 0.01)
    notifier.poll_seconds = kw.pop("poll_seconds", 0.1)
    for k, v in kw.items():
        setattr(notifier, k, v)
    return notifier


def _submit(backend, url, **fields) -> str:
    req = GenerationRequest(**{"prompt": "p", "audio_duration": 10, "batch_size": 1, **fields})
    return submit_task(backend, req, 10, webhook_url=url)[0]


def _secret(backend) -> str:
    return secret_text(backend.webhook_keys().current)


def _verify(headers: dict, body: bytes, secret: str) -> bool:
    """With the reference Standard Webhooks library, as a receiver would."""
    try:
        Webhook(secret).verify(body, headers)
        return True
    except WebhookVerificationError:
        return False


def _api_key_oracle(headers: dict, body: bytes) -> bool:
    """Does any signature equal an HMAC keyed with the API key (what a dictionary attack would test)?"""
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    guess = base64.b64encode(hmac.new(KEY.encode(), signed, hashlib.sha256).digest()).decode()
    legacy = [v for k, v in headers.items() if k.lower() == "x-acestep-signature"]
    return any(sig == f"v1,{guess}" for sig in headers["webhook-signature"].split()) or bool(legacy)


def test_a_finished_task_posts_its_signed_result_once(settings, backend, receiver):
    notifier = _notifier(settings, backend)
    worker = Worker(settings, backend, SineEngine(), on_finished=notifier.task_finished)
    task_id = _submit(backend, receiver.url, seeds=[5])
    failing = _submit(backend, receiver.url, prompt="PLEASE FAIL")
    quiet = _submit(backend, None)
    while worker.run_once(0.1):
        pass
    assert notifier.flush(10)
    assert len(receiver.posts) == 2  # the task without a webhook sends nothing
    bodies = {json.loads(body)["task_id"]: (headers, json.loads(body)) for headers, body in receiver.posts}
    assert set(bodies) == {task_id, failing} and quiet not in bodies
    assert all(_verify(headers, raw, _secret(backend)) for headers, raw in receiver.posts)
    assert not any(_verify(headers, raw, secret_text(KEY.encode())) for headers, raw in receiver.posts)
    assert not any(_api_key_oracle(headers, raw) for headers, raw in receiver.posts)
    headers, body = bodies[task_id]
    assert headers["X-ACEStep-Event"] == "task.finished" and headers["X-ACEStep-Task-ID"] == task_id
    assert headers["webhook-id"] == f"msg_{task_id}_succeeded"
    assert body["event"] == "task.finished" and body["status"] == 1 and body["status_text"] == "succeeded"
    item = json.loads(body["result"])[0]
    assert item["seed"] == 5 and item["file"].startswith("/v1/audio?path=")
    _, failed = bodies[failing]
    assert failed["status"] == 2 and failed["error"] == "the test engine was asked to fail"


def test_failed_deliveries_are_retried_with_backoff_then_given_up(settings, backend):
    flaky, dead = Receiver(statuses=[500, 503]), Receiver(statuses=[500] * 10)
    try:
        notifier = _notifier(settings, backend, attempts=3)
        ok_id, dead_id = _submit(backend, flaky.url), _submit(backend, dead.url)
        backend.store.cancel(ok_id, "x")
        backend.store.cancel(dead_id, "x")
        notifier.task_finished(ok_id)
        notifier.task_finished(dead_id)
        assert notifier.flush(10)
        assert [h["X-ACEStep-Delivery-Attempt"] for h, _ in flaky.posts] == ["1", "2", "3"]
        assert len(dead.posts) == 3  # ACESTEP_WEBHOOK_ATTEMPTS, then given up
        assert len({body for _, body in flaky.posts}) == 1  # the same body every time
        assert len({h["webhook-id"] for h, _ in flaky.posts}) == 1  # and the same id: a receiver de-duplicates by it
        assert all(_verify(h, raw, _secret(backend)) for h, raw in flaky.posts)
    finally:
        flaky.close()
        dead.close()


def test_delivery_never_blocks_the_worker(settings, backend):
    release, called = threading.Event(), threading.Event()

    def stuck_sender(target, body, headers, timeout):
        called.set()
        release.wait(10)
        return 200

    notifier = _notifier(settings, backend, sender=stuck_sender)
    worker = Worker(settings, backend, SineEngine(), on_finished=notifier.task_finished)
    first, second = _submit(backend, "http://127.0.0.1:9/a"), _submit(backend, "http://127.0.0.1:9/b")
    worker.run_once(0.1)
    assert called.wait(5)  # the first delivery hangs ...
    worker.run_once(0.1)  # ... and the worker goes on with the next task
    assert backend.store.get(second).status == "succeeded" and backend.store.get(first).status == "succeeded"
    release.set()
    assert notifier.flush(10)


def test_a_target_that_turned_private_is_not_called(settings, backend, receiver):
    notifier = _notifier(settings, backend)
    task_id = _submit(backend, receiver.url)  # accepted while private targets were allowed
    backend.store.cancel(task_id, "x")
    notifier.allow_private = False  # the check runs again before each delivery
    notifier.task_finished(task_id)
    assert notifier.flush(10) and receiver.posts == []


def test_release_task_checks_the_url_and_cancel_notifies(settings, receiver):
    strict = make_api(settings, api_key=KEY)
    r = strict.client.post("/release_task", json={"prompt": "p", "webhook_url": receiver.url},
                           headers=strict.headers())
    assert r.status_code == 400 and "private, loopback" in r.json()["detail"]
    assert strict.client.post("/release_task", json={"prompt": "p", "webhook_url": 5},
                              headers=strict.headers()).status_code == 400
    api = make_api(settings, api_key=KEY, webhook_allow_private=True)
    task_id = api.submit(prompt="p", webhook_url=receiver.url)
    assert api.backend.store.get(task_id).webhook_url == receiver.url
    assert api.client.post(f"/v1/tasks/{task_id}/cancel", headers=api.headers()).status_code == 200
    assert api.client.app.state.webhooks.flush(10)
    (headers, body), = receiver.posts
    payload = json.loads(body)
    assert payload["status_text"] == "cancelled" and payload["error"] == "cancelled by the client"
    r = api.client.get("/v1/webhook_secret", headers=api.headers())  # what a receiver is configured with
    assert r.status_code == 200 and _verify(headers, body, r.json()["data"]["secret"])
    assert api.client.get("/v1/webhook_secret").status_code == 401  # behind the API key


def test_cancelled_running_task_notified_once_by_the_api_not_the_worker(settings, backend, receiver):
    notifier = _notifier(settings, backend)
    engine = SineEngine()
    worker = Worker(settings, backend, engine, on_finished=notifier.task_finished)
    task_id = _submit(backend, receiver.url)
    original = engine.generate

    def cancel_then_generate(request, **kw):
        cancel_task(backend, task_id, on_cancelled=notifier.task_finished)
        return original(request, **kw)

    engine.generate = cancel_then_generate  # type: ignore[method-assign]
    worker.run_once(0.1)
    assert notifier.flush(10)
    assert backend.store.get(task_id).status == "cancelled" and len(receiver.posts) == 1


def _worker_webhooks(settings, backend) -> WebhookNotifier:
    """The worker entry point's wiring: the notifier, also told of the tasks the backend itself ends."""
    from entrypoints.bootstrap import build_webhooks

    return build_webhooks(settings.model_copy(update={"api_key": KEY, "webhook_allow_private": True}), backend)


def _only_post(receiver, task_id, backend) -> dict:
    (headers, raw), = receiver.posts
    assert headers["X-ACEStep-Task-ID"] == task_id and _verify(headers, raw, _secret(backend))
    body = json.loads(raw)
    assert body["task_id"] == task_id and body["status"] == 2 and body["status_text"] == "failed"
    return body


def test_a_dead_lettered_task_posts_its_failure_once(settings, backend, receiver):
    notifier = _worker_webhooks(settings, backend)
    task_id = _submit(backend, receiver.url)
    for _ in range(settings.max_receives):  # each run is claimed, then its worker "dies" mid-way
        lease = poll_until("a delivery", lambda: backend.queue.receive(0.2, 30), 10)
        backend.store.claim(task_id, "doomed")
        backend.queue.extend(lease, 0)  # its lease lapses at once
    worker = Worker(settings, backend, SineEngine(), on_finished=notifier.task_finished)

    def failed():
        worker.dead_letter_chore.last_run = None  # AWS: the DLQ drain, due every round here
        worker.run_once(0.2)
        return backend.store.get(task_id).status == "failed"

    poll_until("the task to be dead-lettered", failed, 15)
    worker.dead_letter_chore.last_run = None
    worker.run_once(0.2)  # a later drain or receive finds nothing more to report
    assert notifier.flush(10)
    body = _only_post(receiver, task_id, backend)
    reason = backend.store.get(task_id).error
    assert body["error"] == reason and f"after {settings.max_receives} deliveries" in reason


def test_a_task_failed_by_a_broken_worker_posts_its_failure_once(settings, backend, receiver):
    from entrypoints.bootstrap import build_broken_worker

    notifier = _worker_webhooks(settings, backend)
    task_id = _submit(backend, receiver.url)
    broken = build_broken_worker(settings, backend, FileNotFoundError("no weights"),
                                 on_finished=notifier.task_finished)  # as entrypoints/worker.py wires it
    assert broken.run_once(1.0) is True
    assert broken.run_once(0.1) is False  # nothing left: nothing more is sent
    assert notifier.flush(10)
    body = _only_post(receiver, task_id, backend)
    assert "could not load its models" in body["error"] and "no weights" in body["error"]


def test_public_base_url_makes_the_webhook_file_urls_absolute(settings, receiver):
    from service.embedded import make_embedded_backend

    # validated, as it is read from the environment (the trailing slash dropped)
    settings = Settings.model_validate({**settings.model_dump(), "public_base_url": "https://api.example.com/acestep/"})
    backend = make_embedded_backend(settings)
    notifier = _notifier(settings, backend)
    task_id = _submit(backend, receiver.url)
    Worker(settings, backend, SineEngine(), on_finished=notifier.task_finished).run_once(1.0)
    assert notifier.flush(10)
    (_, raw), = receiver.posts
    file_url = json.loads(json.loads(raw)["result"])[0]["file"]
    assert file_url.startswith("https://api.example.com/acestep/v1/audio?path=")
    polled = json.loads(entry_for(task_id, backend.store.get(task_id), settings, url_keys(backend), None)["result"])[0]["file"]
    assert polled.startswith("/v1/audio?path=")  # /query_result stays relative, as upstream


def test_a_result_too_large_for_its_record_is_posted_whole(settings, backend, receiver):
    from tests.support_engine import BloatedEngine

    notifier = _notifier(settings, backend)
    worker = Worker(settings, backend, BloatedEngine(), on_finished=notifier.task_finished)
    task_id = _submit(backend, receiver.url)
    while worker.run_once(0.1):
        pass
    assert notifier.flush(10)
    [(_, raw)] = receiver.posts
    item = json.loads(json.loads(raw)["result"])[0]
    assert len(item["generation_info_detail"]["notes"]) == 300 and item["metas"]["genres"] == "ambient " * 20000
    assert "missing_parts" not in item["generation_info_detail"]


# -- issue 21 item 12: a URL that does not parse is a 400 on both APIs, not a 500 ---------------

@pytest.mark.parametrize("url", ["http://[::1", "http://[64:ff9b::a00:1]/h", "https://x.example:99999/"])
def test_bad_webhook_urls_are_a_400_on_both_apis(settings, url):
    from fastapi.testclient import TestClient

    from handlers.openrouter import create_openrouter_app

    api = make_api(settings, api_key=KEY)
    r = api.client.post("/release_task", json={"prompt": "p", "webhook_url": url}, headers=api.headers())
    assert r.status_code == 400 and "webhook_url" in r.json()["detail"]
    chat = TestClient(create_openrouter_app(api.settings, api.backend), raise_server_exceptions=False)
    r = chat.post("/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                  json={"messages": [{"role": "user", "content": "a calm song"}], "webhook_url": url})
    assert r.status_code == 400 and "webhook_url" in r.text
    assert api.backend.store.counts()["total"] == 0  # refused before anything is stored


# -- issue 21 item 5: a rotatable secret of its own; receivers verify through a rotation --------

def test_a_rotation_signs_with_both_secrets_for_the_grace_window(settings, receiver):
    from service.embedded import make_embedded_backend
    from service.embedded.signing_secret import WEBHOOK_FILE_NAME, FileSigningSecret

    backend = make_embedded_backend(settings)
    old_secret = _secret(backend)
    FileSigningSecret(settings.data_dir, file_name=WEBHOOK_FILE_NAME).rotate()
    backend = make_embedded_backend(settings)  # a process started after the rotation
    new_secret = _secret(backend)
    assert new_secret != old_secret and new_secret.startswith("whsec_")
    notifier = _notifier(settings, backend)
    task_id = _submit(backend, receiver.url)
    backend.store.cancel(task_id, "x")
    notifier.task_finished(task_id)
    assert notifier.flush(10)
    (headers, raw), = receiver.posts
    assert len(headers["webhook-signature"].split()) == 2  # v1,<new> v1,<previous>
    assert _verify(headers, raw, new_secret) and _verify(headers, raw, old_secret)  # either receiver accepts it
    assert not _verify(headers, raw, secret_text(b"another secret"))


def test_aws_webhook_secret_comes_from_secrets_manager_and_rotates(tmp_path, receiver):
    from service.aws.clients import aws_client
    from tests.aws_support import aws_backend

    with aws_backend(tmp_path) as backend:
        arn = backend.settings.webhook_secret_arn
        assert arn and arn != backend.settings.signing_secret_arn  # its own secret, not the URL-signing one
        sm = aws_client("secretsmanager", backend.settings)
        first = _secret(backend)
        sm.put_secret_value(SecretId=arn, SecretString=secret_text(b"r" * 32))
        backend.webhook_keys._at = -1e9  # type: ignore[attr-defined]  # past CachedKeys' refresh time
        keys = backend.webhook_keys()
        assert keys.current == b"r" * 32 and secret_text(keys.previous[0]) == first


# -- issue 21 item 6: one slow receiver holds one slot for one deadline, never the others ------

def test_a_slow_receiver_is_cut_at_the_deadline_and_never_delays_the_others(settings):
    from service.embedded import make_embedded_backend

    backend = make_embedded_backend(settings)
    slow, fast = DripReceiver(interval=0.2), Receiver()
    try:
        notifier = _notifier(settings, backend, attempts=1, timeout=1.5)
        slow_id = _submit(backend, slow.url)
        backend.store.cancel(slow_id, "x")
        notifier.task_finished(slow_id)
        time.sleep(0.3)  # the slow delivery is under way
        started = time.monotonic()
        fast_ids = [_submit(backend, fast.url) for _ in range(3)]
        for task_id in fast_ids:
            backend.store.cancel(task_id, "x")
            notifier.task_finished(task_id)
        poll_until("the fast deliveries", lambda: len(fast.posts) == 3, 5)
        assert time.monotonic() - started < 1.0  # not queued behind the slow one
        assert notifier.flush(5)  # the slow attempt ended: cut at 1.5 s in all, though each byte came in 0.2 s
        assert time.monotonic() - started < 3.0
    finally:
        slow.close()
        fast.close()


# -- issue 20 item 7: the outbox survives the delivering process ---------------------------------

_DELIVERER = """
import json, os, sys, time
from service.config import Settings
from service.task_payload import build_notifier
settings = Settings(**json.loads(os.environ["SETTINGS"]))
if settings.backend == "aws":
    from service.aws import make_aws_backend as make
else:
    from service.embedded import make_embedded_backend as make
notifier = build_notifier(settings, make(settings))
notifier.backoff, notifier.poll_seconds = float(os.environ["BACKOFF"]), 0.1
notifier.start()
print("ready", flush=True)
time.sleep(120)
"""


def _start_deliverer(settings, backoff: float) -> subprocess.Popen:
    fields = {k: v for k, v in settings.model_dump(mode="json").items()
              if k in ("backend", "data_dir", "aws_region", "aws_endpoint_url", "table_name", "queue_url", "dlq_url",
                       "bucket", "signing_secret_arn", "webhook_secret_arn", "webhook_allow_private",
                       "webhook_attempts")}
    env = {**os.environ, "SETTINGS": json.dumps(fields), "BACKOFF": str(backoff)}
    return subprocess.Popen([sys.executable, "-c", _DELIVERER], env=env, cwd=Path(__file__).resolve().parents[1],
                            stdout=subprocess.PIPE, text=True)


@pytest.fixture(params=["embedded", "aws"])
def shared_backend(request, settings, tmp_path):
    """A backend another process can open too (AWS: moto's server, not the in-process mock)."""
    settings = settings.model_copy(update={"webhook_allow_private": True, "api_key": KEY})
    if request.param == "embedded":
        from service.embedded import make_embedded_backend

        yield settings, make_embedded_backend(settings)
        return
    from service.aws import make_aws_backend
    from service.aws.provision import provision
    from tests.aws_support import aws_settings, moto_server

    with moto_server() as endpoint:
        shared = provision(aws_settings(tmp_path, settings, aws_endpoint_url=endpoint))
        yield shared, make_aws_backend(shared)


def test_a_delivery_pending_when_its_process_is_killed_arrives_after_a_restart(shared_backend):
    settings, backend = shared_backend
    receiver = Receiver(statuses=[503])  # the first attempt fails: the delivery is then waiting to be retried
    process = _start_deliverer(settings, backoff=30.0)
    try:
        assert process.stdout.readline().strip() == "ready"
        task_id = _submit(backend, receiver.url)
        backend.store.cancel(task_id, "by the test")
        poll_until("the first attempt", lambda: len(receiver.posts) == 1, 30)

        def waiting_to_retry():
            (due,) = backend.store.webhooks_due(time.time() + 3600, 10)
            return due.attempts == 1 and due.due_at < time.time() + 31  # settled: the retry in 30 s, not the lease

        poll_until("the retry to be scheduled", waiting_to_retry, 10)
        os.kill(process.pid, signal.SIGKILL)  # dies mid-retry
        process.wait(10)
        (due,) = backend.store.webhooks_due(time.time() + 3600, 10)
        backend.store.settle_webhook(task_id, due.due_at, time.time())  # as if its 30 s had passed
        process = _start_deliverer(settings, backoff=30.0)  # the restart
        assert process.stdout.readline().strip() == "ready"
        poll_until("the delivery after the restart", lambda: len(receiver.posts) == 2, 30)
        (h1, b1), (h2, b2) = receiver.posts
        assert h1["webhook-id"] == h2["webhook-id"] == f"msg_{task_id}_cancelled"  # one id: receivers de-duplicate
        assert (h1["X-ACEStep-Delivery-Attempt"], h2["X-ACEStep-Delivery-Attempt"]) == ("1", "2")
        assert _verify(h2, b2, _secret(backend)) and json.loads(b2)["error"] == "by the test"
        poll_until("the outbox to empty", lambda: backend.store.webhooks_due(time.time() + 3600, 10) == [], 10)
    finally:
        process.kill()
        process.wait(10)
        receiver.close()


def test_an_api_process_stops_reading_the_outbox_once_it_is_empty(settings, backend, receiver):
    notifier = _notifier(settings, backend)  # as the API builds it: started by task_finished, not start()
    task_id = _submit(backend, receiver.url)
    backend.store.cancel(task_id, "x")
    notifier.task_finished(task_id)
    poll_until("the dispatcher to stop", lambda: len(receiver.posts) == 1 and notifier._thread is None, 10)
    worker_side = _notifier(settings, backend)
    worker_side.start()  # a worker: keeps reading, so a delivery left by a process that stopped is taken up
    later = _submit(backend, receiver.url)
    backend.store.cancel(later, "x")  # no task_finished in this process
    poll_until("the worker's dispatcher to find it", lambda: len(receiver.posts) == 2, 10)
    assert worker_side._thread is not None
