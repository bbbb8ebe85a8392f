"""SnapStart hooks of the Lambda entry point, run the way the runtime runs them.

Lambda's Python runtime imports the handler module, calls the `snapshot_restore_py` registry's
before-snapshot hooks (last registered first), snapshots, and on every restore calls the
after-restore hooks. Here the same registry (the real library) is driven in a fresh interpreter
over moto: priming must answer each path without creating anything, and a restored copy must work
with new AWS sessions and draw different random numbers than another copy of the same snapshot.
"""
from __future__ import annotations

import sys

import pytest

from tests.aws_support import run_lambda_probe

_PROBE = """
import random
import snapshot_restore_py as runtime
from entrypoints import snapstart
from service.aws import clients

report.update(before=len(runtime.get_before_snapshot()), after=len(runtime.get_after_restore()))
for func, args, kwargs in reversed(runtime.get_before_snapshot()):
    func(*args, **kwargs)
report["statuses"] = snapstart.prime(lh.handler, "snap-key")
report["built_before_snapshot"] = sum(c._client is not None for c in clients._made)

import boto3
ddb = boto3.client("dynamodb", region_name="us-east-1")
report["items_after_priming"] = ddb.scan(TableName=s.table_name)["Count"]

snapshot = random.getstate()
draws = []
for _ in range(2):  # two restored copies of one snapshot
    random.setstate(snapshot)
    for func, args, kwargs in runtime.get_after_restore():
        func(*args, **kwargs)
    draws.append(random.random())
report["draws_differ"] = draws[0] != draws[1]
report["built_after_restore"] = sum(c._client is not None for c in clients._made)

submit = snapstart.api_gateway_event("POST", "/release_task", {"prompt": "after restore"}, "snap-key")
answer = lh.handler(submit, None)
report["submit_status"] = answer["statusCode"]
report["task_id"] = json.loads(answer["body"])["data"]["task_id"]
poll = snapstart.api_gateway_event("POST", "/query_result", {"task_id_list": [report["task_id"]]}, "snap-key")
report["queued"] = [entry["status"] for entry in json.loads(lh.handler(poll, None)["body"])["data"]]
"""


def test_snapstart_hooks_prime_without_writing_and_restored_copies_are_independent():
    pytest.importorskip("snapshot_restore_py")
    report = run_lambda_probe(_PROBE, {"ACESTEP_API_KEY": "snap-key"})
    assert report["before"] == 1 and report["after"] == 1, report
    assert report["statuses"] == {"/health": 200, "/v1/models": 200, "/release_task": 400,
                                  "/query_result": 200, "/openrouter/health": 200}, report
    assert report["built_before_snapshot"] >= 3, report  # DynamoDB, SQS and S3 at least
    assert report["items_after_priming"] == 0, report  # priming wrote nothing
    assert report["draws_differ"], report
    assert report["built_after_restore"] == 0, report
    assert report["submit_status"] == 200 and report["task_id"], report
    assert report["queued"] == [0], report  # the restored copy wrote and reads through its new session


def test_without_the_snapstart_runtime_nothing_is_registered(monkeypatch):
    from entrypoints import snapstart

    monkeypatch.setitem(sys.modules, "snapshot_restore_py", None)  # as in the container image
    assert snapstart.install(lambda event, context: {"statusCode": 200}, "") is False
