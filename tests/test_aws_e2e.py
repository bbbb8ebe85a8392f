"""The AWS deployment in miniature, over real HTTP: moto's server stands in for DynamoDB/SQS/S3, the
API runs under uvicorn in one process, `acestep-worker` (real engine, tiny random-weight model) in
others, and the test is the client.

Every process runs as its role of the CDK stack: moto enforces IAM, and the API and the workers hold
the access key of an IAM user with exactly the policy statements the synthesized template gives the
API Lambda's role and the worker task's role, and the environment the template gives them (the
stack's secrets, the worker service the API wakes, the S3 model mirror). The test itself acts as an
operator with full rights. Each process also records the AWS calls it makes (tests/iam_recorder.py);
at the end a real IAM policy evaluator checks every call against the role's statements as
synthesized, and every grant against the calls (tests/iam_support.py): a missing permission, or one
nothing needs, fails the test.

One deployment serves the module's tests, each a scenario with its own time budget, in order: a submit
polled to success and downloaded through the 307 to the presigned S3 URL, a duplicate delivery of that
task producing one result; a direct upload as a cover task's source; a worker SIGKILLed mid-task whose
task is redelivered and completes once; a poison task (its worker dies on every delivery) landing in the
DLQ and reading as failed with its reason; then the permission check over all of their calls.

Most of a worker's start-up is importing torch, diffusers and the engine (~8 s of CPU). The worker
processes are therefore forked from one parent that has done those imports (a "fork server", as
multiprocessing's forkserver does), each then running `entrypoints.worker.main` -- the
`acestep-worker` entry point -- in a process of its own that the test kills with SIGKILL. Each wait is
on a condition, with a generous deadline; none is a fixed sleep.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from service.ports import FAILED, RUNNING, SUCCEEDED
from tests import iam_support as iam
from tests.aws_support import FAKE_AWS_ENV, aws_settings, free_port, moto_server
from tests.ecs_agent_support import EcsAgent
from tests.iam_recorder import LOG_ENV as CALL_LOG_ENV
from tests.live_server import poll_until

sf = pytest.importorskip("soundfile")
pytest.importorskip("torch")

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
LEASE_SECONDS = 4  # short, so a killed worker's task comes back quickly
MAX_RECEIVES = 2
WORKERS = 3  # one is killed mid-task, the other two by the poison task
SHORT = {"prompt": "lofi", "audio_duration": 10, "inference_steps": 8, "batch_size": 1, "audio_format": "wav"}
# Killed as soon as it is claimed, then run whole by the next worker: a few seconds on the tiny model,
# many times what the test takes to see the claim and kill the worker.
LONG = {**SHORT, "audio_duration": 20, "inference_steps": 30}
# Never finishes: every worker that takes it is killed. Minutes on the tiny model, so it cannot end first.
POISON = {**SHORT, "audio_duration": 300, "inference_steps": 100}
WAIT = 90.0  # deadline for any one condition: generous, a loaded machine must not fail the test
API_KEY = "e2e-key-from-secrets-manager"
ECS_CLUSTER, ECS_SERVICE = "acestep-e2e", "workers"


# -- the fork server (runs in its own process) --------------------------------------------------

def fork_server() -> None:
    """Read one JSON spec per line on stdin; fork a worker for each and answer its pid on stdout.

    Only imports happen here (no torch op, no thread of our own), so forking is safe. Ends at EOF;
    the workers, each in a session of its own, are SIGKILLed when it ends (PR_SET_PDEATHSIG).
    """
    from tests.iam_recorder import install

    install()  # before boto3 builds a session: every worker records its AWS calls
    import entrypoints.bootstrap  # noqa: F401
    import entrypoints.worker
    import engine.weights.checkpoints  # noqa: F401
    import engine.weights.random_pipeline  # noqa: F401  (builds the demo checkpoint)
    import engine.service  # noqa: F401  (torch, diffusers, transformers: the slow part)
    import service.aws  # noqa: F401  (boto3)
    import service.worker  # noqa: F401

    server = os.getpid()
    for line in sys.stdin:
        spec = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _run_forked_worker(spec, entrypoints.worker.main, server)
        sys.stdout.write(f"{pid}\n")
        sys.stdout.flush()
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0]:  # reap the workers the test has killed
                pass


def _run_forked_worker(spec: dict, worker_main, server: int) -> None:
    code = 1
    try:
        os.setsid()  # its own process group, as the test's kill() expects
        if sys.platform.startswith("linux"):
            import ctypes

            ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the fork server
            if os.getppid() != server:  # it died before that took effect
                os._exit(1)
        log = os.open(spec["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        os.chdir(spec["cwd"])
        os.environ.clear()
        os.environ.update(spec["env"])
        sys.argv = ["acestep-worker", *spec["argv"]]
        worker_main(spec["argv"])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


# -- the test side ------------------------------------------------------------------------------

AUTH = {"Authorization": f"Bearer {API_KEY}"}
_CREDENTIAL_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")


def _is_credential(name: str) -> bool:
    return name in _CREDENTIAL_VARS


def _credentials(env: dict) -> dict:
    return {"aws_access_key_id": env["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"]}


@contextlib.contextmanager
def _acting_as(identity: "iam.Identity"):
    """This process's AWS clients (service.aws.clients) use `identity`'s key, then the previous ones."""
    from service.aws.clients import forget_sessions

    saved = {k: os.environ.get(k) for k in _CREDENTIAL_VARS}
    for k in _CREDENTIAL_VARS:
        os.environ.pop(k, None)
    os.environ.update(identity.env())
    forget_sessions()
    try:
        yield
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None)
            if v is not None:
                os.environ[k] = v
        forget_sessions()


def ecs_agent(call_log: Path) -> EcsAgent:
    """The workers' ECS agent. The calls to ECS it makes for a task (with the task role's credentials;
    moto has no task protection) go into the workers' call log for the IAM evaluator."""
    def record(operation: str, params: dict) -> None:
        with open(call_log, "a") as log:
            log.write(json.dumps({"service": "ecs", "operation": operation, "params": params}) + "\n")

    return EcsAgent(cluster=ECS_CLUSTER, region="us-east-1", account=iam.ACCOUNT, on_ecs_call=record)


class Forked:
    """A worker process forked by the fork server (not our child: no Popen)."""

    def __init__(self, pid: int, log_name: str):
        self.pid, self.log_name = pid, log_name

    def alive(self) -> bool:
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except (FileNotFoundError, ProcessLookupError):
            return False


def _readable(fd: int, timeout: float) -> bool:
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        return bool(selector.select(timeout))


class Cluster:
    """The processes of the deployment plus a test-side view of the same AWS resources."""

    def __init__(self, tmp: Path, basetemp: Path):
        self.tmp = tmp
        self.synth = iam.SynthInBackground(basetemp)  # the stack's template: its roles and environments
        self.undo = contextlib.ExitStack()
        self.base_env = {  # no AWS credentials: each process gets its role's
            **{k: v for k, v in os.environ.items() if not k.startswith("ACESTEP_") and not _is_credential(k)},
            "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
            # One torch thread per worker: three workers, the API and moto share the machine. With a
            # thread per core each, a busy 2-core machine spends most of a generation spin-waiting
            # (3-4x slower, measured).
            "OMP_NUM_THREADS": "1",
        }
        self.procs: list[subprocess.Popen] = []
        self.workers: list[Forked] = []
        self.passed: set[str] = set()  # the scenarios that passed (the permission check needs them all)
        self._replies = b""
        # Started first: its imports overlap moto's start-up, provisioning and the API's start-up.
        # One BLAS thread keeps numpy from starting a thread pool: the fork server stays single-threaded.
        self.forks = self._popen("fork-server", ["-c", "from tests.test_aws_e2e import fork_server; fork_server()"],
                                 env={**self.base_env, "OPENBLAS_NUM_THREADS": "1"},
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def provision(self, endpoint: str) -> None:
        """What the stack creates, in moto (as an operator, before moto enforces IAM); then the roles'
        users, and IAM on. The processes get the stack's environment, with the test's overrides below."""
        import boto3

        from service.aws import make_aws_backend
        from service.aws.provision import provision

        self.settings = provision(aws_settings(self.tmp, aws_endpoint_url=endpoint, max_receives=MAX_RECEIVES,
                                               visibility_timeout=LEASE_SECONDS,
                                               interactive_queue_url="acestep-test-interactive"))
        s = self.settings
        setup = dict(endpoint_url=endpoint, region_name="us-east-1", **_credentials(FAKE_AWS_ENV))
        api_key = boto3.client("secretsmanager", **setup).create_secret(Name="acestep-e2e-api-key",
                                                                         SecretString=API_KEY)["ARN"]
        ecs = boto3.client("ecs", **setup)
        ecs.create_cluster(clusterName=ECS_CLUSTER)
        ecs.register_task_definition(family="worker", containerDefinitions=[
            {"name": "worker", "image": iam.WORKER_IMAGE, "memory": 1024}])
        ecs.create_service(cluster=ECS_CLUSTER, serviceName=ECS_SERVICE, taskDefinition="worker", desiredCount=0)
        names = iam.MotoNames(table=s.table_name, queue_url=s.queue_url, dlq_url=s.dlq_url,
                              interactive_queue_url=s.interactive_queue_url, bucket=s.bucket,
                              api_key_secret_arn=api_key, signing_secret_arn=s.signing_secret_arn,
                              webhook_secret_arn=s.webhook_secret_arn,
                              cluster=ECS_CLUSTER, service=ECS_SERVICE)
        self.access = iam.StackAccess(self.synth.template(), names, boto3.client("iam", **setup))
        self.undo.enter_context(iam.iam_enforced())
        self.undo.enter_context(_acting_as(self.access.admin))
        admin = dict(endpoint_url=endpoint, region_name="us-east-1", **_credentials(self.access.admin.env()))
        self.ecs = boto3.client("ecs", **admin)
        self.backend = make_aws_backend(self.settings)  # the test's view, with the operator's rights
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.agent = self.undo.enter_context(ecs_agent(self.tmp / "worker-calls.jsonl"))
        overrides = {"ACESTEP_AWS_ENDPOINT_URL": endpoint, "ACESTEP_AWS_REGION": "us-east-1",
                     # short leases and few deliveries, so lost tasks come back and dead-letter quickly
                     "ACESTEP_VISIBILITY_TIMEOUT": str(LEASE_SECONDS), "ACESTEP_MAX_RECEIVES": str(MAX_RECEIVES)}
        self.api_env = {**self.base_env, **self.access.api_env(), **overrides,
                        CALL_LOG_ENV: str(self.tmp / "api-calls.jsonl")}
        self.env = {**self.base_env, **self.access.worker_env(), **overrides,
                    "ACESTEP_PUBLIC_BASE_URL": self.base,
                    # CPU, no hub, nothing in the S3 mirror (the workers look there first): the first
                    # worker builds the random-weight demo model
                    "ACESTEP_CHECKPOINT_DIR": str(self.tmp / "checkpoints"), "ACESTEP_DEMO_IF_MISSING": "true",
                    "ACESTEP_ALLOW_DOWNLOAD": "false", "ACESTEP_DEVICE": "cpu",
                    CALL_LOG_ENV: str(self.tmp / "worker-calls.jsonl")}

    def _popen(self, name: str, args: list[str], env: dict, **kw) -> subprocess.Popen:
        with open(self.tmp / f"{name}.log", "ab") as log:
            stdout = kw.pop("stdout", log)
            proc = subprocess.Popen([sys.executable, *args], cwd=self.tmp, env=env, stdout=stdout,
                                    stderr=log, start_new_session=True, **kw)
        proc.log_name = name
        self.procs.append(proc)
        return proc

    def start(self) -> None:
        """The API and WORKERS workers, as much in parallel as the demo checkpoint allows."""
        api = self._popen("api", ["-m", "tests.iam_recorder", "uvicorn", "--factory",
                                  "entrypoints.bootstrap:app_from_env",
                                  "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"],
                          env=self.api_env)
        self.start_worker("worker1")
        self.wait_until("the API to answer", lambda: api.poll() is not None or self._healthy())
        assert api.poll() is None, "API did not start:\n" + self.logs()
        # The first worker builds the random-weight demo checkpoint; the others load it once it is
        # there (concurrent builds into one folder would race), while the first runs the first task.
        self.wait_until("worker1 to publish its models", self._models_published)
        for i in range(2, WORKERS + 1):
            self.start_worker(f"worker{i}")

    def _healthy(self) -> bool:
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(self.base + "/health", headers=AUTH, timeout=2).status_code == 200
        return False

    def _models_published(self) -> bool:
        models = httpx.get(self.base + "/health", headers=AUTH, timeout=10).json()["data"].get("models") or []
        return bool(models) and all(m.get("random_weights") is not None for m in models)

    def start_worker(self, name: str) -> Forked:
        env = {**self.env, "ECS_AGENT_URI": self.agent.uri_for(f"{name}-task")}
        spec = {"log": str(self.tmp / f"{name}.log"), "cwd": str(self.tmp), "env": env,
                "argv": ["--backend", "aws", "--grace-seconds", "5"]}
        self.forks.stdin.write((json.dumps(spec) + "\n").encode())
        self.forks.stdin.flush()
        worker = Forked(int(self._reply()), name)
        self.workers.append(worker)
        return worker

    def _reply(self) -> str:
        """The fork server's next line (it answers once its imports are done)."""
        deadline = time.monotonic() + WAIT
        fd = self.forks.stdout.fileno()
        while b"\n" not in self._replies:
            remaining = deadline - time.monotonic()
            # poll, not select: after the rest of the suite this process may hold fds past select()'s 1024
            if remaining <= 0 or not _readable(fd, remaining):
                raise AssertionError("the fork server did not answer:\n" + self.logs())
            chunk = os.read(fd, 4096)
            if not chunk:
                raise AssertionError("the fork server exited:\n" + self.logs())
            self._replies += chunk
        line, self._replies = self._replies.split(b"\n", 1)
        return line.decode()

    def kill(self, worker: Forked) -> None:
        os.killpg(worker.pid, signal.SIGKILL)  # no SIGTERM courtesy: a crash, OOM kill or lost instance
        self.wait_until(f"{worker.log_name} to die", lambda: not worker.alive())

    def stop_all(self) -> None:
        for worker in self.workers:
            if worker.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(worker.pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            self.forks.stdin.close()  # EOF: the fork server exits
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        self.forks.stdout.close()

    def logs(self) -> str:
        names = [p.log_name for p in self.procs] + [w.log_name for w in self.workers]
        return "\n".join(f"--- {name}\n" + (self.tmp / f"{name}.log").read_text(errors="replace")[-3000:]
                         for name in names if (self.tmp / f"{name}.log").exists())

    # -- client side ---------------------------------------------------------------------

    def submit(self, request: dict) -> str:
        r = httpx.post(self.base + "/release_task", json=request, headers=AUTH, timeout=10)
        assert r.status_code == 200, r.text
        return r.json()["data"]["task_id"]

    def query(self, task_id: str) -> dict:
        r = httpx.post(self.base + "/query_result", json={"task_id_list": [task_id]}, headers=AUTH, timeout=10)
        return r.json()["data"][0]

    def wait_until(self, what: str, predicate, timeout: float = WAIT, interval: float = 0.1):
        return poll_until(what, predicate, timeout, interval, lambda: "\n" + self.logs())

    def wait_done(self, task_id: str) -> dict:
        return self.wait_until(f"{task_id} to finish", lambda: (e := self.query(task_id))["status"] in (1, 2) and e)

    def wait_running(self, task_id: str, attempt: int):
        def running():
            rec = self.backend.store.get(task_id)
            return rec if rec and rec.status == RUNNING and rec.attempt == attempt else None
        # Polled often: the sooner a claim is seen, the less of the task its worker has done when killed.
        return self.wait_until(f"{task_id} to run attempt {attempt}", running, interval=0.03)

    def worker_of(self, record) -> Forked:
        """The worker process holding the task (worker ids are host-pid-suffix)."""
        pid = int(record.worker_id.rsplit("-", 2)[1])
        worker = next((w for w in self.workers if w.pid == pid), None)
        assert worker is not None, f"{record.worker_id} is none of the test's workers"
        return worker

    def kill_mid_task(self, task_id: str, attempt: int) -> Forked:
        """SIGKILL the worker as soon as it has claimed `attempt`, and check that it died mid-task."""
        worker = self.worker_of(self.wait_running(task_id, attempt))
        self.kill(worker)
        rec = self.backend.store.get(task_id)
        assert rec.status == RUNNING and rec.attempt == attempt, \
            f"attempt {attempt} of {task_id} ended before its worker could be killed: {rec}"
        return worker

    def output_objects(self, task_id: str) -> list[str]:
        s3 = self.backend.blobs._s3
        listing = s3.list_objects_v2(Bucket=self.settings.bucket, Prefix=f"outputs/{task_id}/")
        return sorted(o["Key"] for o in listing.get("Contents", []))

    def queue_attributes(self) -> dict[str, int]:
        attrs = self.backend.queue._sqs.get_queue_attributes(
            QueueUrl=self.settings.queue_url,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
        return {k: int(v) for k, v in attrs.items()}

    def queue_depth(self) -> int:
        return sum(self.queue_attributes().values())

    def visible_messages(self) -> int:
        return self.queue_attributes()["ApproximateNumberOfMessages"]

    def check_permissions(self) -> None:
        unavailable = iam.ensure_evaluator()
        if unavailable:
            pytest.skip(f"the flows passed under the roles' policies, but {unavailable}")
        problems = []
        for role, log in ((iam.API_ROLE, "api-calls.jsonl"), (iam.WORKER_ROLE, "worker-calls.jsonl"),
                          (iam.EXECUTION_ROLE, None)):
            calls = iam.calls_from_log(self.tmp / log) if log else []
            assert not iam.check_arns(calls), iam.check_arns(calls)
            denied, unused = iam.judge(self.access, role, calls)
            problems += [f"{role}: {c.action} on {c.resource} ({c.source}) is {verdict}" for c, verdict in denied]
            problems += [f"{role}: granted but not needed: {grant}" for grant in unused]
        assert not problems, "\n".join(problems)


# One deployment for the module (provisioning and the workers' start-up are its cost); each scenario is a
# test with its own time budget, run in this order: the kill scenarios leave one live worker each fewer.
# The first test's budget also covers the start-up.
START_BUDGET = 300


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("aws-e2e"), tmp_path_factory.getbasetemp())
    try:
        with moto_server() as endpoint:
            try:
                c.provision(endpoint)
                c.start()
                yield c
            finally:
                c.stop_all()  # before moto goes away
    finally:
        c.stop_all()  # the fork server, should moto not have started
        c.synth.cancel()
        c.undo.close()  # IAM enforcement off, the test's own credentials back


@pytest.mark.timeout(START_BUDGET)
def test_a_task_runs_once_and_downloads_through_a_presigned_redirect(cluster):
    """Submit, poll to success, download through the 307 to the presigned S3 URL. SQS delivers at least
    once: a second message for the same task must not make a second result."""
    from service.aws.sqs_queue import encode_body

    t1 = cluster.submit(SHORT)
    # The API woke the worker service (desired count 0 -> 1), as it does after a quiet spell.
    cluster.wait_until("the API to start the worker service", lambda: cluster.ecs.describe_services(
        cluster=ECS_CLUSTER, services=[ECS_SERVICE])["services"][0]["desiredCount"] == 1)
    cluster.backend.queue._sqs.send_message(QueueUrl=cluster.settings.queue_url, MessageBody=encode_body(t1))
    entry = cluster.wait_done(t1)
    assert entry["status"] == 1, entry
    items = json.loads(entry["result"])
    assert len(items) == 1 and items[0]["file"]
    r = httpx.get(cluster.base + items[0]["file"], headers=AUTH, follow_redirects=False, timeout=10)
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
    # The worker asked the ECS agent for scale-in protection while it ran the task.
    assert True in cluster.agent.states()
    cluster.passed.add("run")


def test_a_direct_upload_is_a_cover_tasks_source(cluster):
    """The API hands out a presigned PUT, the file goes straight to S3, a cover task uses it (the API
    checks it is there, a worker reads it). Receivers read the webhook secret."""
    ticket = httpx.post(cluster.base + "/v1/uploads", json={"filename": "src.wav", "content_type": "audio/wav"},
                        headers=AUTH, timeout=10).json()["data"]
    source = io.BytesIO()
    sf.write(source, [0.0] * 48000, 48000, format="WAV")
    put = httpx.put(ticket["upload_url"], content=source.getvalue(), headers=ticket["headers"], timeout=10)
    assert put.status_code == 200, put.text
    t_cover = cluster.submit({**SHORT, "task_type": "cover", "src_audio_key": ticket["key"]})
    entry = cluster.wait_done(t_cover)
    assert entry["status"] == 1, entry
    r = httpx.get(cluster.base + "/v1/webhook_secret", headers=AUTH, timeout=10)
    assert r.status_code == 200 and r.json()["data"]["secret"].startswith("whsec_"), r.text
    cluster.passed.add("upload")


def test_a_worker_killed_mid_task_hands_it_to_another(cluster):
    """The lease lapses, another worker gets the task, it completes once."""
    t2 = cluster.submit(LONG)
    cluster.kill_mid_task(t2, attempt=1)
    entry = cluster.wait_done(t2)
    assert entry["status"] == 1, entry
    rec = cluster.backend.store.get(t2)
    assert rec.attempt == 2 and rec.status == SUCCEEDED
    assert cluster.output_objects(t2) == [f"outputs/{t2}/2-0.wav"]
    cluster.passed.add("killed")


def test_a_poison_task_is_dead_lettered_and_failed_with_the_reason(cluster):
    """Every worker that takes it dies. After MAX_RECEIVES deliveries SQS moves it to the DLQ; the drain
    (which each worker runs as it starts, then every 30 s) marks it failed with the reason: a new worker
    does it here."""
    before = cluster.backend.store.counts()
    t3 = cluster.submit(POISON)
    first = cluster.kill_mid_task(t3, attempt=1)
    second = cluster.kill_mid_task(t3, attempt=2)  # another worker, once the dead one's lease lapsed
    assert second is not first
    # Once the dead worker's lease lapses the message is visible again, and the next receive finds
    # its receives spent: SQS redrives it to the DLQ instead of delivering it.
    cluster.wait_until("t3's second lease to lapse", lambda: cluster.visible_messages() == 1)
    assert cluster.backend.queue.receive(0, 30) is None
    cluster.start_worker("worker4")
    entry = cluster.wait_until("a worker to drain t3's dead letter", lambda: (e := cluster.query(t3))["status"] == 2 and e)
    assert entry["error"].startswith(f"dead-lettered after {MAX_RECEIVES} deliveries"), entry
    assert cluster.backend.store.get(t3).status == FAILED
    counts = cluster.backend.store.counts()
    assert (counts["succeeded"], counts["failed"], counts["running"]) == (before["succeeded"], before["failed"] + 1, 0)
    cluster.passed.add("poison")


def test_each_process_held_exactly_the_permissions_it_needed(cluster):
    """Least privilege: every call each process made in the scenarios above is allowed by its role's
    statements as synthesized, and every statement is needed by one (or by AWS on the role's behalf:
    iam.EXPECTED). Judged on the whole module's calls: a partial run cannot tell an unneeded grant."""
    missing = {"run", "upload", "killed", "poison"} - cluster.passed
    if missing:
        pytest.skip(f"needs every scenario of this module to have passed (not: {', '.join(sorted(missing))})")
    cluster.check_permissions()
