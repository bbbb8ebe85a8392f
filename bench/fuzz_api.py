"""Heavy schemathesis fuzzing of both apps in-process (not part of `make test`; the conformance test
tests/test_openapi_conformance.py runs a few positive examples per operation).

Builds the ACE-Step API (handlers.app.create_app, with the chat route on it) and the OpenAI-compatible
app (handlers.openrouter.create_openrouter_app) on one embedded backend, as entrypoints/bootstrap.py
does, with the sine test engine's worker run between cases so polls see finished tasks and /v1/audio
serves real files. For every operation it draws `--examples` cases in positive and negative mode
(schemathesis generation modes) and records every 5xx other than the documented 503 (no LM) / 504
(no worker within the wait), and every answer slower than `--slow` seconds.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/fuzz_api.py --examples 300
    HF_HUB_OFFLINE=1 .venv/bin/python bench/fuzz_api.py --examples 300 --api-key sk-x   # behind a key
    HF_HUB_OFFLINE=1 .venv/bin/python bench/fuzz_api.py --only '/v1/chat' --examples 1000

Exits 1 when anything was recorded; prints one line per finding (method, path, status, body, the
request as curl).
"""
from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hypothesis  # noqa: E402
import hypothesis.errors  # noqa: E402
import schemathesis  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, Phase  # noqa: E402

from handlers.openrouter import create_openrouter_app  # noqa: E402
from service.config import Settings  # noqa: E402
from tests.api_support import make_api  # noqa: E402

DOCUMENTED_5XX = {503, 504}


def _fuzz(label: str, app, headers: dict, examples: int, only: str | None, slow: float, between, findings: list,
          seen: collections.Counter) -> None:
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, headers=headers)
    modes = [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE]
    for result, mode in ((result, mode) for result in schema.get_all_operations() for mode in modes):
        operation = result.ok()
        if only and only not in operation.path:
            continue
        started = time.monotonic()

        @hypothesis.settings(max_examples=examples, derandomize=False, deadline=None, database=None,
                             phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        @hypothesis.given(operation.as_strategy(generation_mode=mode))
        def run(case):
            t0 = time.monotonic()
            response = case.call(headers=headers)
            took = time.monotonic() - t0
            seen[(label, f"{operation.label} {mode.value}", response.status_code)] += 1
            if (response.status_code >= 500 and response.status_code not in DOCUMENTED_5XX) or took > slow:
                findings.append(f"{label} {operation.label}: {response.status_code} in {took:.2f}s "
                                f"{response.text[:300]!r}\n    {case.as_curl_command()[:600]}")
            between()

        try:
            run()
        except hypothesis.errors.Unsatisfiable:  # negative mode on an operation with nothing to negate
            print(f"{label} {operation.label} {mode.value}: no such cases", flush=True)
            continue
        except Exception as exc:  # a crash in the app under TestClient surfaces here: record it too
            findings.append(f"{label} {operation.label}: raised {type(exc).__name__}: {exc}"[:800])
        print(f"{label} {operation.label} {mode.value}: {time.monotonic() - started:.1f}s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=200, help="cases per operation and app")
    parser.add_argument("--api-key", default="", help="run behind this key (sent with every case)")
    parser.add_argument("--only", help="only operations whose path contains this")
    parser.add_argument("--slow", type=float, default=2.0, help="record answers slower than this (s)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(data_dir=f"{tmp}/data", checkpoint_dir=f"{tmp}/checkpoints", visibility_timeout=30.0,
                            api_key=args.api_key, openrouter_api_key=args.api_key, openrouter_max_wait=0.2,
                            # no request rate or per-caller cap: the cases must reach the routes, not a 429
                            rate_limit_rps=0, caller_max_queued=10**6, caller_max_active=10**6, queue_maxsize=10**6)
        api = make_api(settings)
        app = api.client.app
        chat = create_openrouter_app(api.settings, api.backend, poll_seconds=0.02, rate_buckets=app.state.rate_buckets,
                                     submitter=app.state.submitter, webhooks=app.state.webhooks)
        TestClient(chat)  # noqa: the app needs no lifespan; built to fail early if it cannot start
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        findings: list[str] = []
        seen: collections.Counter = collections.Counter()
        ticks = [0]

        def between() -> None:
            ticks[0] += 1
            if ticks[0] % 10 == 0:
                api.run_worker(20)

        _fuzz("api", app, headers, args.examples, args.only, args.slow, between, findings, seen)
        _fuzz("chat", chat, headers, args.examples, args.only, args.slow, between, findings, seen)
        for (label, op, status), n in sorted(seen.items()):
            print(f"  {label} {op} {status}: {n}")
        print(f"{sum(seen.values())} cases, {len(findings)} findings")
        for f in findings:
            print(f)
        sys.exit(1 if findings else 0)


if __name__ == "__main__":
    main()
