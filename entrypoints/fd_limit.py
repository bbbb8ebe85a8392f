"""Let the API process hold as many connections as the system allows.

Each open connection is a file descriptor. Many systems start a process with a soft limit of
1,024 while the hard limit is far higher: a few hundred slow clients (bodies sent a byte a second
are closed only at the body deadline) plus the worker pipes and SQLite files would then exhaust it,
and the server could accept no new connection, /health included. Raising the soft limit to the
hard one is what any unprivileged process may do.
"""
from __future__ import annotations

import logging
import resource

log = logging.getLogger("acestep.api")


def raise_open_files_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft >= hard:
        return soft
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:  # e.g. a kernel cap (nr_open) below an unlimited hard limit
        log.warning("open-files limit stays at %d: %s", soft, exc)
        return soft
    if target != soft:
        log.info("open-files limit raised from %d to %d", soft, target)
    return target


__all__ = ["raise_open_files_limit"]
