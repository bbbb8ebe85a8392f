"""How fast an idle worker starts a newly submitted task on the embedded backend.

Target: under 50 ms. Measures both wake paths side by side: a worker thread in the
submitting process (woken by a condition variable) and a worker in another process (which sees
the commit through SQLite's data_version on its next check).

The gap between submits is random (50-250 ms): a fixed gap that is a multiple of the receiver's
check interval lands every submit at the same phase of it and reports that phase, not the
latency (the 100 ms gap this bench used to have did exactly that).

    .venv/bin/python bench/wake_latency.py [--rounds 100]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from service.config import Settings  # noqa: E402
from service.embedded import make_embedded_backend  # noqa: E402
from service.submission import submit_task  # noqa: E402


def _receiver(data_dir: str, rounds: int, out: "mp.Queue") -> None:
    backend = make_embedded_backend(Settings(data_dir=data_dir))
    for _ in range(rounds):
        lease = backend.queue.receive(30, 60)
        out.put((lease.task_id, time.time()))
        backend.queue.ack(lease)


def measure(rounds: int, in_process: bool) -> list[float]:
    data_dir = tempfile.mkdtemp()
    backend = make_embedded_backend(Settings(data_dir=data_dir))
    out: "mp.Queue" = mp.Queue()
    if in_process:
        runner = threading.Thread(target=_receiver, args=(data_dir, rounds, out), daemon=True)
    else:
        runner = mp.Process(target=_receiver, args=(data_dir, rounds, out), daemon=True)
    runner.start()
    latencies = []
    gaps = random.Random(1234)
    for _ in range(rounds):
        time.sleep(gaps.uniform(0.05, 0.25))  # let the receiver go idle, at a random phase of its checks
        submitted = time.time()
        task_id, _ = submit_task(backend, {"prompt": "x"}, max_queue=100)
        got_id, received = out.get(timeout=30)
        assert got_id == task_id
        latencies.append((received - submitted) * 1000)
    runner.join(5)
    return latencies


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=100)
    args = p.parse_args()
    print("| receiver | p50 ms | p95 ms | max ms |")
    print("|---|---|---|---|")
    for label, in_proc in (("same process (thread)", True), ("separate worker process", False)):
        lat = sorted(measure(args.rounds, in_proc))
        p95 = lat[min(len(lat) - 1, int(0.95 * len(lat)))]
        print(f"| {label} | {statistics.median(lat):.1f} | {p95:.1f} | {lat[-1]:.1f} |")
    print(f"\nreproduce: .venv/bin/python bench/wake_latency.py --rounds {args.rounds}")


if __name__ == "__main__":
    main()
