"""Garbage-collector pauses on the /query_result path, with and without the settled heap.

The API app (embedded backend, 20 finished tasks seeded as bench/load.py does) is called in-process
through ASGI, one 20-id poll after another, so the latencies are the server's own with no HTTP
client sharing the cores. Each variant runs in a fresh interpreter: `plain` as the process is after
start-up, `settled` after entrypoints.heap.settle() (what acestep-api does once it listens). The
collector's own pauses are timed through gc.callbacks.

    .venv/bin/python bench/gc_pauses.py [--requests 20000]
"""
from __future__ import annotations

import argparse
from pathlib import Path

from measure import CHILD_ENV, ChildFailed, run_child

ROOT = Path(__file__).resolve().parents[1]

_CHILD = r"""
import asyncio, gc, json, sys, tempfile, time
sys.path.insert(0, {root!r})
sys.path.insert(1, {bench!r})
import asgi_post
from load import seed_finished
from service.config import Settings
from entrypoints import bootstrap, heap

data_dir = tempfile.mkdtemp(prefix="acestep-gc-")
ids = seed_finished(data_dir, 20)
app = bootstrap.build_app(Settings(data_dir=data_dir, log_level="WARNING", rate_limit_rps=0))
if sys.argv[1] == "settled":
    heap.settle()
body = json.dumps({{"task_id_list": ids}}).encode()
scope = asgi_post.post_scope("/query_result", body)
pauses = {{0: [], 1: [], 2: []}}
started = [0.0]
def on_gc(phase, info):
    if phase == "start":
        started[0] = time.perf_counter()
    else:
        pauses[info["generation"]].append((time.perf_counter() - started[0]) * 1000)

def one():
    return asgi_post.post(app, scope, body)

async def run(n):
    for _ in range(200):  # warm the entry cache
        await one()
    gc.callbacks.append(on_gc)
    latencies = []
    for _ in range(n):
        t = time.perf_counter()
        await one()
        latencies.append((time.perf_counter() - t) * 1000)
    gc.callbacks.remove(on_gc)
    return sorted(latencies)

lat = asyncio.run(run({requests}))
pct = lambda p: lat[min(len(lat) - 1, int(p / 100 * len(lat)))]
print(json.dumps({{"tracked": len(gc.get_objects()), "frozen": gc.get_freeze_count(),
                  "p50": pct(50), "p99": pct(99), "p999": pct(99.9), "max": lat[-1],
                  "gen2": len(pauses[2]), "gen2_ms": sorted(pauses[2])[len(pauses[2]) // 2] if pauses[2] else 0.0,
                  "gen01": len(pauses[0]) + len(pauses[1])}}))
"""


def run(variant: str, requests: int) -> dict:
    code = _CHILD.format(root=str(ROOT), bench=str(ROOT / "bench"), requests=requests)
    try:
        return run_child(["-c", code, variant], cwd=str(ROOT), timeout=900, env=CHILD_ENV)
    except ChildFailed as failed:
        raise SystemExit(str(failed)) from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    print(f"{args.requests} in-process 20-id /query_result calls per run, fresh interpreter each, alternated\n")
    print("| variant | objects the collector walks | p50 ms | p99 ms | p99.9 ms | max ms | full collections | median full collection ms |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for _ in range(args.rounds):
        for variant in ("plain", "settled"):
            r = run(variant, args.requests)
            print(f"| {variant} | {r['tracked']} (+{r['frozen']} frozen) | {r['p50']:.2f} | {r['p99']:.2f} | {r['p999']:.2f} | {r['max']:.1f} "
                  f"| {r['gen2']} | {r['gen2_ms']:.1f} |", flush=True)
    print(f"\nReproduce: .venv/bin/python bench/gc_pauses.py --requests {args.requests} --rounds {args.rounds}")


if __name__ == "__main__":
    main()
