"""Hand-written hostile requests against both apps in-process (the cases schemathesis does not draw):
absurd numbers, deep and huge JSON, invalid UTF-8 and surrogates, odd content types and multipart
bodies, non-ASCII headers and keys, `ai_token` in odd places, path traversal in audio / upload /
adapter paths, Range headers, long id lists, adapters with hostile safetensors headers, chats the
engine refuses. A sine-engine worker runs in a thread, so tasks finish and their files exist.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/hostile_api.py            # no API key (the default)
    HF_HUB_OFFLINE=1 .venv/bin/python bench/hostile_api.py --api-key sk-x

Prints one line per request that was answered 5xx (other than 503/504 with a reason), raised in the
app, or took longer than --slow seconds (a chat's wait for the worker aside), then a count per status; exits 1
when any was found.
Live-server checks (slow bodies, concurrent big bodies) are described in bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import collections
import json
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastapi.testclient import TestClient  # noqa: E402

from entrypoints.bootstrap import build_openrouter_app  # noqa: E402
from service.config import Settings  # noqa: E402
from tests.api_support import make_api  # noqa: E402

NUMBERS = ["1e308", "-1e308", "NaN", "Infinity", "-Infinity", "-1", "1" + "0" * 400, "9" * 5000, "-0", "1e-320",
           "true", "[]", "{}", '"abc"', '"1e999"', '"nan"', '" 3 "', '"0x10"', '"\\u0661\\u0662"']
NUMERIC_FIELDS = ["audio_duration", "duration", "batch_size", "inference_steps", "guidance_scale", "bpm", "seed",
                  "repainting_start", "repainting_end", "audio_cover_strength", "lm_temperature", "lm_top_p",
                  "lm_top_k", "shift", "cfg_interval_start", "lm_cfg_scale", "adapter_scale"]
TEXT_FIELDS = ["audio_format", "task_type", "model", "infer_method", "lm_backend", "key_scale", "time_signature",
               "vocal_language", "webhook_url", "adapter", "seed", "src_audio_key", "src_audio_path"]
Case = tuple[str, str, str, dict[str, Any]]  # (label, method, url, httpx arguments)


def _json(label: str, url: str, body: Any, headers: dict | None = None) -> Case:
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return label, "POST", url, {"content": data, "headers": {"Content-Type": "application/json", **(headers or {})}}


def _multipart(label: str, parts: list[bytes], boundary: bytes = b"b") -> Case:
    body = b"".join(b"--" + boundary + b"\r\n" + p for p in parts) + b"--" + boundary + b"--\r\n"
    return label, "POST", "/release_task", {"content": body,
                                            "headers": {"Content-Type": b"multipart/form-data; boundary=" + boundary}}


def _field(name: str, value: bytes) -> bytes:
    return f'Content-Disposition: form-data; name="{name}"\r\n\r\n'.encode() + value + b"\r\n"


def release_cases() -> Iterator[Case]:
    for f in NUMERIC_FIELDS:
        for v in NUMBERS:
            yield _json(f"{f}={v[:12]}", "/release_task", '{"prompt": "x", "%s": %s}' % (f, v))
    for f in TEXT_FIELDS:
        for v in ("z" * 1_000_000, "../../../etc/passwd", "\x00", "é" * 100, "\\ud800"):
            yield _json(f"{f}={v[:12]!r}", "/release_task", {"prompt": "x", f: v})
    deep = json.loads('{"a":' * 900 + "1" + "}" * 900)
    yield from [
        _json("invalid utf-8", "/release_task", b'{"prompt":"\xff\xfe"}'),
        _json("lone surrogate", "/release_task", '{"prompt":"\\ud800"}'),
        _json("deep array", "/release_task", "[" * 100000 + "]" * 100000),
        _json("deep object", "/release_task", '{"a":' * 50000 + "1" + "}" * 50000),
        _json("deep param_obj", "/release_task", {"prompt": "x", "param_obj": deep}),
        _json("deep param_obj text", "/release_task", {"prompt": "x", "param_obj": "[" * 5000 + "]" * 5000}),
        _json("100k keys", "/release_task", {str(i): i for i in range(100000)}),
        _json("2 MB prompt", "/release_task", {"prompt": "x" * 1_900_000}),
        _json("utf-16 body", "/release_task", '{"prompt":"x"}'.encode("utf-16")),
        _json("text/plain", "/release_task", '{"prompt":"x"}', {"Content-Type": "text/plain"}),
        _json("latin-1 content type", "/release_task", '{"prompt":"x"}', {"Content-Type": b"application/json\xe9"}),
        ("form, 5000 fields", "POST", "/release_task", {"content": "&".join(f"a{i}=1" for i in range(5000)),
                                                        "headers": {"Content-Type": "application/x-www-form-urlencoded"}}),
        ("form, 1 MB of %", "POST", "/release_task", {"content": "a=" + "%" * 1_000_000,
                                                     "headers": {"Content-Type": "application/x-www-form-urlencoded"}}),
        _multipart("multipart, 2001 fields", [_field("f", b"x")] * 2001),
        _multipart("multipart, 9 files", [b'Content-Disposition: form-data; name="src_audio"; filename="a.wav"'
                                          b"\r\n\r\nx\r\n"] * 9),
        _multipart("multipart, latin-1 boundary", [_field("prompt", b"x")], boundary=b"\xe9\xff"),
        _multipart("multipart, traversal filename", [b'Content-Disposition: form-data; name="src_audio"; '
                                                     b'filename="../../etc/passwd"\r\n\r\nRIFF\r\n',
                                                     _field("task_type", b"cover")]),
        _multipart("multipart, nested adapters", [_field("adapters", b"[" * 100000 + b"]" * 100000)]),
        _multipart("multipart, 2.1 MB field", [_field("prompt", b"x" * 2_100_000)]),
        ("multipart, truncated", "POST", "/release_task", {"content": b'--b\r\nContent-Disposition: form-data; '
                                                           b'name="prompt"\r\n\r\nx',
                                                           "headers": {"Content-Type": "multipart/form-data; boundary=b"}}),
    ]
    for token in (1, None, [], {}, ["a"], True, "é", "x" * 100000):
        yield _json(f"ai_token={str(token)[:10]}", "/release_task", {"prompt": "x", "ai_token": token})
    for name, value in (("Authorization", b"Bearer \xe9\xff"), ("Authorization", b"Bearer " + b"a" * 8000),
                        ("X-Forwarded-For", b"\xff, ::1, 999.1.1.1"), ("X-Request-ID", b"\xe9" * 10000),
                        ("Idempotency-Key", b"\xe9" * 10000), ("Idempotency-Key", b"")):
        yield _json(f"header {name}={value[:10]!r}", "/release_task", {"prompt": "x"}, {name: value})


def other_cases(signed_audio: str) -> Iterator[Case]:
    for ids in ([f"id{i}" for i in range(100000)], json.dumps(["x"] * 100000), "[" * 5000 + "]" * 5000,
                [[["a"]], {"a": 1}, 1, None, True], ["../../etc/passwd", "\x00", "a" * 100000]):
        yield _json(f"query_result {str(ids)[:20]}", "/query_result", {"task_id_list": ids})
    for path in ("../../etc/passwd", "/etc/passwd", "outputs/../../../etc/passwd", "outputs/%2e%2e/x.mp3", "\x00",
                 "outputs/" + "a" * 5000 + "/1-0.mp3", "C:\\windows"):
        yield f"audio path {path[:20]!r}", "GET", "/v1/audio", {"params": {"path": path}}
    yield "audio, duplicate path", "GET", "/v1/audio?path=a&path=b", {}
    yield "audio, NaN expires", "GET", "/v1/audio?path=x&expires=NaN&sig=zz", {}
    for rng in ("bytes=abc", "bytes=-0", "bytes=0-0", "bytes=100000000-", "bytes=5-2", "items=0-1",
                "bytes=" + ",".join(["0-1"] * 5000), "bytes=-99999999999999999999", "bytes=1-1,0-0,3-8,2-9"):
        yield f"range {rng[:20]}", "GET", signed_audio, {"headers": {"Range": rng}}
    yield "put upload, traversal", "PUT", "/v1/uploads/..%2f..%2fetc%2fpasswd", {"content": b"x"}
    yield "put upload, huge expires", "PUT", "/v1/uploads/x?expires=" + "9" * 40 + "&sig=a", {"content": b"x"}
    for name in ("..", "a" * 5000, "%2e%2e", "é"):
        yield f"delete adapter {name[:10]!r}", "DELETE", f"/v1/adapters/{name}", {}
        yield _json(f"lora load {name[:10]!r}", "/v1/lora/load", {"lora_path": name, "adapter_name": name})
    for header in (b"[" * 50000 + b"]" * 50000, json.dumps({"w": {"dtype": "F32", "shape": [10**12] * 2,
                                                                  "data_offsets": [0, 4]}}).encode()):
        yield (f"adapter header {header[:10]!r}", "POST", "/v1/adapters",
               {"content": struct.pack("<Q", len(header)) + header + b"\0" * 4, "params": {"name": "hostile"},
                "headers": {"Content-Type": "application/octet-stream"}})
    for model in ("../../etc", "\x00", ["x"], 5):
        yield _json(f"init {str(model)[:10]!r}", "/v1/init", {"model": model})
    yield _json("format_input 2 MB", "/format_input", {"prompt": "x" * 900_000, "lyrics": "y" * 900_000})


def chat_cases() -> Iterator[Case]:
    def chat(label: str, body: Any) -> Case:
        return _json(label, "/v1/chat/completions", body)
    user = [{"role": "user", "content": "<prompt>x</prompt>"}]
    yield from [
        chat("duration 1e308", {"messages": user, "audio_config": {"duration": 1e308}}),
        chat("duration NaN", '{"messages": [{"role":"user","content":"x"}], "audio_config": {"duration": NaN}}'),
        chat("seed list", {"messages": user, "seed": [1] * 10000}),
        chat("batch 1e9", {"messages": user, "batch_size": 10**9}),
        chat("bad base64", {"messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": "!!!", "format": "wav"}}]}]}),
        chat("role x 500 KB", {"messages": [{"role": "bogus" * 100000, "content": "x"}]}),
        chat("256 x 32 KB", {"messages": [{"role": "user", "content": "a" * 32000}] * 256}),
        chat("tags", {"messages": [{"role": "user", "content": "<prompt>" * 4000}]}),
        chat("webhook [::1", {"messages": user, "webhook_url": "http://[::1"}),
        chat("engine refuses", {"messages": [{"role": "user", "content": "<prompt>PLEASE FAIL</prompt>"}]}),
        chat("deep", "[" * 100000 + "]" * 100000),
        chat("invalid utf-8", b'{"messages":[{"role":"user","content":"\xff"}]}'),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--api-key", default="")
    parser.add_argument("--slow", type=float, default=2.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(data_dir=f"{tmp}/data", checkpoint_dir=f"{tmp}/checkpoints", api_key=args.api_key,
                            openrouter_api_key=args.api_key, openrouter_max_wait=60, rate_limit_rps=0,
                            caller_max_queued=10**6, caller_max_active=10**6, queue_maxsize=10**6)
        api = make_api(settings)
        api.worker.publish_models()
        stop = threading.Event()
        worker = threading.Thread(target=lambda: [api.worker.run_once(0.05) for _ in iter(stop.is_set, True)],
                                  daemon=True)
        worker.start()
        chat = TestClient(build_openrouter_app(api.settings, api.client.app))
        auth = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        task = api.client.post("/release_task", json={"prompt": "x", "audio_duration": 10}, headers=auth).json()
        entry = {"status": 0}
        while entry["status"] == 0:
            time.sleep(0.1)
            entry = api.client.post("/query_result", json={"task_id_list": [task["data"]["task_id"]]},
                                    headers=auth).json()["data"][0]
        signed = json.loads(entry["result"])[0]["file"]
        found: list[str] = []
        statuses: collections.Counter = collections.Counter()
        runs: list[tuple[TestClient, Callable[[], Iterator[Case]]]] = [
            (api.client, release_cases), (api.client, lambda: other_cases(signed)), (api.client, chat_cases),
            (chat, chat_cases)]
        for client, cases in runs:
            for label, method, url, kwargs in cases():
                kwargs.setdefault("headers", {})
                kwargs["headers"] = {**auth, **kwargs["headers"]}
                started = time.monotonic()
                try:
                    r = client.request(method, url, **kwargs)
                except Exception as exc:  # raised in the app (TestClient re-raises it)
                    found.append(f"{method} {url[:60]} [{label}]: raised {type(exc).__name__}: {str(exc)[:200]}")
                    continue
                took = time.monotonic() - started
                statuses[r.status_code] += 1
                waited = url.endswith("/chat/completions") and r.status_code in (200, 409, 422, 504)  # for a worker
                if (r.status_code >= 500 and r.status_code not in (503, 504)) or (took > args.slow and not waited):
                    found.append(f"{method} {url[:60]} [{label}]: {r.status_code} in {took:.2f} s {r.text[:200]!r}")
        stop.set()
        worker.join(5)
        print(f"{sum(statuses.values())} requests: " + ", ".join(f"{s} x {n}" for s, n in sorted(statuses.items())))
        print(f"{len(found)} findings")
        for line in found:
            print(ascii(line))
        sys.exit(1 if found else 0)


if __name__ == "__main__":
    main()
