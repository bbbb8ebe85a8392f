"""Reading the Dockerfile as Docker does (dockerfile-parse): its stages, their instructions and COPY sources.
Shared by the Dockerfile and compose tests."""
from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path

from dockerfile_parse import DockerfileParser


@dataclass(frozen=True)
class Copy:
    stage: str
    instruction: str
    sources: tuple[str, ...]
    from_context: bool  # False for COPY --from=<stage or image>


def parse_dockerfile(path: Path) -> DockerfileParser:
    return DockerfileParser(str(path), cache_content=True)


def stages(parser: DockerfileParser) -> dict[str, str]:
    """Stage name -> base image (as written, ARGs unexpanded)."""
    found = {}
    for item in parser.structure:
        if item["instruction"] == "FROM":
            words = item["value"].split()
            if len(words) == 3 and words[1].lower() == "as":
                found[words[2]] = words[0]
    return found


def copies(parser: DockerfileParser) -> list[Copy]:
    out, stage = [], ""
    for item in parser.structure:
        if item["instruction"] == "FROM":
            words = item["value"].split()
            stage = words[2] if len(words) == 3 else words[0]
        elif item["instruction"] in ("COPY", "ADD"):
            words = shlex.split(item["value"])
            flags = [w for w in words if w.startswith("--")]
            rest = [w for w in words if not w.startswith("--")]
            if rest and rest[0].startswith("["):  # JSON form
                rest = json.loads(" ".join(rest))
            from_context = not any(f.startswith("--from=") for f in flags)
            out.append(Copy(stage, item["instruction"], tuple(rest[:-1]), from_context))
    return out


def stage_instructions(parser: DockerfileParser, stage: str) -> list[dict]:
    inside, found = False, []
    for item in parser.structure:
        if item["instruction"] == "FROM":
            inside = item["value"].split()[-1] == stage
        elif inside:
            found.append(item)
    return found
