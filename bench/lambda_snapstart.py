"""What a cold start costs with and without SnapStart, against a local moto server.

Each sample is a fresh interpreter that imports the Lambda entry and answers a 1-id /query_result
(a task submitted beforehand), the way a cold Lambda serves its first request:
  - plain:     import (init) + first request;
  - snapstart: import + the runtime's before-snapshot hooks (priming), then the after-restore hooks
               and the first request. On Lambda only the part after the snapshot is paid per cold
               start, plus the restore itself, which happens inside AWS and is not measured here.
A bare `import fastapi` in the same interpreter is the baseline.

    .venv/bin/python bench/lambda_snapstart.py [--runs 7]
    # under the zip's own runtime (CPython 3.13 in a Debian trixie chroot; root and a Debian mirror needed):
    debootstrap --variant=minbase --include=python3 trixie /opt/trixie http://deb.debian.org/debian
    .venv/bin/python infra/package_lambda.py /opt/trixie/tmp/lambda
    .venv/bin/pip install --no-deps --target /opt/trixie/tmp/lambda snapshot-restore-py
    .venv/bin/python bench/lambda_snapstart.py --python "chroot /opt/trixie /usr/bin/python3.13" \\
        --package /opt/trixie/tmp/lambda --package-inside /tmp/lambda
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the project's packages, not bench/engine.py

_CHILD = r"""
import json, sys, time
sys.path.insert(0, {path!r})
mode, task_id = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
if mode == "fastapi":
    import fastapi
    print(json.dumps({{"init_ms": (time.perf_counter() - t0) * 1000}}))
    raise SystemExit
import entrypoints.lambda_api as lh
from entrypoints.snapstart import api_gateway_event
out = {{"init_ms": (time.perf_counter() - t0) * 1000, "python": sys.version.split()[0]}}
if mode == "snapstart":
    import snapshot_restore_py as runtime
    t = time.perf_counter()
    for func, args, kwargs in reversed(runtime.get_before_snapshot()):
        func(*args, **kwargs)
    out["prime_ms"] = (time.perf_counter() - t) * 1000
    t = time.perf_counter()
    for func, args, kwargs in runtime.get_after_restore():
        func(*args, **kwargs)
    out["restore_hooks_ms"] = (time.perf_counter() - t) * 1000
event = api_gateway_event("POST", "/query_result", {{"task_id_list": [task_id]}}, "bench-key")
t = time.perf_counter()
answer = lh.handler(event, None)
out["first_ms"] = (time.perf_counter() - t) * 1000
assert answer["statusCode"] == 200 and json.loads(answer["body"])["data"][0]["status"] == 0, answer
warm = []
for _ in range(20):
    t = time.perf_counter()
    lh.handler(event, None)
    warm.append((time.perf_counter() - t) * 1000)
out["warm_ms"] = sorted(warm)[10]
print(json.dumps(out))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def aws_env(endpoint: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACESTEP_", "AWS_"))}
    env.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
               ACESTEP_BACKEND="aws", ACESTEP_AWS_REGION="us-east-1", ACESTEP_AWS_ENDPOINT_URL=endpoint,
               ACESTEP_API_KEY="bench-key")
    return env


def start_moto(port: int) -> subprocess.Popen:
    server = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return server
        except OSError:
            time.sleep(0.1)
    server.kill()
    raise SystemExit("moto_server did not start")


def provision_and_submit(env: dict) -> tuple[dict, str]:
    """Create the table/queue/bucket on moto and one queued task; returns the env naming them."""
    os.environ.update(env)
    from service.aws.provision import provision
    from service.config import Settings

    s = provision(Settings(backend="aws", aws_region="us-east-1", aws_endpoint_url=env["ACESTEP_AWS_ENDPOINT_URL"],
                           table_name="bench-tasks", queue_url="bench-tasks", bucket="bench-audio"))
    env = dict(env, ACESTEP_TABLE_NAME=s.table_name, ACESTEP_QUEUE_URL=s.queue_url, ACESTEP_DLQ_URL=s.dlq_url,
               ACESTEP_BUCKET=s.bucket, ACESTEP_SIGNING_SECRET_ARN=s.signing_secret_arn)
    os.environ.update(env)
    import entrypoints.lambda_api as lh
    from entrypoints.snapstart import api_gateway_event

    answer = lh.handler(api_gateway_event("POST", "/release_task", {"prompt": "bench"}, "bench-key"), None)
    return env, json.loads(answer["body"])["data"]["task_id"]


def sample(python: list[str], path: str, mode: str, task_id: str, env: dict) -> dict:
    out = subprocess.run([*python, "-c", _CHILD.format(path=path), mode, task_id], env=env,
                         capture_output=True, text=True, timeout=180)
    if out.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--python", default=sys.executable, help="interpreter command line (may be a chroot)")
    parser.add_argument("--package", default=str(ROOT), help="the code to import, as seen from here")
    parser.add_argument("--package-inside", default="", help="the same directory as the interpreter sees it")
    args = parser.parse_args()
    port = free_port()
    server = start_moto(port)
    try:
        env, task_id = provision_and_submit(aws_env(f"http://127.0.0.1:{port}"))
        python, path = shlex.split(args.python), args.package_inside or args.package
        rows: dict[str, list[dict]] = {"fastapi": [], "plain": [], "snapstart": []}
        for _ in range(args.runs + 1):  # interleaved; the first round warms caches and is dropped
            for mode in rows:
                rows[mode].append(sample(python, path, mode, task_id, env))
        rows = {mode: samples[1:] for mode, samples in rows.items()}
    finally:
        server.kill()

    def med(mode: str, key: str) -> float:
        return statistics.median(s[key] for s in rows[mode])

    plain_cold = med("plain", "init_ms") + med("plain", "first_ms")
    snap_cold = med("snapstart", "restore_hooks_ms") + med("snapstart", "first_ms")
    print(f"Python {rows['plain'][0]['python']}, median of {args.runs} fresh interpreters, moto server on this machine\n")
    print("| | bare `import fastapi` | plain zip / image | SnapStart zip |")
    print("|---|---:|---:|---:|")
    print(f"| init (import + build the app), ms | {med('fastapi', 'init_ms'):.0f} | {med('plain', 'init_ms'):.0f} "
          f"| {med('snapstart', 'init_ms'):.0f} (before the snapshot) |")
    print(f"| priming hooks, ms | | | {med('snapstart', 'prime_ms'):.0f} (before the snapshot) |")
    print(f"| after-restore hooks, ms | | | {med('snapstart', 'restore_hooks_ms'):.1f} |")
    print(f"| first /query_result, ms | | {med('plain', 'first_ms'):.1f} | {med('snapstart', 'first_ms'):.1f} |")
    print(f"| warm /query_result (median of 20), ms | | {med('plain', 'warm_ms'):.1f} | {med('snapstart', 'warm_ms'):.1f} |")
    print(f"| **paid per cold start, ms** (plus AWS's restore for SnapStart) | | **{plain_cold:.0f}** | **{snap_cold:.1f}** |")
    print(f"\nReproduce: {Path(sys.executable).name} bench/lambda_snapstart.py --runs {args.runs}"
          + (f" --python {shlex.quote(args.python)}" if args.python != sys.executable else "")
          + (f" --package {args.package} --package-inside {args.package_inside}" if args.package_inside else ""))


if __name__ == "__main__":
    main()
