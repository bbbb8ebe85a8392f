"""Auth on every route but /health: Bearer header, raw key, body ai_token, signed URLs."""
from __future__ import annotations

from urllib.parse import parse_qs, urlparse

import pytest

from tests.api_support import KEY, make_api

UPLOAD_KEY = "uploads/pending/0123456789abcdef0123456789abcdef/a.wav"

# (method, path, json body or None); body routes also accept ai_token
ROUTES = [
    ("POST", "/release_task", {"prompt": "x"}),
    ("POST", "/query_result", {"task_id_list": []}),
    ("POST", "/format_input", {"prompt": "x"}),
    ("POST", "/create_random_sample", {"sample_type": "simple_mode"}),
    ("POST", "/v1/uploads", {"filename": "a.wav", "content_type": "audio/wav"}),
    ("GET", "/v1/models", None),
    ("GET", "/v1/stats", None),
    ("GET", "/v1/audio?path=outputs%2Fx%2F0-0.mp3", None),
    ("GET", "/docs", None),
    ("GET", "/openapi.json", None),
]
BODY_ROUTES = [r for r in ROUTES if r[2] is not None]
HEADER_ROUTES = [r for r in ROUTES if r[2] is None]
# with valid auth, these answer something other than 401 (404 / 503 are fine: auth passed)
OK = {200, 404, 503}


@pytest.fixture
def api(settings):
    return make_api(settings, api_key=KEY)


def call(api, method, path, body, headers=None, **kw):
    if method == "GET":
        return api.client.get(path, headers=headers or {})
    return api.client.post(path, json=body, headers=headers or {}, **kw)


@pytest.mark.parametrize("method,path,body", ROUTES, ids=[r[1] for r in ROUTES])
def test_missing_auth_is_401(api, method, path, body):
    r = call(api, method, path, body)
    assert r.status_code == 401
    expected = "Missing ai_token or Authorization header" if body is not None else "Missing Authorization header"
    assert r.json() == {"detail": expected}


@pytest.mark.parametrize("method,path,body", ROUTES, ids=[r[1] for r in ROUTES])
@pytest.mark.parametrize("header", ["Bearer wrong", "wrong", "bearer wrong"])
def test_wrong_key_is_401(api, method, path, body, header):
    r = call(api, method, path, body, {"Authorization": header})
    assert r.status_code == 401 and r.json() == {"detail": "Invalid API key"}


@pytest.mark.parametrize("method,path,body", ROUTES, ids=[r[1] for r in ROUTES])
@pytest.mark.parametrize("header", ["Bearer " + KEY, KEY])
def test_bearer_or_raw_key_is_accepted(api, method, path, body, header):
    r = call(api, method, path, body, {"Authorization": header})
    assert r.status_code in OK, r.text


@pytest.mark.parametrize("method,path,body", BODY_ROUTES, ids=[r[1] for r in BODY_ROUTES])
def test_body_ai_token(api, method, path, body):
    assert call(api, method, path, {**body, "ai_token": KEY}).status_code in OK
    r = call(api, method, path, {**body, "ai_token": "wrong"}, {"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 401 and r.json() == {"detail": "Invalid ai_token"}
    # as a form field too
    form = {k: str(v) for k, v in body.items() if not isinstance(v, list)}
    r = api.client.post(path, data={**form, "ai_token": KEY})
    assert r.status_code in OK | {400}, r.text  # form bodies may lack list fields; auth passed


@pytest.mark.parametrize("method,path,body", BODY_ROUTES, ids=[r[1] for r in BODY_ROUTES])
def test_another_scheme_leaves_auth_to_the_body_ai_token(api, method, path, body):
    """A proxy's auth_basic forwards `Authorization: Basic ...`: it offers no key of ours, so the body's
    ai_token decides, as upstream (only a wrong Bearer or raw key is refused before the body is read)."""
    basic = {"Authorization": "Basic dXNlcjpwYXNz"}
    assert call(api, method, path, {**body, "ai_token": KEY}, basic).status_code in OK
    r = call(api, method, path, body, basic)
    assert r.status_code == 401 and r.json() == {"detail": "Invalid API key"}


def test_health_needs_no_auth(api):
    r = api.client.get("/health")
    assert r.status_code == 200 and r.json()["data"]["status"] == "ok"


def test_multipart_ai_token_and_unauthenticated_upload_stores_nothing(api, tmp_path):
    files = {"src_audio": ("s.wav", b"RIFFdata", "audio/wav")}
    r = api.client.post("/release_task", data={"task_type": "cover"}, files=files)
    assert r.status_code == 401
    r = api.client.post("/release_task", data={"task_type": "cover", "ai_token": "nope"}, files=files)
    assert r.status_code == 401 and r.json()["detail"] == "Invalid ai_token"
    assert api.backend.store.counts()["total"] == 0
    blobs = tmp_path / "data" / "blobs"
    assert not any(p.is_file() for p in blobs.rglob("*"))
    r = api.client.post("/release_task", data={"task_type": "cover", "ai_token": KEY}, files=files)
    assert r.status_code == 200


def test_signed_audio_url_works_without_header_and_only_for_its_key(api):
    task_id = api.submit(prompt="x", batch_size=2, duration=10)
    api.run_worker()
    items = api.items(task_id)
    url0, url1 = items[0]["file"], items[1]["file"]
    assert api.client.get(url0).status_code == 200  # no header: the signature is enough
    q0, q1 = parse_qs(urlparse(url0).query), parse_qs(urlparse(url1).query)
    # a signature for one file does not open another
    swapped = f"/v1/audio?path={q1['path'][0]}&expires={q0['expires'][0]}&sig={q0['sig'][0]}"
    assert api.client.get(swapped).status_code == 401
    tampered = f"/v1/audio?path={q0['path'][0]}&expires={int(q0['expires'][0]) + 1}&sig={q0['sig'][0]}"
    assert api.client.get(tampered).status_code == 401
    unsigned = api.client.get("/v1/audio", params={"path": q0["path"][0]})
    assert unsigned.status_code == 401 and unsigned.json()["detail"] == "Missing Authorization header"
    with_header = api.client.get("/v1/audio", params={"path": q0["path"][0]}, headers=api.headers())
    assert with_header.status_code == 200


def test_expired_audio_signature_is_refused(api, monkeypatch):
    task_id = api.submit(prompt="x", batch_size=1, duration=10)
    api.run_worker()
    url = api.items(task_id)[0]["file"]
    import service.signed_urls as signing

    real_time = signing.time.time
    monkeypatch.setattr(signing.time, "time", lambda: real_time() + 10 * 86400)
    r = api.client.get(url)
    assert r.status_code == 401


def test_docs_page_loads_schema_through_a_signed_url(api):
    r = api.client.get("/docs", headers=api.headers())
    assert r.status_code == 200
    import re

    url = re.search(r"(/openapi\.json\?expires=\d+&sig=[0-9a-f]+)", r.text).group(1)
    schema = api.client.get(url)
    assert schema.status_code == 200 and "/release_task" in schema.json()["paths"]
    assert api.client.get("/openapi.json?expires=99999999999&sig=00").status_code == 401


def test_signed_upload_url_needs_its_signature(api):
    r = api.client.post("/v1/uploads", json={"filename": "a.wav", "content_type": "audio/wav"},
                        headers=api.headers())
    key = r.json()["data"]["key"]
    assert api.client.put(f"/v1/uploads/{key}", content=b"x").status_code == 403
    assert api.client.put(f"/v1/uploads/{key}?expires=99999999999&sig=00", content=b"x").status_code == 403
    assert api.client.put(r.json()["data"]["upload_url"], content=b"RIFF").status_code == 200


def test_cors_preflight_is_not_blocked_by_auth(settings):
    api = make_api(settings, api_key=KEY, cors_origins=["http://studio.example"])
    r = api.client.options("/release_task", headers={
        "Origin": "http://studio.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://studio.example"
    r = api.client.get("/health", headers={"Origin": "http://studio.example"})
    assert r.headers["access-control-allow-origin"] == "http://studio.example"
    r = api.client.get("/health", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in r.headers


def test_no_cors_by_default(api):
    r = api.client.get("/health", headers={"Origin": "http://studio.example"})
    assert "access-control-allow-origin" not in r.headers


def test_cors_origins_from_environment_keep_their_ports():
    from service.config import load_settings

    s = load_settings(env={"ACESTEP_CORS_ORIGINS": "http://localhost:5173, https://studio.example"}, dotenv_path=None)
    assert s.cors_origins == ["http://localhost:5173", "https://studio.example"]


@pytest.mark.parametrize("key", ["", KEY])
@pytest.mark.parametrize("sig", ["%C3%A9" * 32, "zz" * 32, "0" * 63, "0" * 200])
def test_malformed_signatures_are_refused_not_crashing(settings, key, sig):
    client = make_api(settings, api_key=key).client
    query = f"expires=99999999999&sig={sig}"
    assert client.get(f"/v1/audio?path=outputs%2Fx%2F1-0.mp3&{query}").status_code in (401, 403, 404)
    assert client.put(f"/v1/uploads/uploads/pending/x/a.wav?{query}", content=b"RIFF").status_code in (401, 403)
