"""CPU per /query_result poll of waiting tasks against finished ones and a bare route (issue 21.19).

The API app (embedded backend) is called in-process through ASGI, one poll after another, so the
figures are the server's own CPU (process_time per request) with no HTTP client sharing the cores.
Rows: a bare route returning a constant, a 20-id poll of queued tasks, a 20-id poll of finished
tasks, and the queued poll while another connection commits a write every 10 ms (a worker's
progress updates: each one makes the next poll read the store again). Each variant runs in a fresh
interpreter; `--repo` runs another checkout's code (a `git worktree` of the commit before).

    .venv/bin/python bench/queued_polls.py [--requests 5000] [--repo /tmp/before]
"""
from __future__ import annotations

import argparse
from pathlib import Path

from measure import CHILD_ENV, ChildFailed, run_child

ROOT = Path(__file__).resolve().parents[1]

_CHILD = r"""
import asyncio, json, sys, tempfile, threading, time
sys.path.insert(0, {repo!r})
sys.path.append({bench!r})  # asgi_post from this checkout, after the served code
import asgi_post
from fastapi.responses import Response
from engine.request import GenerationRequest
from service.config import Settings
from service.records import TaskRecord, TaskResult
from service.submission import submit_task
from entrypoints import bootstrap

variant = sys.argv[1]
data_dir = tempfile.mkdtemp(prefix="acestep-polls-")
settings = Settings(data_dir=data_dir, log_level="WARNING", rate_limit_rps=0, queue_maxsize=1000)
app = bootstrap.build_app(settings)
from service.embedded import make_embedded_backend
seeder = make_embedded_backend(settings)
request = GenerationRequest(prompt="upbeat synth pop with a driving bass line", lyrics="[verse]\nla la\n" * 6,
                            audio_duration=30, batch_size=2)
ids = [submit_task(seeder, request, 1000)[0] for _ in range(20)]
if variant == "finished":
    for task_id in ids:
        seeder.store.claim(task_id, "bench")
        seeder.store.finish(task_id, 1, result=TaskResult(dit_model="acestep-v15-turbo"))
stop = threading.Event()
if variant == "queued_writes":
    def writer():
        n = 0
        while not stop.is_set():
            seeder.store.put_meta("bench", {{"n": n}})
            n += 1
            time.sleep(0.01)
    threading.Thread(target=writer, daemon=True).start()
async def bare():
    return Response(b'{{"data":[],"code":200}}', media_type="application/json")
app.add_api_route("/bare", bare, methods=["POST"])
path = "/bare" if variant == "bare" else "/query_result"
body = json.dumps({{"task_id_list": ids}}).encode()
scope = asgi_post.post_scope(path, body)

def one():
    return asgi_post.post(app, scope, body)

async def run(n):
    for _ in range(300):
        await one()
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(n):
        await one()
    return (time.process_time() - cpu) * 1000 / n, (time.perf_counter() - wall) * 1000 / n

cpu_ms, wall_ms = asyncio.run(run({requests}))
stop.set()
print(json.dumps({{"cpu_ms": cpu_ms, "wall_ms": wall_ms}}))
"""

VARIANTS = ("bare", "queued", "finished", "queued_writes")


def run(repo: str, variant: str, requests: int) -> dict:
    code = _CHILD.format(repo=repo, bench=str(ROOT / "bench"), requests=requests)
    try:
        return run_child(["-c", code, variant], cwd=repo, timeout=900, env=CHILD_ENV)
    except ChildFailed as failed:
        raise SystemExit(str(failed)) from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--repo", default=str(ROOT), help="the checkout whose code serves (default: this one)")
    parser.add_argument("--runs", type=int, default=3, help="fresh interpreters per variant (median kept)")
    args = parser.parse_args()
    print(f"{args.requests} in-process calls per run, {args.runs} runs per row (median), code from {args.repo}\n")
    print("| row | CPU ms/req | wall ms/req |\n|---|---:|---:|")
    for variant in VARIANTS:
        runs = sorted((run(args.repo, variant, args.requests) for _ in range(args.runs)), key=lambda r: r["cpu_ms"])
        mid = runs[len(runs) // 2]
        print(f"| {variant} | {mid['cpu_ms']:.3f} | {mid['wall_ms']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
