"""`acestep-models`: list, download or fake (random-weight) ACE-Step checkpoints in the diffusers layout.

    acestep-models make-tiny DIR [--name NAME] [--seed N]   tiny random-weight demo model at DIR/NAME
    acestep-models list [--checkpoint-dir DIR]              configured + present models, real or demo
    acestep-models download NAME [--checkpoint-dir DIR] [--repo REPO]
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from engine.checkpoints import (
    DEMO_NOTICE,
    build_tiny_checkpoint,
    download_model,
    hf_repo_for,
    is_complete,
    model_dir,
    read_marker,
)
from engine.config import DEFAULT_MODEL, EngineConfig


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
    lst = sub.add_parser("list", help="show configured and present models")
    lst.add_argument("--checkpoint-dir", default=None)
    dl = sub.add_parser("download", help="download a diffusers-format model from the Hugging Face Hub")
    dl.add_argument("name")
    dl.add_argument("--checkpoint-dir", default=None)
    dl.add_argument("--repo", default=None, help="Hub repo id (default: ACESTEP_HF_REPO_<NAME> or "
                    "ACE-Step/<name>-diffusers)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = EngineConfig.from_env()

    if args.command == "make-tiny":
        path = build_tiny_checkpoint(Path(args.dir) / args.name, seed=args.seed, model_name=args.name,
                                     size="full" if args.full_size else "tiny")
        print(f"built {path} ({'full-size' if args.full_size else 'tiny'}, seed {args.seed}) -- {DEMO_NOTICE}")
        return 0
    if args.command == "list":
        root = Path(args.checkpoint_dir or config.checkpoint_dir)
        present = sorted(p.name for p in root.iterdir() if p.is_dir() and is_complete(p)) if root.is_dir() else []
        names = list(dict.fromkeys(config.model_names + present))
        print(f"checkpoint dir: {root}")
        for name in names:
            path = model_dir(root, name)
            configured = "configured" if name in config.model_names else "not configured"
            if not is_complete(path):
                state = f"MISSING (download: acestep-models download {name}; repo {hf_repo_for(name)})"
            elif (read_marker(path) or {}).get("random_weights"):
                state = f"present, DEMO ({DEMO_NOTICE})"
            else:
                state = "present"
            print(f"  {name:32s} {configured:15s} {state}")
        return 0
    if args.command == "download":
        root = Path(args.checkpoint_dir or config.checkpoint_dir)
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
            print("HF_HUB_OFFLINE is set: unset it to download", file=sys.stderr)
            return 2
        path = download_model(args.name, model_dir(root, args.name), args.repo)
        print(f"downloaded {args.name} to {path}")
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
