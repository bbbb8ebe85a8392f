"""Records every AWS SDK operation a process prepares -- calls and presigned URLs alike -- as one JSON
line in the file named by $IAM_CALL_LOG (tests/iam_support.py turns them into IAM actions + ARNs).

    python -m tests.iam_recorder uvicorn --factory entrypoints.bootstrap:app_from_env ...

runs a module as `python -m` would, with the recorder installed; `install()` does it in-process (the
e2e's fork server, before it forks workers). It hooks botocore's `before-parameter-build` event, which
fires once per API call and once per generate_presigned_url, in every session created afterwards.
Only the parameters that name a resource are kept.
"""
from __future__ import annotations

import json
import os
import runpy
import sys

LOG_ENV = "IAM_CALL_LOG"
_NAMING = ("Bucket", "Key", "TableName", "IndexName", "QueueUrl", "SecretId", "Name", "cluster", "service",
           "services", "tasks")


def _resource_params(params: dict) -> dict:
    kept = {k: params[k] for k in _NAMING if k in params}
    if "RequestItems" in params:  # BatchGetItem / BatchWriteItem
        kept["Tables"] = sorted(params["RequestItems"])
    if "TransactItems" in params:  # [(Put|Update|Delete|ConditionCheck|Get, table)]
        kept["Items"] = [(kind, body["TableName"]) for item in params["TransactItems"] for kind, body in item.items()]
    return kept


def record(params: dict, model, context=None, **_ignored) -> None:
    path = os.environ.get(LOG_ENV)
    if not path:
        return
    line = {"service": model.service_model.endpoint_prefix, "operation": model.name,
            "params": _resource_params(params), "presigned": bool((context or {}).get("is_presign_request"))}
    with open(path, "a") as log:  # one write of one line: lines from threads and processes do not mix
        log.write(json.dumps(line) + "\n")


def install() -> None:
    """Every botocore session created from now on records its operations."""
    import botocore.handlers

    entry = ("before-parameter-build", record)
    if entry not in botocore.handlers.BUILTIN_HANDLERS:
        botocore.handlers.BUILTIN_HANDLERS.append(entry)


if __name__ == "__main__":
    install()
    module, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
