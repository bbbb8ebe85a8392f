"""`acestep-models`: list, download, convert, publish or fake (random-weight) ACE-Step checkpoints.

    acestep-models list [--checkpoint-dir DIR]
        every model (the DiTs and the 5 Hz LM): its state (present / MISSING / DEMO / converted) and where
        its weights come from (repo @ revision, or local files)
    acestep-models download NAME [--checkpoint-dir DIR]     from its published source, verified, pinned;
        a random-weight demo in NAME's folder is moved out of the way first
    acestep-models convert SRC DST [--name NAME] [--overwrite]
        original layout (SRC/NAME, SRC/vae, SRC/Qwen3-Embedding-0.6B) -> diffusers layout at DST
        (a random-weight demo at DST is replaced without --overwrite)
    acestep-models publish NAME --bucket BUCKET [--checkpoint-dir DIR]
        copy the model (downloaded and converted first if needed) to s3://BUCKET/models/NAME/ for AWS
        workers (ACESTEP_MODELS_MIRROR); random-weight models are refused
    acestep-models make-tiny DIR [--name NAME] [--seed N] [--layout diffusers|original] [--full-size]
        tiny random-weight demo model at DIR/NAME, marked as such (its audio is noise); --full-size: the
        published shapes, still random (GB on disk)
    acestep-models make-tiny-adapter MODEL OUT [--kind lora|lokr] [--rank N] [--seed N] [--single-file]
        a random-weight LoRA or LoKr that fits MODEL's folder, written as upstream's trainer writes it: a
        test adapter, not a style

Settings come from the environment and .env, as for acestep-api. A failure prints one line (what, why, the
fix) and exits non-zero; --debug (or ACESTEP_DEBUG=1) adds the traceback.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from engine.weights import model_sources, original_layout
from engine.weights.checkpoints import (
    DEMO_DIR,
    DEMO_NOTICE,
    LAYOUTS,
    build_tiny_checkpoint,
    demo_model_dir,
    download_model,
    is_complete,
    local_layout,
    model_dir,
)
from engine.weights.demo_marker import is_random, read_marker
from engine.config import DEFAULT_MODEL
from engine.weights.converted_cache import cache_path, is_fresh, source_record

from .cli_errors import EXIT_CONFIG, CliError, debug_requested, user_errors

if TYPE_CHECKING:  # settings are read only by the commands that need them
    from service.config import Settings

PROG = "acestep-models"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the traceback of a failure")
    sub = parser.add_subparsers(dest="command", required=True)
    tiny = sub.add_parser("make-tiny", help="build a tiny random-weight model (its audio is noise)")
    tiny.add_argument("dir", help="checkpoint dir; the model goes to DIR/NAME")
    tiny.add_argument("--name", default=DEFAULT_MODEL, help=f"model name (default {DEFAULT_MODEL}); "
                      "'turbo' in the name makes a turbo model (text2music/cover/repaint only)")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--full-size", action="store_true", help="published sizes instead of tiny (GB on disk)")
    tiny.add_argument("--layout", choices=LAYOUTS, default="diffusers",
                      help="diffusers (default): DIR/NAME/model_index.json + components; original: ACE-Step's "
                      "published layout, DIR/NAME/ + DIR/vae/ + DIR/Qwen3-Embedding-0.6B/")
    adapter = sub.add_parser("make-tiny-adapter", help="write a random-weight LoRA or LoKr for a model, in upstream's "
                             "trainer layout (it changes the audio, but is noise, not a style)")
    adapter.add_argument("model", help="the diffusers-layout model folder it must fit (e.g. checkpoints/NAME)")
    adapter.add_argument("out", help="where to write it: a folder (PEFT LoRA: adapter_config.json + "
                         "adapter_model.safetensors; LoKr: lokr_weights.safetensors), e.g. checkpoints/loras/NAME")
    adapter.add_argument("--kind", choices=("lora", "lokr"), default="lora")
    adapter.add_argument("--rank", type=int, default=4)
    adapter.add_argument("--seed", type=int, default=0)
    adapter.add_argument("--single-file", action="store_true", help="a LoRA as one OUT.safetensors instead")
    conv = sub.add_parser("convert", help="convert an original-layout model to the diffusers layout")
    conv.add_argument("src", help="folder holding NAME/, vae/ and Qwen3-Embedding-0.6B/ (or the NAME/ folder itself)")
    conv.add_argument("dst", help="the diffusers-layout model folder to write (atomically)")
    conv.add_argument("--name", default=None, help="the DiT folder under SRC (default: the only one there)")
    conv.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    lst = sub.add_parser("list", help="show every model: state and where its weights come from")
    lst.add_argument("--checkpoint-dir", default=None)
    dl = sub.add_parser("download", help="download a model from its published source on the Hugging Face Hub")
    dl.add_argument("name")
    dl.add_argument("--checkpoint-dir", default=None)
    pub = sub.add_parser("publish", help="copy a model to the stack's S3 bucket for AWS workers")
    pub.add_argument("name")
    pub.add_argument("--bucket", required=True, help="the stack's bucket (its BucketName output)")
    pub.add_argument("--checkpoint-dir", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with user_errors(PROG, args.debug or debug_requested([])):
        return run(args)


def run(args: argparse.Namespace) -> int:
    if args.command == "make-tiny":
        path = build_tiny_checkpoint(Path(args.dir) / args.name, seed=args.seed, model_name=args.name,
                                     size="full" if args.full_size else "tiny", layout=args.layout)
        print(f"built {path} ({'full-size' if args.full_size else 'tiny'}, {args.layout} layout, seed {args.seed})"
              f" -- {DEMO_NOTICE}; `acestep-models download {args.name}` replaces it with the real weights")
        return 0
    if args.command == "make-tiny-adapter":
        from engine.adapter_builder import build_tiny_adapter, model_shape_at
        from engine.adapter_manifest import inspect_adapter

        shape = model_shape_at(Path(args.model))
        path = build_tiny_adapter(Path(args.out), shape, args.kind, rank=args.rank, seed=args.seed,
                                  single_file=args.single_file)
        info = inspect_adapter(path, shape=shape)
        print(f"wrote {path} ({info.kind}, {info.format}, rank {info.rank}, {info.num_modules} linears of "
              f"{args.model}) -- random weights: a test adapter, not a style")
        return 0
    if args.command == "convert":
        return convert(Path(args.src), Path(args.dst), args.name, args.overwrite)
    settings = _settings()
    root = Path(args.checkpoint_dir or settings.checkpoint_dir)
    if args.command == "list":
        return list_models(root, settings)
    if args.command == "download":
        return download(root, args.name)
    if args.command == "publish":
        return publish(root, args.name, args.bucket, settings)
    return 1


def _settings() -> Settings:
    from service.config import load_settings

    return load_settings()


# -------------------------------------------------------------------------------- download
def _offline_reason(settings: Optional[Settings] = None) -> Optional[str]:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    if settings is not None and not settings.allow_download:
        return "ACESTEP_ALLOW_DOWNLOAD is false"
    return None


def download(root: Path, name: str) -> int:
    if _offline_reason():
        raise CliError(f"cannot download {name}: HF_HUB_OFFLINE is set; unset it (and make sure the hub, "
                       f"{model_sources.hub_endpoint()}, is reachable), then run this again", EXIT_CONFIG)
    was_demo = is_random(model_dir(root, name))
    path = download_model(name, root)
    print(f"downloaded {name} to {path} ({model_sources.source_for(name).describe()})"
          + (f"; the random-weight demo that was there is now in {demo_model_dir(root, name)}" if was_demo else ""))
    return 0


# -------------------------------------------------------------------------------- publish
def publish(root: Path, name: str, bucket: str, settings: Settings) -> int:
    """Publish the diffusers layout the engine loads: the model itself, or its conversion; a missing model is
    downloaded first; random weights are refused."""
    from engine.weights.checkpoints import ModelNotFound, resolve_model
    from engine.config import EngineConfig

    folder_now = model_dir(root, name)
    if is_random(folder_now):
        raise CliError(_refuse_demo(name, folder_now))
    if local_layout(root, name) is None:
        reason = _offline_reason(settings)
        if reason:
            raise CliError(f"cannot publish {name}: it is not in {root} and downloads are off ({reason}); "
                           f"put its weights in {folder_now} or allow downloads, then publish again", EXIT_CONFIG)
        print(f"{name} is not in {root}: downloading it first ({model_sources.source_for(name).describe()})")
        download_model(name, root)
    config = EngineConfig(checkpoint_dir=str(root), model_names=[name], allow_download=False)
    try:
        folder = resolve_model(config, name)  # converts an original-layout model first
    except ModelNotFound as exc:
        raise CliError(f"cannot publish {name}: {exc}") from exc
    if is_random(folder):  # a conversion carries the demo marker along
        raise CliError(_refuse_demo(name, folder))
    size = _upload(bucket, name, folder)
    print(f"published {name} from {folder} to s3://{bucket}/models/{name}/ ({size / 1e9:.2f} GB)")
    return 0


def _refuse_demo(name: str, folder: Path) -> str:
    return (f"refusing to publish {name}: {folder} holds random weights (a demo, its audio is noise) and every AWS "
            f"worker would serve it. Run `acestep-models download {name}` (the real weights replace the demo), "
            f"then publish again")


def _upload(bucket: str, name: str, folder: Path) -> int:
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    from service.aws.model_mirror import publish as publish_to_s3

    s3 = boto3.client("s3")
    where = f"s3://{bucket}/models/{name}/"
    try:
        s3.head_bucket(Bucket=bucket)  # fail on the bucket, not half-way through the upload
        return publish_to_s3(s3, bucket, name, folder)
    except NoCredentialsError as exc:
        raise CliError(f"cannot publish {name} to {where}: no AWS credentials found; run `aws configure` (or set "
                       f"AWS_PROFILE / AWS_ACCESS_KEY_ID) for the account that holds the stack") from exc
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchBucket"):
            raise CliError(f"cannot publish {name}: bucket {bucket!r} does not exist for these credentials; "
                           f"pass the stack's BucketName output (aws cloudformation describe-stacks)") from exc
        if code in ("403", "AccessDenied", "AllAccessDisabled"):
            raise CliError(f"cannot publish {name} to {where}: access denied; use credentials allowed to write "
                           f"the stack's bucket") from exc
        raise CliError(f"cannot publish {name} to {where}: S3 answered {code or 'an error'} ({exc})") from exc
    except BotoCoreError as exc:
        raise CliError(f"cannot publish {name} to {where}: {type(exc).__name__}: {exc}") from exc


# -------------------------------------------------------------------------------- convert
def convert(src: Path, dst: Path, name: str | None, overwrite: bool) -> int:
    from engine.weights.convert import convert_original

    if original_layout.looks_like_dit(src):  # SRC is the DiT folder itself
        if name not in (None, src.name):
            print(f"SRC {src} is the DiT folder {src.name!r}, but --name says {name!r}", file=sys.stderr)
            return 2
        src, name = src.parent, src.name
    if name is None:
        found = sorted(p.name for p in src.iterdir() if original_layout.looks_like_dit(p)) if src.is_dir() else []
        if len(found) != 1:
            print(f"{src}: give --name; original-layout DiT folders found: {', '.join(found) or 'none'}",
                  file=sys.stderr)
            return 2
        name = found[0]
    replacing_demo = dst.exists() and is_random(dst) and not is_random(src / name)
    if dst.exists() and not overwrite and not replacing_demo:
        print(f"{dst} exists: pass --overwrite to replace it", file=sys.stderr)
        return 2
    try:
        convert_original(src, name, dst)
    except original_layout.ConversionError as exc:
        print(f"conversion failed: {exc}", file=sys.stderr)
        return 1
    print(f"converted {name} from {src} (original layout) into {dst} (diffusers layout)"
          + ("; it replaced the random-weight demo that was there" if replacing_demo else ""))
    return 0


# -------------------------------------------------------------------------------- list
@dataclass
class Listed:
    name: str
    kind: str  # "DiT" or "LM"
    role: str  # configured / default / not configured / ...
    state: str
    source: str


def list_models(root: Path, settings: Settings) -> int:
    from entrypoints.bootstrap import DEFAULT_LM

    dits = list(settings.model_names)
    lm = settings.lm_model_path or DEFAULT_LM
    init_llm = (settings.init_llm or "auto").strip().lower()
    on_disk = _names_on_disk(root)
    rows = []
    for name in dict.fromkeys(dits + [n for n, kind in on_disk.items() if kind == "DiT"]):
        role = ("default" if name == dits[0] else "configured") if name in dits else "not configured"
        rows.append(_dit_row(root, name, role))
    lm_role = {"false": "off (ACESTEP_INIT_LLM=false)", "true": "required (ACESTEP_INIT_LLM=true)"}.get(
        init_llm, "auto: loaded when present, a demo beside demo DiTs")
    for name in dict.fromkeys([lm] + [n for n, kind in on_disk.items() if kind == "LM"]):
        rows.append(_lm_row(root, name, lm_role if name == lm else "not configured"))
    print(f"checkpoint dir: {root}")
    for row in rows:
        print(f"  {row.name}  ({row.kind}, {row.role})")
        print(f"      state:  {row.state}")
        print(f"      source: {row.source}")
    return 0


def _names_on_disk(root: Path) -> dict[str, str]:
    """Model folders under the checkpoint dir and its .demo/: name -> "DiT" or "LM"."""
    from engine.lm.folders import is_lm_folder

    found: dict[str, str] = {}
    for folder in (root, root / DEMO_DIR):
        if not folder.is_dir():
            continue
        for p in sorted(folder.iterdir()):
            if p.name.startswith(".") or not p.is_dir():
                continue
            if is_complete(p) or original_layout.looks_like_dit(p):
                found.setdefault(p.name, "DiT")
            elif is_lm_folder(p):
                found.setdefault(p.name, "LM")
    return found


def _dit_row(root: Path, name: str, role: str) -> Listed:
    path = model_dir(root, name)
    source = model_sources.source_for(name)
    layout = local_layout(root, name)
    if model_sources.is_downloading(path):
        state = f"INCOMPLETE download in {path} (`acestep-models download {name}` resumes it)"
    elif layout is None:
        state = f"MISSING (`acestep-models download {name}`)"
    else:
        state = f"present at {path}"
        if layout == "original":
            cache = cache_path(root, name)
            converted = "converted" if is_fresh(cache, source_record(root, name)) else "converted on first load"
            state += f", original layout ({converted}: {cache})"
    if layout is not None and is_random(path):
        state = f"DEMO ({_demo_words(path)}), {state}; `acestep-models download {name}` replaces it"
    elif layout is None and is_complete(demo_model_dir(root, name)):
        state += f"; DEMO served meanwhile from {demo_model_dir(root, name)} ({_demo_words(demo_model_dir(root, name))})"
    return Listed(name, "DiT", role, state, _source_words(path, source, layout is not None and not is_random(path)))


def _lm_row(root: Path, name: str, role: str) -> Listed:
    from engine.lm.folders import is_lm_folder, resolve_lm_folder
    from engine.lm.tiny import is_random_lm

    folder = resolve_lm_folder(root, name)
    base = Path(name).name
    demo = root / DEMO_DIR / base
    path = folder or model_dir(root, base)
    if model_sources.is_downloading(path):
        state = f"INCOMPLETE download in {path} (`acestep-models download {base}` resumes it)"
    elif folder is None:
        state = f"MISSING (`acestep-models download {base}`)" if base in model_sources.KNOWN else \
            f"MISSING (no LM folder at {name} or {model_dir(root, name)})"
    elif is_random_lm(folder):
        state = f"DEMO at {folder}, {_demo_words(folder)}; `acestep-models download {base}` replaces it"
    else:
        state = f"present at {folder}"
    if (folder is None or model_sources.is_downloading(path)) and is_lm_folder(demo):
        state += f"; DEMO used meanwhile from {demo} ({_demo_words(demo)})"
    real = folder is not None and not is_random_lm(folder)
    source = model_sources.source_for(base) if base in model_sources.KNOWN else None
    return Listed(base, "LM", role, state, _source_words(path, source, real))


def _demo_words(path: Path) -> str:
    return str((read_marker(path) or {}).get("notice") or DEMO_NOTICE)


def _source_words(path: Path, source: Optional[model_sources.ModelSource], present: bool) -> str:
    recorded = model_sources.recorded_source(path)
    if present and recorded:
        commits = ", ".join(f"{repo} @ {commit[:12]}" for repo, commit in (recorded.get("commits") or {}).items())
        return f"downloaded from {commits or recorded.get('repo')}"
    if present:
        return f"local files in {path} (not downloaded by acestep-models)"
    if source is None:
        return "no published source known; set ACESTEP_LM_MODEL_PATH to an LM folder"
    return f"{source.describe()}; another: {model_sources.override_hint(source.name)}"


if __name__ == "__main__":
    sys.exit(main())
