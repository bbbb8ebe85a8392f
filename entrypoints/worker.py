"""`acestep-worker`: run worker(s) against the configured backend.

Several workers can run against the same store and queue: on one machine they share the SQLite
file; on AWS each ECS task runs one. SIGTERM (scale-in, spot interruption) stops intake and lets
the running task finish; a second SIGTERM (or the grace period passing) abandons it and releases
its lease so another worker picks it up at once.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import threading

from types import FrameType
from typing import Optional, Sequence

from engine.cpu_target import passive_omp_wait_policy  # torch-free
from service.config import Settings, load_settings
from service.observability.heartbeat_file import starting_beat, unhealthy_reason, write_beat
from service.observability.logs import configure_logging

from service.broken_worker import BrokenWorker
from service.upstream_env import warn_unused_upstream_env
from service.worker import Worker

from . import bootstrap
from .cli_errors import debug_requested, explain, user_errors

log = logging.getLogger(__name__)


# Exit status of a worker whose generation hung: the launcher (or ECS) starts a fresh one.
EXIT_HUNG = 75
WEBHOOK_FLUSH_SECONDS = 5.0


def _exit_hung() -> None:
    """A hung engine call cannot be interrupted from Python; a new process is the way out."""
    log.critical("the engine is hung; exiting so a fresh worker process takes over")
    logging.shutdown()
    os._exit(EXIT_HUNG)


def run_worker(settings: Settings, grace_seconds: float = 600.0, heartbeat_file: Optional[str] = None,
               supervised: bool = False) -> None:
    if heartbeat_file:  # the health check allows model loading this long (heartbeat_file.STARTUP_LIMIT_SECONDS)
        write_beat(heartbeat_file, starting_beat(f"pid-{os.getpid()}"))
    settings = bootstrap.resolve_secrets(settings)
    backend = bootstrap.build_backend(settings)
    worker: Worker | BrokenWorker
    webhooks = bootstrap.build_webhooks(settings, backend)
    try:
        worker = bootstrap.build_worker(settings, backend=backend, on_stalled=_exit_hung,
                                        on_finished=webhooks.task_finished)
    except Exception as exc:  # stay up and say why, rather than crash-loop with tasks waiting
        explained = explain(exc)  # a missing model or a failed download: one line, the traceback when debugging
        if explained is None or debug_requested():
            log.exception("could not load the engine")
        else:
            log.error("could not load the engine: %s", explained[0])
        worker = bootstrap.build_broken_worker(settings, backend, exc, on_finished=webhooks.task_finished)
    worker.heartbeat_file = heartbeat_file

    def on_term(signum: int, frame: Optional[FrameType]) -> None:
        if worker.stop_event.is_set():
            log.warning("second signal: abandoning the running task (it will be redelivered)")
            worker.request_stop(cancel_running=True)
            return
        log.info("signal %s: finishing the running task, taking no new work", signum)
        worker.request_stop()
        # If the task outlives the grace period, give it back rather than be killed mid-way.
        timer = threading.Timer(grace_seconds, lambda: worker.request_stop(cancel_running=True))
        timer.daemon = True
        timer.start()

    signal.signal(signal.SIGTERM, on_term)
    # Under `acestep-api` the terminal's Ctrl+C reaches this process too, and the supervisor
    # forwards it as SIGTERM: acting on both would turn one Ctrl+C into "abandon the task".
    signal.signal(signal.SIGINT, signal.SIG_IGN if supervised else on_term)
    # Embedded waits wake at once for new work anyway; a short poll lets SIGTERM stop an idle worker quickly.
    try:
        worker.run_forever(poll_seconds=1.0 if settings.backend == "embedded" else 20.0)
    finally:
        if isinstance(worker, Worker) and worker.encoder is not None:
            worker.encoder.close()
    webhooks.close(WEBHOOK_FLUSH_SECONDS)  # attempts in flight finish; the rest wait in the outbox for the next start


def healthcheck(heartbeat_file: str, settings: Settings) -> int:
    """The container health check: 0 while the worker beats and its engine progresses, else 1."""
    reason = unhealthy_reason(heartbeat_file, settings.stall_timeout)
    print(reason or "healthy")
    return 0 if reason is None else 1


def main(argv: Optional[Sequence[str]] = None) -> None:
    # Before anything loads torch (OpenMP reads it once): idle OpenMP threads sleep instead of spinning on
    # cores shared with the API, the encoders and other workers (engine/cpu_target.py). A set value is kept.
    passive_omp_wait_policy(os.environ)
    parser = argparse.ArgumentParser(prog="acestep-worker", description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", help="embedded backend data dir (ACESTEP_DATA_DIR)")
    parser.add_argument("--backend", choices=["embedded", "aws"], help="ACESTEP_BACKEND")
    parser.add_argument("--checkpoint-dir", help="ACESTEP_CHECKPOINT_DIR")
    parser.add_argument("--grace-seconds", type=float, default=600.0,
                        help="after SIGTERM, how long the running task may take before it is released")
    parser.add_argument("--log-level", help="debug, info, warning, error (ACESTEP_LOG_LEVEL, info)")
    parser.add_argument("--heartbeat-file", help="also write each heartbeat to this local file (for --healthcheck)")
    parser.add_argument("--healthcheck", action="store_true",
                        help="exit 0 if the worker writing --heartbeat-file is alive and progressing, else 1")
    parser.add_argument("--supervised", action="store_true",
                        help="started by acestep-api: stop on its SIGTERMs only, ignore SIGINT")
    parser.add_argument("--debug", action="store_true", help="tracebacks for start-up failures (ACESTEP_DEBUG=1)")
    args = parser.parse_args(argv)
    if args.debug:
        os.environ["ACESTEP_DEBUG"] = "1"
    with user_errors("acestep-worker"):  # a bad setting: one line naming it, not a traceback
        settings = load_settings({"data_dir": args.data_dir, "backend": args.backend,
                                  "checkpoint_dir": args.checkpoint_dir,
                                  "log_level": args.log_level.upper() if args.log_level else None})
    if args.healthcheck:
        if not args.heartbeat_file:
            parser.error("--healthcheck needs --heartbeat-file")
        raise SystemExit(healthcheck(args.heartbeat_file, settings))
    configure_logging(settings.log_level, settings.log_format)
    if not args.supervised:  # acestep-api has warned already
        warn_unused_upstream_env(os.environ)
    run_worker(settings, grace_seconds=args.grace_seconds, heartbeat_file=args.heartbeat_file,
               supervised=args.supervised)


if __name__ == "__main__":
    main()
