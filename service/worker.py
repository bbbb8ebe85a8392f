"""The worker loop: lease a task, run the engine, store the audio, record the outcome.

Each round's parts live beside it: batch assembly (service/worker_batch.py), the engine call
(service/worker_run.py) and outcome recording (service/worker_outcomes.py, shared with the
post-processing stage and the broken worker). This module wires them and runs the loop, the
heartbeat and the housekeeping.

It talks only to the ports and to a GenerationEngine (service/ports.py), so the same loop runs on
SQLite or SQS/DynamoDB and with the real engine or a test one.

Delivery is at least once: a lease that is not acked (the worker died) comes back after its
visibility timeout. `store.claim` bumps the task's attempt number and `store.finish` only
accepts the current attempt, so a task finishes exactly once. The same attempt fences the queue:
a worker whose attempt is no longer the task's current one never acks, extends or gives back its
lease (on SQS an old receipt can still delete the message the new holder owns).
"""
from __future__ import annotations

import functools
import gc
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any, Callable, Optional, Sequence

from .config import Settings
from .lease_keeper import LeaseKeeper
from .model_switch import ModelSwitch, Unloaded
from .observability.health import HEARTBEAT_SECONDS
from .observability.heartbeat import HeartbeatLoop
from .observability.logs import log_context
from .observability.metrics import MetricsSink, NoMetrics
from .ports import AudioEncoder, Backend, GenerationEngine
from .records import MODELS_META_KEY, ModelEntry, ModelsMeta, WorkerHeartbeat
from .post_stage import PostStage
from .storage_errors import StorageFull
from .worker_batch import BatchAssembler, ClaimedTask
from .worker_devices import WorkerDevices, worker_devices
from .worker_outcomes import OutcomeRecorder
from .worker_run import BatchRun

log = logging.getLogger(__name__)

LOCAL_ADAPTERS_META_KEY = "adapters_local"  # read by the API (contract in /work/notes/adapters-contract.md)

SWEEP_INTERVAL_SECONDS = 600
DEAD_LETTER_INTERVAL_SECONDS = 30


class _Chore:
    """A backend housekeeping call (returns a count), run at most once per interval.

    A failure is logged and retried next interval: housekeeping must not stop the worker.
    """

    def __init__(self, fn: Optional[Callable[[], int]], interval: float, done_message: str,
                 level: int = logging.INFO):
        self.fn, self.interval, self.done_message, self.level = fn, interval, done_message, level
        self.last_run: Optional[float] = None  # None: due now

    def run_if_due(self) -> None:
        now = time.monotonic()
        if self.fn is None or (self.last_run is not None and now - self.last_run < self.interval):
            return
        self.last_run = now
        try:
            n = self.fn()
            if n:
                log.log(self.level, self.done_message, n)
        except Exception:
            log.exception("housekeeping failed: %s", self.done_message)


class Worker:
    """The loop: each round the assembler claims a batch, the run calls the engine, and the recorder
    (here, or in the post-processing stage while the engine runs the next batch) records each outcome."""

    def __init__(self, settings: Settings, backend: Backend, engine: GenerationEngine,
                 worker_id: Optional[str] = None, on_stalled: Optional[Callable[[], None]] = None,
                 metrics: Optional[MetricsSink] = None, on_busy: Optional[Callable[[bool], None]] = None,
                 on_finished: Optional[Callable[[str], None]] = None, encoder: Optional[AudioEncoder] = None,
                 model_switch: Optional[ModelSwitch] = None):
        self.settings = settings
        self.backend = backend
        self.engine = engine
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.metrics: MetricsSink = metrics or NoMetrics()
        # True as a task starts, False once idle: ECS task scale-in protection (service/aws/task_protection.py)
        self.on_busy = on_busy
        self.started_at = time.time()
        self.heartbeat_seconds = HEARTBEAT_SECONDS
        self.heartbeat_file: Optional[str] = None  # for the container health check (acestep-worker --healthcheck)
        self.stop_event = threading.Event()  # stop taking new work
        self.cancel_event = threading.Event()  # abandon the running task too (release its lease)
        # Backend housekeeping, each due on the first round and then every interval.
        self.dead_letter_chore = _Chore(backend.drain_dead_letters, DEAD_LETTER_INTERVAL_SECONDS,
                                        "marked %d dead-lettered task(s) failed", logging.WARNING)
        self.sweep_chore = _Chore(backend.sweep_expired, SWEEP_INTERVAL_SECONDS,
                                  "removed %d expired task(s)/upload(s)")
        # Encodes in other processes (its creator closes it); without one, the engine encodes and the
        # post-processing stage stores and records.
        self.encoder = encoder
        # The pipeline (ACESTEP_PIPELINE): a generated batch's encoding, storing and recording run in
        # the post-processing stage while the engine starts the next batch. Off: all in this thread.
        pipelined = pipeline_enabled(settings, engine)
        self._keeper = LeaseKeeper(backend, settings.visibility_timeout) if pipelined else None
        # on_finished: a task this worker finished (webhooks); must not block
        self.recorder = OutcomeRecorder(backend, self.metrics, on_finished, self._keeper)
        self.assembler = BatchAssembler(settings, backend, engine, self.worker_id, self.recorder, self.stop_event)
        # on_stalled: a generation is hung (see run_watch); the CLI exits here
        self.batch_run = BatchRun(settings, backend, engine, self.recorder, self.cancel_event, on_stalled)
        self._post: Optional[PostStage] = None
        # POST /v1/init on one machine: the model set to serve, swapped in between batches (None: fixed at start)
        self.model_switch = model_switch
        if self._keeper is not None:
            self._post = PostStage(self.recorder, self.encoder, self._keeper, settings.pipeline_depth,
                                   self.cancel_event, encode_timeout=settings.stall_timeout)

    # -- lifecycle -------------------------------------------------------------------------

    @functools.cached_property
    def _lm_model(self) -> str:
        """The LM this worker runs, as its heartbeats say it (service/fleet.py reads them)."""
        return str(self.engine.describe().get("lm_model") or "none")

    def publish_models(self) -> None:
        """Tell the API what this worker serves (for /v1/models and /health)."""
        info = self.engine.describe()
        shapes = {str(m.get("name")): m["adapter_shape"] for m in info.get("models") or [] if m.get("adapter_shape")}
        meta = ModelsMeta(
            models=[ModelEntry(name=m.name, is_default=m.is_default, random_weights=m.random_weights,
                               task_types=list(m.task_types), adapter_shape=shapes.get(m.name))
                    for m in self.engine.models()],
            device=info.get("device"), dtype=info.get("dtype"), lm_model=info.get("lm_model", "none"),
            quantization=info.get("quantization"), worker_id=self.worker_id, updated_at=time.time())
        self.backend.store.put_meta(MODELS_META_KEY, meta.model_dump())
        # the adapters a request may name on this worker's disk (the API lists and checks them from here)
        self.backend.store.put_meta(LOCAL_ADAPTERS_META_KEY, {
            "worker_id": self.worker_id, "updated_at": time.time(), "adapters": info.get("local_adapters") or []})

    def run_forever(self, poll_seconds: float = 5.0) -> None:
        with log_context(worker_id=self.worker_id):
            self.publish_models()
            if self._post is not None and self.encoder is not None:
                self.encoder.warm_up()
            with HeartbeatLoop(self.backend.store, self.heartbeat, self.heartbeat_seconds, self.stop_event,
                               also=lambda: self.metrics.queue_depth(self.backend.queue.size()),
                               file=self.heartbeat_file):
                log.info("worker %s ready", self.worker_id)
                full_since: Optional[float] = None
                while not self.stop_event.is_set():
                    try:
                        self.run_once(poll_seconds, overlap=True)
                        if full_since is not None:
                            log.warning("storage has room again after %.0f s: taking tasks", time.monotonic() - full_since)
                            full_since = None
                    except StorageFull as exc:  # an outage: wait it out, log once, take no task meanwhile
                        if full_since is None:
                            full_since = time.monotonic()
                            log.error("storage is full (%s): not taking tasks until there is room", exc)
                        self.stop_event.wait(_backoff(time.monotonic() - full_since))
                    except Exception:  # the loop must survive a backend hiccup
                        log.exception("worker loop error")
                        self.stop_event.wait(1.0)
                try:
                    carried, self.assembler.carried = self.assembler.carried, None
                    if carried is not None:
                        self.backend.queue.release(carried)  # never claimed: a plain give-back
                finally:
                    self.close()  # drains the post-processing stage (hands it back on a second signal)
                    self._signal_busy(False)
            log.info("worker %s stopped", self.worker_id)

    def heartbeat(self) -> WorkerHeartbeat:
        """This worker's state now: idle, or running which tasks (generating, then post-processing) and when
        the engine last progressed."""
        now, watch, switch = time.time(), self.batch_run.watch, self.model_switch
        beat = WorkerHeartbeat(worker_id=self.worker_id, started_at=self.started_at, beat_at=now,
                               state="stopping" if self.stop_event.is_set() else "idle", lm_model=self._lm_model,
                               adapters=[f"{a['model']}/{a['name']}"
                                         for a in self.engine.describe().get("loaded_adapters") or []],
                               models=[m.name for m in self.engine.models()], devices=self._devices())
        if switch is not None:
            beat.models_version, beat.models_loading, beat.models_error = switch.answered, switch.loading, switch.error
        posting = self._post.task_ids() if self._post is not None else []
        if watch is not None or posting:
            beat.state = "running"
            beat.task_ids = posting + ([lease.task_id for lease, _ in watch.tasks] if watch is not None else [])
        if watch is not None:
            beat.last_progress_at = now - (time.monotonic() - watch.last_progress)
        return beat

    def _devices(self) -> Optional[WorkerDevices]:
        """What the engine runs on; a probe that fails (a driver error) leaves them out of the beat, not the beat."""
        try:
            report = self.engine.devices()
        except Exception:
            log.warning("could not read this worker's devices", exc_info=True)
            return None
        return worker_devices(report) if report is not None else None

    def close(self) -> None:
        """Finish what the post-processing stage holds (hand it back once cancel_event is set), then stop
        its threads."""
        if self._post is not None:
            self._post.close()
            self._post.take_error()  # stopping: a storage outage met at the end changes nothing now
        if self._keeper is not None:
            self._keeper.close()

    def _raise_post_error(self) -> None:
        error = self._post.take_error() if self._post is not None else None
        if error is not None:
            raise error

    def request_stop(self, cancel_running: bool = False) -> None:
        self.stop_event.set()
        if cancel_running:
            self.cancel_event.set()

    # -- one round -------------------------------------------------------------------------

    def run_once(self, wait_seconds: float, overlap: bool = False) -> bool:
        """Process the next task (and compatible ones waiting behind it). False if none came.

        With the pipeline on, its encoding, storing and recording run in the post-processing stage:
        `overlap` returns as soon as the engine is done (run_forever; `close` drains), otherwise
        run_once returns once every task of the round is recorded."""
        self._raise_post_error()  # a recording in the post-processing stage found storage full
        self.dead_letter_chore.run_if_due()
        self.sweep_chore.run_if_due()
        if self.backend.has_room is not None and not self.backend.has_room():
            raise StorageFull(f"less than ACESTEP_MIN_FREE_MB ({self.settings.min_free_mb} MB) free")
        self._switch_models_if_asked()  # between batches: the last one is done (post-processing waited for)
        lease = self.assembler.take_carried()
        if lease is not None:
            # An LM-only call that came in while the last batch ran goes before the generation held over
            # from it (the held one stays leased and kept alive; the embedded queue and SQS lane do the same).
            interactive = self.backend.queue.receive_interactive(self.settings.visibility_timeout)
            if interactive is not None:
                self.assembler.carried, lease = lease, interactive
        if lease is None:
            lease = self.backend.queue.receive(wait_seconds, self.settings.visibility_timeout)
            if lease is None:
                if self._post is None or self._post.idle():
                    self._signal_busy(False)
                return False
            if self.stop_event.is_set():  # arrived during a long poll after shutdown began
                self.backend.queue.release(lease)
                return False
        batch = self.assembler.assemble(lease)
        if not batch:
            return True
        self._signal_busy(True)
        self._run(batch, overlap)
        return True

    def _switch_models_if_asked(self) -> None:
        """Load the model set POST /v1/init asked for, if there is a new wish, and serve it from the next batch.
        Tasks queued for a model it drops fail with MODEL_UNLOADED when claimed (README: model management)."""
        wanted = self.model_switch.due(self.engine) if self.model_switch is not None else None
        if wanted is None or self.model_switch is None:
            return
        if self._post is not None:  # the last batch's outputs are recorded before its engine goes
            self._post.wait_idle()
            self._raise_post_error()
        carried, self.assembler.carried = self.assembler.carried, None
        if carried is not None:  # its lease would lapse during the load: hand it back (never claimed)
            self.backend.queue.release(carried)
        before = [m.name for m in self.engine.models()]
        try:
            switched = self.model_switch.switch(wanted, self._drop_engine)
        except Exception:  # the old set was dropped and would not load again: no engine left to serve with
            log.critical("could not reload the models in use after a failed switch: stopping (a new worker "
                         "starts from its start-up settings)")
            self.request_stop()
            raise
        if switched.engine is None:
            return  # it failed beside the old set: the old one serves on, the heartbeat says why
        self._use_engine(switched.engine, switched.settings)
        now = [m.name for m in self.engine.models()]
        for name in before:
            if name not in now:
                self.assembler.unloaded_models[name] = (
                    f"model {name} was unloaded by POST /v1/init before this task ran; the server now serves "
                    f"{', '.join(now)}: submit it again")
        for name in now:
            self.assembler.unloaded_models.pop(name, None)
        self.publish_models()

    def _drop_engine(self) -> None:
        """Release the engine in use (a switch to a set that fits only alone)."""
        self._use_engine(Unloaded(), self.settings)
        gc.collect()

    def _use_engine(self, engine: GenerationEngine, settings: Settings) -> None:
        self.engine = self.assembler.engine = self.batch_run.engine = engine
        self.settings = self.assembler.settings = self.batch_run.settings = settings
        self.__dict__.pop("_lm_model", None)  # cached per engine

    def _signal_busy(self, busy: bool) -> None:
        if self.on_busy is None:
            return
        try:
            self.on_busy(busy)
        except Exception as exc:  # protection is an optimisation: the task runs either way
            log.warning("could not %s scale-in protection: %s", "set" if busy else "clear", exc)

    def _run(self, batch: list[ClaimedTask], overlap: bool = False) -> None:
        # A batch's lines name all its tasks (`task_ids`, `attempts`; a lone task's `task_id`, `attempt`), each
        # outcome line its own: a field has one type on every line (an attempt is always an int).
        carried = [self.assembler.carried] if self.assembler.carried is not None else []
        with log_context(**_task_fields(batch)):
            # Pipelined with an encoder: the post-processing stage encodes, in other processes.
            outcomes = self.batch_run.generate(batch, keep_alive=carried,
                                               encode=self._post is None or self.encoder is None)
        if outcomes is None:
            return
        if self._post is None:
            self.recorder.record(batch, outcomes)
            return
        self._post.hand_over(batch, outcomes, hold=carried)
        if not overlap:
            self._post.wait_idle()
            self._raise_post_error()


def pipeline_enabled(settings: Settings, engine: GenerationEngine) -> bool:
    """ACESTEP_PIPELINE, or when auto: whether the engine runs on a GPU. On CPU the engine and the encoders
    compete for the same cores (bench/RESULTS.md: it gains at batch 1 and loses at batch 2-4 on 2 cores)."""
    if settings.pipeline is not None:
        return settings.pipeline
    return str(engine.describe().get("device") or "cpu").startswith("cuda")


def _backoff(outage_seconds: float) -> float:
    """1 s, doubling with the outage's length, at most a minute."""
    return min(60.0, max(1.0, outage_seconds))


def _task_fields(batch: Sequence[ClaimedTask]) -> dict[str, Any]:
    if len(batch) == 1:
        return {"task_id": batch[0].task_id, "attempt": int(batch[0].attempt)}
    return {"task_ids": [c.task_id for c in batch], "attempts": [int(c.attempt) for c in batch]}
