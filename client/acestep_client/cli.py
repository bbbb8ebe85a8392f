"""`acestep`: generate, status, models, cancel, adapters (list, upload, delete) from a shell.

Exit codes (for scripts):
  0  done (generate: files written; status: the task succeeded)
  1  the task failed or was cancelled (the server's reason on stderr)
  2  bad arguments or an unreadable input file (adapters upload: not an adapter file or folder)
  3  the API key was refused (401/403)
  4  the server refused the request (another 4xx/5xx, e.g. 400 bad field or adapter, 409 name taken, 429 queue full)
  5  the server could not be reached
  6  timed out waiting (the task may still finish: `acestep status ID`)
  7  the server does not support this command (an upstream server has no cancel, no adapters)
  8  status: the task is still queued or running
  130 interrupted (Ctrl-C); `generate` asks the server to cancel its task first
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from dataclasses import asdict
from typing import Any, Optional, Sequence

from . import protocol
from .client import ACEStepClient
from .errors import (ACEStepError, APIError, AuthError, NotSupported, ServerUnreachable, TaskFailed, WaitCancelled,
                     WaitTimeout)
from .progress import ProgressView
from .types import AdapterInfo, TaskState, TaskStatus

OK, FAILED, USAGE, AUTH, REFUSED, UNREACHABLE, TIMEOUT, UNSUPPORTED, PENDING, INTERRUPTED = 0, 1, 2, 3, 4, 5, 6, 7, 8, 130
TASK_TYPES = ("text2music", "cover", "repaint", "lego", "extract", "complete")


def exit_code(exc: ACEStepError) -> int:
    if isinstance(exc, TaskFailed):
        return FAILED
    if isinstance(exc, AuthError):
        return AUTH
    if isinstance(exc, NotSupported):
        return UNSUPPORTED
    if isinstance(exc, APIError):
        return REFUSED
    if isinstance(exc, ServerUnreachable):
        return UNREACHABLE
    if isinstance(exc, WaitTimeout):
        return TIMEOUT
    if isinstance(exc, WaitCancelled):
        return INTERRUPTED
    return FAILED


def _key_value(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)  # numbers, true/false, JSON objects
    except ValueError:
        return key, value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="acestep", description="ACE-Step REST API client",
                                     epilog=__doc__.split("\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--api-url", help=f"server URL (env {protocol.URL_ENV}; default {protocol.DEFAULT_URL})")
    parser.add_argument("--api-key", help=f"API key, sent as Bearer (env {protocol.KEY_ENV})")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="submit a task, follow it, download the audio")
    gen.add_argument("prompt", help="the caption: style, instruments, mood")
    gen.add_argument("--lyrics", metavar="FILE", help="a lyrics file ('-' reads stdin)")
    gen.add_argument("--duration", type=float, help="seconds")
    gen.add_argument("--bpm", type=int)
    gen.add_argument("--key", dest="key_scale", help='e.g. "C major"')
    gen.add_argument("--time-signature", help="2, 3, 4 or 6")
    gen.add_argument("--language", dest="vocal_language", help="vocal language code, e.g. en")
    gen.add_argument("--batch-size", type=int)
    gen.add_argument("--format", dest="audio_format", choices=("mp3", "wav", "flac", "opus", "aac", "wav32"))
    gen.add_argument("--seed", help='int, or "1,2,3" for one per item')
    gen.add_argument("--model", help="a name from `acestep models`")
    gen.add_argument("--steps", dest="inference_steps", type=int)
    gen.add_argument("--thinking", action="store_true", help="let the 5 Hz LM plan (needs a worker with the LM)")
    gen.add_argument("--task-type", choices=TASK_TYPES)
    gen.add_argument("--src-audio", metavar="FILE", help="source audio for cover/repaint/lego/extract/complete")
    gen.add_argument("--repaint-start", dest="repainting_start", type=float)
    gen.add_argument("--repaint-end", dest="repainting_end", type=float)
    gen.add_argument("--adapter", action="append", metavar="NAME",
                     help="a LoRA/LoKr adapter from `acestep adapters list` (repeat to stack, up to 4)")
    gen.add_argument("--adapter-scale", action="append", type=float, metavar="SCALE",
                     help="-2..2, default 1: one for all adapters, or one per --adapter in order")
    gen.add_argument("--param", action="append", type=_key_value, default=[], metavar="KEY=VALUE",
                     help="any other /release_task field (repeatable; values parsed as JSON when they are)")
    gen.add_argument("-o", "--output", default=".", help="output directory (or file name for one result)")
    gen.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for the result (default 1800)")
    gen.add_argument("--no-progress", action="store_true", help="no progress on stderr (a bar on a terminal, else a line per change)")
    gen.add_argument("--json", action="store_true", help="print the result as JSON instead of the file paths")

    st = sub.add_parser("status", help="a task's state (exit 0 succeeded, 1 failed, 8 still going)")
    st.add_argument("task_id")
    st.add_argument("--json", action="store_true")

    models = sub.add_parser("models", help="the models the server serves")
    models.add_argument("--json", action="store_true")

    cancel = sub.add_parser("cancel", help="cancel a queued or running task")
    cancel.add_argument("task_id")

    adapters = sub.add_parser("adapters", help="LoRA/LoKr adapters: list, upload, delete")
    verbs = adapters.add_subparsers(dest="adapters_command", required=True)
    listing = verbs.add_parser("list", help="the adapters the server can apply, and the models each fits")
    listing.add_argument("--model", help="only those fitting this model")
    listing.add_argument("--json", action="store_true")
    upload = verbs.add_parser("upload", help="upload a .safetensors, a .zip of a PEFT folder, or the folder")
    upload.add_argument("path")
    upload.add_argument("--name", help="default: the file's or folder's name")
    upload.add_argument("--model", help="the model it is for (default: the server's default model)")
    upload.add_argument("--replace", action="store_true", help="take the name over from another uploaded adapter")
    upload.add_argument("--json", action="store_true")
    delete = verbs.add_parser("delete", help="delete an uploaded adapter")
    delete.add_argument("name")
    return parser


def _fields(args: argparse.Namespace) -> dict:
    names = ("bpm", "key_scale", "time_signature", "vocal_language", "batch_size", "audio_format",
             "seed", "model", "inference_steps", "task_type", "repainting_start", "repainting_end")
    fields = {name: getattr(args, name, None) for name in names}
    fields["audio_duration"] = args.duration
    if args.thinking:
        fields["thinking"] = True
    if args.adapter:
        fields["adapter"] = args.adapter[0] if len(args.adapter) == 1 else args.adapter
    if args.adapter_scale:
        fields["adapter_scale"] = args.adapter_scale[0] if len(args.adapter_scale) == 1 else args.adapter_scale
    fields.update(dict(args.param))
    return {k: v for k, v in fields.items() if v is not None}


def _read_lyrics(path: Optional[str]) -> str:
    if not path:
        return ""
    if path == "-":
        return sys.stdin.read()
    with open(path, encoding="utf-8") as f:
        return f.read()


def _describe(status: TaskStatus) -> dict:
    out: dict[str, Any] = {"task_id": status.task_id, "state": status.state.value, "queue_position": status.queue_position,
           "progress": status.progress, "stage": status.stage, "error": status.error}
    out["audios"] = [{"index": a.index, "file": a.file, "seed": a.seed, "format": a.format,
                      "metas": {k: v for k, v in asdict(a.metas).items() if k != "raw"}} for a in status.audios]
    return out


def cmd_generate(client: ACEStepClient, args: argparse.Namespace) -> int:
    if args.src_audio and not os.path.isfile(args.src_audio):
        print(f"acestep: --src-audio: no such file: {args.src_audio}", file=sys.stderr)
        return USAGE
    task = client.submit(args.prompt, _read_lyrics(args.lyrics), src_audio=args.src_audio, **_fields(args))
    print(f"task {task.task_id} queued", file=sys.stderr)
    view = ProgressView("off" if args.no_progress else "bar" if sys.stderr.isatty() else "lines")
    stop = threading.Event()
    try:
        status = client.wait(task.task_id, timeout=args.timeout, on_update=view.update, cancel=stop)
    except KeyboardInterrupt:
        view.close()
        _cancel_quietly(client, task.task_id)
        return INTERRUPTED
    except WaitTimeout as exc:
        view.close()
        print(f"acestep: {exc}; check later with `acestep status {task.task_id}`", file=sys.stderr)
        return TIMEOUT
    finally:
        view.close()
    paths = client.download_all(status, args.output)
    if args.json:
        print(json.dumps(_describe(status) | {"paths": paths}, indent=2))
    else:
        for path in paths:
            print(path)
    return OK


def _cancel_quietly(client: ACEStepClient, task_id: str) -> None:
    try:
        client.cancel(task_id)
        print(f"acestep: interrupted; task {task_id} cancelled", file=sys.stderr)
    except ACEStepError as exc:
        print(f"acestep: interrupted; task {task_id} was not cancelled ({exc})", file=sys.stderr)


def cmd_status(client: ACEStepClient, args: argparse.Namespace) -> int:
    status = client.status(args.task_id)
    if args.json:
        print(json.dumps(_describe(status), indent=2))
    elif status.state is TaskState.QUEUED:
        print("queued" + (f" (position {status.queue_position})" if status.queue_position else ""))
    elif status.state is TaskState.RUNNING:
        print(f"running: {status.stage} ({round(100 * status.progress)}%)")
    elif status.state in (TaskState.FAILED, TaskState.CANCELLED):
        print(f"{status.state.value}: {status.error}")
    else:
        print("succeeded")
        for audio in status.audios:
            print(f"  {protocol.absolute(client.base_url, audio.file)}  seed={audio.seed}")
    return OK if status.state is TaskState.SUCCEEDED else FAILED if status.finished else PENDING


def cmd_models(client: ACEStepClient, args: argparse.Namespace) -> int:
    listing = client.models()
    if args.json:
        print(json.dumps({"models": [asdict(m) for m in listing.models], "default_model": listing.default_model,
                          "lm_model": listing.lm_model}, indent=2))
        return OK
    for model in listing.models:
        notes = [n for n, on in (("default", model.is_default), ("random weights", model.random_weights)) if on]
        print(model.name + (f"  ({', '.join(notes)})" if notes else ""))
    if listing.lm_model:
        print(f"LM: {listing.lm_model}")
    return OK


def cmd_cancel(client: ACEStepClient, args: argparse.Namespace) -> int:
    try:
        data = client.cancel(args.task_id)
    except NotSupported:
        print(f"acestep: the server at {client.base_url} does not support cancel", file=sys.stderr)
        return UNSUPPORTED
    data = data if isinstance(data, dict) else {}
    if data.get("cancelled_now", True):
        print(f"task {args.task_id}: cancelled")
    else:  # it finished first (or was cancelled before): the server says how it ended
        print(f"task {args.task_id}: already {data.get('status', 'finished')}")
    return OK


def _adapter_line(adapter: AdapterInfo) -> str:
    size = "size ?" if adapter.size_bytes is None else (f"{adapter.size_bytes / 1e6:.1f} MB" if adapter.size_bytes >= 1e6
                                                         else f"{adapter.size_bytes / 1e3:.0f} kB")
    fits = ", ".join(adapter.fits_models) or "no served model"
    return f"{adapter.name}  ({adapter.kind}, rank {adapter.rank}, {size}, {adapter.source}; fits: {fits})"


def cmd_adapters(client: ACEStepClient, args: argparse.Namespace) -> int:
    verb = args.adapters_command
    if verb == "list":
        listing = client.list_adapters()
        shown = listing.fitting(args.model) if args.model else listing.adapters
        if args.json:
            print(json.dumps({"adapters": [a.raw for a in shown], "unusable": listing.unusable,
                              "default": listing.default}, indent=2))
            return OK
        for adapter in shown:
            print(_adapter_line(adapter))
        for name, why in sorted(listing.unusable.items()):
            print(f"acestep: not usable: {name}: {why}", file=sys.stderr)
        return OK
    if verb == "upload":
        try:
            stored = client.upload_adapter(args.path, args.name, model=args.model, replace=args.replace)
        except ValueError as exc:
            print(f"acestep: {exc}", file=sys.stderr)
            return USAGE
        if args.json:
            print(json.dumps({"adapter": stored.raw, "created": stored.created}, indent=2))
        else:
            print(("stored " if stored.created else "already stored: ") + _adapter_line(stored))
        return OK
    client.delete_adapter(args.name)
    print(f"adapter {args.name}: deleted")
    return OK


COMMANDS = {"generate": cmd_generate, "status": cmd_status, "models": cmd_models, "cancel": cmd_cancel,
            "adapters": cmd_adapters}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with ACEStepClient(args.api_url, args.api_key) as client:
            return COMMANDS[args.command](client, args)
    except OSError as exc:  # an unreadable --lyrics file, an unwritable -o
        print(f"acestep: {exc}", file=sys.stderr)
        return USAGE
    except ACEStepError as exc:
        print(f"acestep: {exc}", file=sys.stderr)
        return exit_code(exc)
    except KeyboardInterrupt:
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
