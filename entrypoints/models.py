"""`acestep-models`: list, download, convert or fake (random-weight) ACE-Step checkpoints.

    acestep-models make-tiny DIR [--name NAME] [--seed N] [--layout diffusers|original]
        tiny random-weight demo model at DIR/NAME (original layout: also DIR/vae, DIR/Qwen3-Embedding-0.6B)
    acestep-models convert SRC DST [--name NAME] [--overwrite]
        original layout (SRC/NAME, SRC/vae, SRC/Qwen3-Embedding-0.6B) -> diffusers layout at DST
    acestep-models list [--checkpoint-dir DIR]              configured + present models, real or demo
    acestep-models download NAME [--checkpoint-dir DIR]     from its published source, verified, pinned
    acestep-models publish NAME --bucket BUCKET [--checkpoint-dir DIR]
        copy the (converted) model to s3://BUCKET/models/NAME/ for AWS workers (ACESTEP_MODELS_MIRROR)
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from engine import model_sources, original_layout
from engine.checkpoints import (
    DEMO_NOTICE,
    LAYOUTS,
    build_tiny_checkpoint,
    download_model,
    is_complete,
    local_layout,
    model_dir,
    read_marker,
)
from engine.config import DEFAULT_MODEL, EngineConfig
from engine.converted_cache import cache_path, is_fresh, source_record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="acestep-models", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
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
    conv = sub.add_parser("convert", help="convert an original-layout model to the diffusers layout")
    conv.add_argument("src", help="folder holding NAME/, vae/ and Qwen3-Embedding-0.6B/ (or the NAME/ folder itself)")
    conv.add_argument("dst", help="the diffusers-layout model folder to write (atomically)")
    conv.add_argument("--name", default=None, help="the DiT folder under SRC (default: the only one there)")
    conv.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    lst = sub.add_parser("list", help="show configured and present models")
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
    config = EngineConfig.from_env()

    if args.command == "make-tiny":
        path = build_tiny_checkpoint(Path(args.dir) / args.name, seed=args.seed, model_name=args.name,
                                     size="full" if args.full_size else "tiny", layout=args.layout)
        print(f"built {path} ({'full-size' if args.full_size else 'tiny'}, {args.layout} layout, seed {args.seed})"
              f" -- {DEMO_NOTICE}")
        return 0
    if args.command == "convert":
        return convert(Path(args.src), Path(args.dst), args.name, args.overwrite)
    if args.command == "list":
        root = Path(args.checkpoint_dir or config.checkpoint_dir)
        present = sorted(p.name for p in root.iterdir() if not p.name.startswith(".") and (
            is_complete(p) or original_layout.looks_like_dit(p))) if root.is_dir() else []
        names = list(dict.fromkeys(config.model_names + present))
        print(f"checkpoint dir: {root}")
        for name in names:
            configured = "configured" if name in config.model_names else "not configured"
            print(f"  {name:32s} {configured:15s} {_state(root, name)}")
        return 0
    if args.command == "download":
        root = Path(args.checkpoint_dir or config.checkpoint_dir)
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
            print("HF_HUB_OFFLINE is set: unset it to download", file=sys.stderr)
            return 2
        path = download_model(args.name, root)
        print(f"downloaded {args.name} to {path} ({model_sources.source_for(args.name).describe()})")
        return 0
    if args.command == "publish":
        return publish(Path(args.checkpoint_dir or config.checkpoint_dir), args.name, args.bucket)
    return 1


def publish(root: Path, name: str, bucket: str) -> int:
    """Publish the diffusers layout the engine loads: the model itself, or its conversion."""
    import boto3

    from engine.checkpoints import resolve_model
    from service.aws.model_mirror import publish as publish_to_s3

    config = EngineConfig(checkpoint_dir=str(root), model_names=[name], allow_download=False)
    folder = resolve_model(config, name)  # converts an original-layout model first
    size = publish_to_s3(boto3.client("s3"), bucket, name, folder)
    print(f"published {name} from {folder} to s3://{bucket}/models/{name}/ ({size / 1e9:.2f} GB)")
    return 0


def convert(src: Path, dst: Path, name: str | None, overwrite: bool) -> int:
    from engine.convert import convert_original

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
    if dst.exists() and not overwrite:
        print(f"{dst} exists: pass --overwrite to replace it", file=sys.stderr)
        return 2
    try:
        convert_original(src, name, dst)
    except original_layout.ConversionError as exc:
        print(f"conversion failed: {exc}", file=sys.stderr)
        return 1
    print(f"converted {name} from {src} (original layout) into {dst} (diffusers layout)")
    return 0


def _state(root: Path, name: str) -> str:
    layout = local_layout(root, name)
    if layout is None:
        return f"MISSING (download: acestep-models download {name}; from {model_sources.source_for(name).describe()})"
    state = "present"
    if layout == "original":
        cache = cache_path(root, name)
        converted = "converted" if is_fresh(cache, source_record(root, name)) else "converted on first load"
        state += f", original layout ({converted}: {cache})"
    if (read_marker(model_dir(root, name)) or {}).get("random_weights"):
        state += f", DEMO ({DEMO_NOTICE})"
    return state


if __name__ == "__main__":
    sys.exit(main())
