"""/health latency on the ACE-Step port while hostile bodies hit the chat port of the same process.

Both APIs share one event loop (entrypoints/api_server.py), so parsing on it stalls both. This starts
`python -m entrypoints.api_server --workers 0` (the real listeners), sends each hostile body to the
chat port while a prober GETs /health on the other port every 20 ms, and prints, per body, its
answer and the slowest /health answer seen meanwhile.

    .venv/bin/python bench/chat_bomb.py            # the bodies below
    .venv/bin/python bench/chat_bomb.py --kb 125   # only "<prompt>" * (125 KB / 8)
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import multiprocessing
import subprocess
import sys
import tempfile
import time

import httpx


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bodies(kb: int | None) -> dict[str, bytes]:
    def chat(content) -> bytes:
        return json.dumps({"messages": [{"role": "user", "content": content}]}).encode()

    if kb:
        return {f"<prompt> x {kb} KB": chat("<prompt>" * (kb * 1024 // 8))}
    audio = base64.b64encode(os.urandom(48 * 2**20)).decode()
    return {
        "<prompt> x 250 KB": chat("<prompt>" * 32000),
        "<prompt> x 32 KB (under the limit)": chat("<prompt>" * 4095),
        "48 MB input_audio (64 MB body)": chat([{"type": "text", "text": "<prompt>x</prompt>"},
                                                {"type": "input_audio", "input_audio": {"data": audio, "format": "wav"}}]),
    }


def _probe(url: str, stop, worst) -> None:
    """In its own process: the sender's work must not delay the probe's own clock."""
    with httpx.Client(timeout=300) as client:
        while not stop.is_set():
            started = time.perf_counter()
            client.get(url)
            worst.value = max(worst.value, time.perf_counter() - started)
            stop.wait(0.02)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kb", type=int, help="only one '<prompt>' body of this many KB")
    args = parser.parse_args()
    api_port, chat_port = _free_port(), _free_port()
    data = tempfile.mkdtemp(prefix="chat-bomb-")
    # No worker runs: a valid chat request waits OPENROUTER_MAX_WAIT for its task, then answers 504.
    env = {**os.environ, "ACESTEP_LOG_LEVEL": "WARNING", "HF_HUB_OFFLINE": "1", "OPENROUTER_MAX_WAIT": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "entrypoints.api_server", "--workers", "0", "--port", str(api_port),
                             "--openrouter-port", str(chat_port), "--data-dir", data, "--checkpoint-dir", data], env=env)
    try:
        health = f"http://127.0.0.1:{api_port}/health"
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(health, timeout=2)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit("the server did not start")
                time.sleep(0.2)
        for name, body in _bodies(args.kb).items():
            stop, worst = multiprocessing.Event(), multiprocessing.Value("d", 0.0)
            prober = multiprocessing.Process(target=_probe, args=(health, stop, worst))
            prober.start()
            time.sleep(0.2)
            started = time.perf_counter()
            r = httpx.post(f"http://127.0.0.1:{chat_port}/v1/chat/completions", content=body,
                           headers={"content-type": "application/json"}, timeout=600)
            took = time.perf_counter() - started
            time.sleep(0.2)
            stop.set()
            prober.join()
            print(f"{name:40s} -> {r.status_code} in {took:6.2f} s; slowest /health meanwhile {worst.value * 1000:8.1f} ms"
                  f"  ({r.text[:90]})")
    finally:
        proc.terminate()
        proc.wait(30)


if __name__ == "__main__":
    main()
