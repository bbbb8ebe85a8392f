"""Cold start of the Lambda entry point: import time and memory in a fresh interpreter.

Each measurement runs a new `python -c` (as a Lambda cold start does), imports one target and
reports the import wall time and the peak RSS. The Lambda entry (entrypoints.lambda_api, which
builds the whole app with the AWS backend) is compared with a bare `import fastapi`, so the
difference is what our code adds. Nothing reaches AWS: fake credentials and an unroutable
endpoint are set, and building the app makes no AWS calls.

    .venv/bin/python bench/lambda_cold_start.py [--runs 7]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_CHILD = """
import json, resource, sys, time
t0 = time.perf_counter()
import {module}
elapsed = time.perf_counter() - t0
print(json.dumps({{
    "seconds": elapsed,
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "modules": len(sys.modules),
    "torch": "torch" in sys.modules,
}}))
"""

TARGETS = {
    "python (no import)": "sys",
    "import fastapi (baseline)": "fastapi",
    "entrypoints.lambda_api": "entrypoints.lambda_api",
}


def child_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACESTEP_", "AWS_"))}
    env.update({
        "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
        "ACESTEP_BACKEND": "aws", "ACESTEP_AWS_ENDPOINT_URL": "http://127.0.0.1:9",
        "ACESTEP_TABLE_NAME": "bench-tasks", "ACESTEP_QUEUE_URL": "http://127.0.0.1:9/000000000000/bench",
        "ACESTEP_DLQ_URL": "http://127.0.0.1:9/000000000000/bench-dlq", "ACESTEP_BUCKET": "bench-audio",
        "PYTHONDONTWRITEBYTECODE": "0",
    })
    return env


def measure(module: str, runs: int) -> dict:
    samples = []
    for _ in range(runs + 1):  # the first run warms the bytecode cache and the page cache; dropped
        out = subprocess.run([sys.executable, "-c", _CHILD.format(module=module)], cwd=ROOT,
                             env=child_env(), capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise SystemExit(f"importing {module} failed:\n{out.stderr[-2000:]}")
        samples.append(json.loads(out.stdout.strip().splitlines()[-1]))
    samples = samples[1:]
    return {
        "import_ms": statistics.median(s["seconds"] for s in samples) * 1000,
        "import_ms_max": max(s["seconds"] for s in samples) * 1000,
        "peak_rss_mb": statistics.median(s["peak_rss_mb"] for s in samples),
        "modules": samples[-1]["modules"],
        "torch": any(s["torch"] for s in samples),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    rows = {name: measure(module, args.runs) for name, module in TARGETS.items()}
    print(f"Lambda entry cold import, median of {args.runs} fresh interpreters "
          f"(Python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs)\n")
    print("| target | import ms (median) | import ms (max) | peak RSS MB | modules | torch loaded |")
    print("|---|---:|---:|---:|---:|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['import_ms']:.0f} | {r['import_ms_max']:.0f} | {r['peak_rss_mb']:.1f} "
              f"| {r['modules']} | {'yes' if r['torch'] else 'no'} |")
    base, entry = rows["import fastapi (baseline)"], rows["entrypoints.lambda_api"]
    print(f"\nThe entry adds {entry['import_ms'] - base['import_ms']:.0f} ms and "
          f"{entry['peak_rss_mb'] - base['peak_rss_mb']:.1f} MB over a bare `import fastapi`.")
    exe = Path(sys.executable)
    shown = exe.relative_to(ROOT) if exe.is_relative_to(ROOT) else exe.name
    print(f"Reproduce: {shown} bench/lambda_cold_start.py --runs {args.runs}")
    if entry["torch"]:
        raise SystemExit("torch was imported by the Lambda entry")


if __name__ == "__main__":
    main()
