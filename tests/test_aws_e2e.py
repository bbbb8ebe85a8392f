"""The AWS deployment in miniature, over real HTTP: moto's server stands in for DynamoDB/SQS/S3, the
API runs under uvicorn in one process, `acestep-worker` (real engine, tiny random-weight model) in
others, and the test is the client.

One test walks through, in order: a submit polled to success and downloaded through the 307 to the
presigned S3 URL; a duplicate delivery of that task producing one result; a worker SIGKILLed
mid-task whose task is redelivered and completes once; a poison task (its worker dies on every
delivery) landing in the DLQ and reading as failed with its reason.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from service.ports import FAILED, RUNNING, SUCCEEDED
from tests.aws_support import aws_settings, free_port, moto_server

sf = pytest.importorskip("soundfile")
pytest.importorskip("torch")

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
LEASE_SECONDS = 4  # short, so a killed worker's task comes back quickly
MAX_RECEIVES = 2
SHORT = {"prompt": "lofi", "audio_duration": 10, "inference_steps": 8, "batch_size": 1, "audio_format": "wav"}
LONG = {**SHORT, "audio_duration": 20, "inference_steps": 30}  # a few seconds on the tiny model: time to kill it


class Cluster:
    """The processes of the deployment plus a test-side view of the same AWS resources."""

    def __init__(self, tmp: Path, endpoint: str):
        from service.aws import make_aws_backend
        from service.aws.provision import provision

        self.tmp = tmp
        self.settings = provision(aws_settings(tmp, aws_endpoint_url=endpoint, max_receives=MAX_RECEIVES,
                                               visibility_timeout=LEASE_SECONDS))
        self.backend = make_aws_backend(self.settings)
        s = self.settings
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("ACESTEP_")},
            "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
            "ACESTEP_BACKEND": "aws", "ACESTEP_AWS_ENDPOINT_URL": endpoint, "ACESTEP_AWS_REGION": "us-east-1",
            "ACESTEP_TABLE_NAME": s.table_name, "ACESTEP_QUEUE_URL": s.queue_url,
            "ACESTEP_DLQ_URL": s.dlq_url, "ACESTEP_BUCKET": s.bucket,
            "ACESTEP_VISIBILITY_TIMEOUT": str(LEASE_SECONDS), "ACESTEP_MAX_RECEIVES": str(MAX_RECEIVES),
            "ACESTEP_CHECKPOINT_DIR": str(tmp / "checkpoints"), "ACESTEP_DEMO_IF_MISSING": "true",
            "ACESTEP_ALLOW_DOWNLOAD": "false", "ACESTEP_DEVICE": "cpu",
        }
        self.procs: list[subprocess.Popen] = []
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "ab")
        proc = subprocess.Popen([sys.executable, *args], cwd=self.tmp, env=self.env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        proc.log_name = name
        self.procs.append(proc)
        return proc

    def start_api(self) -> None:
        proc = self._spawn("api", ["-m", "uvicorn", "--factory", "entrypoints.bootstrap:app_from_env",
                                   "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.base + "/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.1)
        raise AssertionError("API did not start:\n" + self.logs())

    def start_worker(self, name: str) -> subprocess.Popen:
        return self._spawn(name, ["-m", "entrypoints.worker", "--backend", "aws", "--grace-seconds", "5"])

    def kill(self, proc: subprocess.Popen) -> None:
        os.killpg(proc.pid, signal.SIGKILL)  # no SIGTERM courtesy: a crash, OOM kill or lost instance
        proc.wait(10)

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)

    def logs(self) -> str:
        return "\n".join(f"--- {p.log_name}\n" + (self.tmp / f"{p.log_name}.log").read_text(errors="replace")[-3000:]
                         for p in self.procs)

    # -- client side ---------------------------------------------------------------------

    def submit(self, request: dict) -> str:
        r = httpx.post(self.base + "/release_task", json=request, timeout=10)
        assert r.status_code == 200, r.text
        return r.json()["data"]["task_id"]

    def query(self, task_id: str) -> dict:
        r = httpx.post(self.base + "/query_result", json={"task_id_list": [task_id]}, timeout=10)
        return r.json()["data"][0]

    def wait_until(self, what: str, predicate, timeout: float = 90.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}\n" + self.logs())

    def wait_done(self, task_id: str) -> dict:
        return self.wait_until(f"{task_id} to finish", lambda: (e := self.query(task_id))["status"] in (1, 2) and e)

    def wait_running(self, task_id: str, attempt: int) -> None:
        def running():
            rec = self.backend.store.get(task_id)
            return rec and rec.status == RUNNING and rec.attempt == attempt
        self.wait_until(f"{task_id} to run attempt {attempt}", running)

    def worker_running(self, task_id: str) -> subprocess.Popen:
        """The worker process holding the task (worker ids are host-pid-suffix)."""
        pid = int(self.backend.store.get(task_id).worker_id.rsplit("-", 2)[1])
        return next(p for p in self.procs if p.pid == pid)

    def output_objects(self, task_id: str) -> list[str]:
        s3 = self.backend.blobs._s3
        listing = s3.list_objects_v2(Bucket=self.settings.bucket, Prefix=f"outputs/{task_id}/")
        return sorted(o["Key"] for o in listing.get("Contents", []))

    def queue_depth(self) -> int:
        attrs = self.backend.queue._sqs.get_queue_attributes(
            QueueUrl=self.settings.queue_url,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
        return int(attrs["ApproximateNumberOfMessages"]) + int(attrs["ApproximateNumberOfMessagesNotVisible"])


@pytest.fixture
def cluster(tmp_path):
    with moto_server() as endpoint:
        c = Cluster(tmp_path, endpoint)
        try:
            yield c
        finally:
            c.stop_all()


def test_aws_deployment_over_http(cluster):
    from service.aws.dlq import drain_dead_letters
    from service.aws.sqs_queue import encode_body

    cluster.start_api()
    w1 = cluster.start_worker("worker1")

    # 1. Submit, poll to success, download through the 307 to the presigned S3 URL.
    #    SQS delivers at least once: a second message for the same task must not make a second result.
    t1 = cluster.submit(SHORT)
    cluster.backend.queue._sqs.send_message(QueueUrl=cluster.settings.queue_url, MessageBody=encode_body(t1))
    entry = cluster.wait_done(t1)
    assert entry["status"] == 1, entry
    items = json.loads(entry["result"])
    assert len(items) == 1 and items[0]["file"]
    r = httpx.get(cluster.base + items[0]["file"], follow_redirects=False, timeout=10)
    assert r.status_code == 307
    presigned = r.headers["location"]
    assert presigned.startswith(cluster.settings.aws_endpoint_url) and "X-Amz-Signature" in presigned
    audio = httpx.get(presigned, timeout=10)  # no API key, no AWS credentials: the signature is the grant
    assert audio.status_code == 200
    samples, rate = sf.read(io.BytesIO(audio.content))
    assert rate > 0 and len(samples) >= rate * 9
    cluster.wait_until("both deliveries of t1 to be acked", lambda: cluster.queue_depth() == 0)
    rec = cluster.backend.store.get(t1)
    assert rec.status == SUCCEEDED
    assert cluster.output_objects(t1) == sorted(k for k in rec.blob_keys if k.startswith("outputs/"))
    assert len(cluster.output_objects(t1)) == 1  # one result: a losing duplicate removed its files

    # 2. A worker killed mid-task: the lease lapses, another worker gets the task, it completes once.
    t2 = cluster.submit(LONG)
    cluster.wait_running(t2, attempt=1)
    cluster.kill(w1)
    cluster.start_worker("worker2")
    cluster.start_worker("worker3")  # started now so phase 3 does not wait for another model load
    entry = cluster.wait_done(t2)
    assert entry["status"] == 1, entry
    rec = cluster.backend.store.get(t2)
    assert rec.attempt == 2 and rec.status == SUCCEEDED
    assert cluster.output_objects(t2) == [f"outputs/{t2}/2-0.wav"]

    # 3. A poison task: every worker that takes it dies. After MAX_RECEIVES deliveries SQS moves it
    #    to the DLQ; the drain (which each worker runs every 30 s) marks it failed with the reason.
    t3 = cluster.submit(LONG)
    cluster.wait_running(t3, attempt=1)
    first = cluster.worker_running(t3)
    cluster.kill(first)
    cluster.wait_running(t3, attempt=2)  # the other worker, once the dead one's lease lapsed
    second = cluster.worker_running(t3)
    assert second is not first
    cluster.kill(second)
    # Once the dead worker's lease lapses, the next receive finds the receives spent: SQS redrives it.
    time.sleep(LEASE_SECONDS + 0.5)
    assert cluster.backend.queue.receive(1, 30) is None
    assert drain_dead_letters(cluster.backend) == [t3]
    entry = cluster.query(t3)
    assert entry["status"] == 2
    assert entry["error"].startswith(f"dead-lettered after {MAX_RECEIVES} deliveries"), entry
    assert cluster.backend.store.get(t3).status == FAILED
    counts = cluster.backend.store.counts()
    assert counts["succeeded"] == 2 and counts["failed"] == 1 and counts["running"] == 0
