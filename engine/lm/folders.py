"""Where a 5 Hz LM folder is, and a random demo one when none can be had (torch-free until a build)."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

log = logging.getLogger("engine.lm")

LM_FILES = ("config.json", "tokenizer.json")
WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


def is_lm_folder(path: Path) -> bool:
    """config.json, tokenizer.json and the weights (one file or a sharded index) are present."""
    return all((path / f).is_file() for f in LM_FILES) and any((path / w).is_file() for w in WEIGHTS)


def resolve_lm_folder(checkpoint_dir: str | os.PathLike, model: str) -> Optional[Path]:
    """`model` as a path to an LM folder, else `<checkpoint_dir>/<model>` (upstream's `checkpoints/acestep-5Hz-lm-*`
    naming); None when neither is a complete LM folder."""
    for candidate in (Path(model), Path(checkpoint_dir) / model):
        if candidate.is_dir() and is_lm_folder(candidate):
            return candidate
    return None


def ensure_demo_lm(checkpoint_dir: str | os.PathLike, model: str, seed: int = 0, **build_options) -> Path:
    """The LM folder for `model`, building a tiny random one there (marked as such) when it is missing
    (build_options go to engine.lm.tiny.build_tiny_lm)."""
    found = resolve_lm_folder(checkpoint_dir, model)
    if found is not None:
        return found
    from engine.lm.tiny import build_tiny_lm

    path = Path(checkpoint_dir) / Path(model).name
    log.warning("5 Hz LM %s not found: building a RANDOM-WEIGHT demo LM at %s (its metadata and codes are noise)",
                model, path)
    return build_tiny_lm(path, seed=seed, **build_options)
