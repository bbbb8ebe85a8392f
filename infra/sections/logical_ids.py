"""Sections: constructs that group a stack's resources but stay out of their logical ids.

CloudFormation identifies a resource by its logical id, which CDK derives from the construct path.
Moving a resource under a new construct would change that id, and a deploy would replace the resource
(a new, empty table or bucket). A `Section`'s id is therefore dropped from the path before the id is
made, by `logical_id` below (what `Stack.allocateLogicalId` does, minus the sections), so a resource
keeps the id it had when it sat directly in the stack. tests/test_infra.py pins the stateful ones.
"""
from __future__ import annotations

import hashlib
import re
from typing import Sequence

from aws_cdk import CfnElement, Stack
from constructs import Construct

from infra.sections import SECTIONS

# CDK's rules for a logical id from path components (aws-cdk-lib core, private/uniqueid.ts).
_HIDDEN_ID = "Default"  # never part of an id
_HIDDEN_FROM_HUMAN_ID = "Resource"  # part of the hash only
_MAX_ID_LEN = 255
_MAX_HUMAN_LEN = 240
_HASH_LEN = 8


class Section(Construct):
    """A group of resources with one job; its id is not part of its resources' logical ids."""

    def __init__(self, scope: Construct, construct_id: str):
        if construct_id not in SECTIONS:  # tests/iam_support.py reads paths by this list
            raise ValueError(f"section id {construct_id!r} is not in infra.sections.SECTIONS")
        super().__init__(scope, construct_id)


def _alphanumeric(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]", "", text)


def unique_id(components: Sequence[str]) -> str:
    """CDK's makeUniqueId: a single component as it is; otherwise the readable path plus a hash of it."""
    parts = [c for c in components if c != _HIDDEN_ID]
    if not parts:
        raise ValueError("a logical id needs at least one path component")
    if len(parts) == 1 and len(_alphanumeric(parts[0])) <= _MAX_ID_LEN:
        return _alphanumeric(parts[0])
    digest = hashlib.md5("/".join(parts).encode()).hexdigest()[:_HASH_LEN].upper()
    human: list[str] = []
    for part in parts:  # CDK drops a component the previous one ends with ("Role/Role" reads "Role")
        if not human or not human[-1].endswith(part):
            human.append(part)
    readable = "".join(_alphanumeric(p) for p in human if p != _HIDDEN_FROM_HUMAN_ID)
    return readable[:_MAX_HUMAN_LEN] + digest


class LogicalIds:
    """Allocates a stack's logical ids without its sections, and refuses two paths one id."""

    def __init__(self, stack: Stack):
        self._stack = stack
        self._owners: dict[str, str] = {}

    def allocate(self, element: CfnElement) -> str:
        scopes = element.node.scopes
        below = scopes[next(i for i, s in enumerate(scopes) if s is self._stack) + 1:]
        logical_id = unique_id([s.node.id for s in below if not isinstance(s, Section)])
        owner = self._owners.setdefault(logical_id, element.node.path)
        if owner != element.node.path:
            raise ValueError(f"{element.node.path} and {owner} would share the logical id {logical_id}: "
                             "rename one (sections do not separate ids)")
        return logical_id
