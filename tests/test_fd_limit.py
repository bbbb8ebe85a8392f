"""The API process raises its open-files soft limit to the hard one at start (entrypoints/fd_limit.py),
so slow clients holding connections until their deadline cannot exhaust a 1,024 default."""
from __future__ import annotations

import resource

import pytest

from entrypoints.fd_limit import raise_open_files_limit


@pytest.fixture
def low_soft_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(soft, 256)
    if hard != resource.RLIM_INFINITY and hard <= low:
        pytest.skip(f"hard open-files limit {hard} leaves nothing to raise")
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
    yield low, hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_the_soft_limit_is_raised_to_the_hard_one(low_soft_limit):
    low, hard = low_soft_limit
    now = raise_open_files_limit()
    soft_after, hard_after = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert soft_after == now > low
    assert hard_after == hard
    if hard != resource.RLIM_INFINITY:
        assert soft_after == hard


def test_raising_twice_changes_nothing(low_soft_limit):
    first = raise_open_files_limit()
    assert raise_open_files_limit() == first == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
