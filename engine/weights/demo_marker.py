"""The demo marker: a file in a model folder saying its weights are random, so it is labelled as a demo
wherever it shows and never taken for the real model.

Its own module so that the converters and the checkpoint resolver can all read it without importing each other.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

DEMO_MARKER = "acestep_demo.json"


def is_random(path: Path) -> bool:
    """The folder's marker says its weights are random (a demo)."""
    return bool((read_marker(path) or {}).get("random_weights"))


def read_marker(path: Path) -> Optional[dict]:
    marker = path / DEMO_MARKER
    if not marker.is_file():
        return None
    try:
        return json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return {"random_weights": True}  # a damaged marker still means "not real weights"


__all__ = ["DEMO_MARKER", "is_random", "read_marker"]
