"""DynamoDB task store specifics (moto in-process): fencing under races, counters, TTL, no Scans."""
from __future__ import annotations

import time

import pytest

from service.aws import schema
from service.blob_keys import result_part_key
from service.ports import FAILED, QUEUED, RUNNING, SUCCEEDED, TaskRecord
from service.records import TaskResult
from tests.aws_support import aws_backend
from engine.request import GenerationRequest
from service.records import FailureReason


@pytest.fixture
def aws(tmp_path):
    with aws_backend(tmp_path, task_ttl_days=3) as backend:
        yield backend


def _new(backend, task_id):
    backend.store.create(TaskRecord(task_id=task_id, request=GenerationRequest(prompt=task_id)))


def _raw_item(backend, task_id):
    return backend.store._db.get_item(TableName=backend.settings.table_name,
                                      Key={schema.PK: {"S": schema.TASK_PREFIX + task_id}})["Item"]


def _rival(backend):
    """A second store on its own client: another API/worker process writing the same table."""
    from service.aws.clients import aws_client
    from service.aws.dynamo_store import DynamoTaskStore

    return DynamoTaskStore(aws_client("dynamodb", backend.settings), backend.settings.table_name)


def _race(backend, operation, rival_write):
    """Run `rival_write` once, right before the store's next `operation` call goes out: the window
    between the store's read and its conditional write. (moto's in-process DynamoDB is not
    thread-safe, so real threads would test moto rather than the conditions.)"""
    fired = []

    def hook(**kwargs):
        if not fired:
            fired.append(rival_write())

    backend.store._db.meta.events.register(f"before-call.dynamodb.{operation}", hook)
    return fired


def test_create_refuses_an_existing_id(aws):
    _new(aws, "t1")
    with pytest.raises(ValueError):
        _new(aws, "t1")
    assert aws.store.counts()["total"] == 1  # the refused create moved no counter


def test_a_claim_that_loses_the_race_rereads_and_takes_the_next_attempt(aws):
    _new(aws, "t1")
    rival = _race(aws, "TransactWriteItems", lambda: _rival(aws).claim("t1", "rival").attempt)
    assert aws.store.claim("t1", "me").attempt == 2  # its queued->running write failed; it re-claimed as a redelivery
    assert rival == [1]
    rec = aws.store.get("t1")
    assert rec.attempt == 2 and rec.worker_id == "me"
    counts = aws.store.counts()
    assert counts["queued"] == 0 and counts["running"] == 1  # the lost transaction moved no counter


def test_duplicate_finish_in_the_race_window_succeeds_once(aws):
    _new(aws, "t1")
    attempt = aws.store.claim("t1", "w1").attempt
    rival = _race(aws, "TransactWriteItems",
                  lambda: _rival(aws).finish("t1", attempt, result=TaskResult(dit_model="rival")))
    # Both saw status=running with this attempt; only the first conditional write may land.
    assert aws.store.finish("t1", attempt, result=TaskResult(dit_model="me")) is False
    assert rival == [True]
    rec = aws.store.get("t1")
    assert rec.status == SUCCEEDED and rec.result.dit_model == "rival"
    assert aws.store.counts() == {"queued": 0, "running": 0, "succeeded": 1, "failed": 0, "cancelled": 0, "total": 1}


def test_stale_attempt_cannot_finish_after_a_redelivery(aws):
    _new(aws, "t1")
    stale = aws.store.claim("t1", "w1").attempt
    rival = _race(aws, "TransactWriteItems", lambda: _rival(aws).claim("t1", "w2").attempt)
    assert aws.store.finish("t1", stale, result=TaskResult(dit_model="late")) is False  # redelivered mid-finish
    assert rival == [2]
    rec = aws.store.get("t1")
    assert rec.status == RUNNING and rec.attempt == 2 and rec.result is None


def test_fail_unfinished_racing_a_finish_leaves_the_finish(aws):
    _new(aws, "t1")
    attempt = aws.store.claim("t1", "w1").attempt
    _race(aws, "TransactWriteItems", lambda: _rival(aws).finish("t1", attempt, result=TaskResult()))
    assert aws.store.fail_unfinished("t1", "dead-lettered", FailureReason.DEAD_LETTERED) is False  # re-read: already finished
    assert aws.store.get("t1").status == SUCCEEDED
    assert aws.store.counts()["failed"] == 0


def test_late_duplicate_cannot_overwrite_a_failure(aws):
    _new(aws, "t1")
    a = aws.store.claim("t1", "w1").attempt
    assert aws.store.fail_unfinished("t1", "dead-lettered after 3 deliveries", FailureReason.DEAD_LETTERED)
    assert aws.store.finish("t1", a, result=TaskResult(dit_model="late")) is False
    assert aws.store.update_progress("t1", a, 0.9, "late") is False
    rec = aws.store.get("t1")
    assert rec.status == FAILED and rec.result is None and rec.error.startswith("dead-lettered")
    assert aws.store.counts()["failed"] == 1 and aws.store.counts()["running"] == 0


def test_ttl_is_enabled_and_set_on_create_and_finish(aws):
    ttl = aws.store._db.describe_time_to_live(TableName=aws.settings.table_name)["TimeToLiveDescription"]
    assert ttl["TimeToLiveStatus"] == "ENABLED" and ttl["AttributeName"] == schema.TTL_ATTR
    _new(aws, "t1")
    created = aws.store.get("t1").created_at
    assert int(_raw_item(aws, "t1")[schema.TTL_ATTR]["N"]) == pytest.approx(created + 3 * 86400, abs=2)
    a = aws.store.claim("t1", "w").attempt
    aws.store.finish("t1", a, result=TaskResult())
    finished = aws.store.get("t1").finished_at
    assert int(_raw_item(aws, "t1")[schema.TTL_ATTR]["N"]) == pytest.approx(finished + 3 * 86400, abs=2)


def test_counters_match_the_table_after_mixed_transitions(aws):
    for i in range(8):
        _new(aws, f"t{i}")
    a = [aws.store.claim(f"t{i}", "w").attempt for i in range(5)]
    aws.store.finish("t0", a[0], result=TaskResult())
    aws.store.finish("t1", a[1], error="bad")
    aws.store.fail_unfinished("t2", "dead", FailureReason.DEAD_LETTERED)
    aws.store.fail_unfinished("t5", "dead", FailureReason.DEAD_LETTERED)  # still queued
    aws.store.delete("t6")
    aws.store.claim("t3", "w2").attempt  # redelivery: no count moves
    aws.store.cancel("t4", "cancelled")  # running -> cancelled
    items = aws.store._db.scan(TableName=aws.settings.table_name)["Items"]  # the test may scan; the store may not
    actual = {s: 0 for s in (QUEUED, RUNNING, SUCCEEDED, FAILED, "cancelled")}
    for item in items:
        if item[schema.PK]["S"].startswith(schema.TASK_PREFIX):
            actual[item["status"]["S"]] += 1
    assert aws.store.counts() == {**actual, "total": 7}
    assert actual == {QUEUED: 1, RUNNING: 1, SUCCEEDED: 1, FAILED: 3, "cancelled": 1}


def test_position_counts_and_durations_never_scan(aws):
    calls: list[str] = []
    aws.store._db.meta.events.register("before-call.dynamodb", lambda model, **kw: calls.append(model.name))
    for i in range(30):
        _new(aws, f"t{i}")
    for i in range(5):
        aws.store.finish(f"t{i}", aws.store.claim(f"t{i}", "w").attempt, result=TaskResult())
    calls.clear()
    assert aws.store.queue_positions([f"t{i}" for i in range(30)]) == {f"t{i}": i - 4 for i in range(5, 30)}
    assert calls == ["Query"]  # thirty ids, one query on the sparse index
    calls.clear()
    assert aws.store.counts()["queued"] == 25
    assert calls == ["GetItem"]
    calls.clear()
    recent = aws.store.recent_finished(3)
    assert len(recent) == 3 and calls == ["Query", "BatchGetItem"]
    assert "Scan" not in calls


def test_recent_finished_are_newest_first(aws):
    for task_id, run_for in (("slow", 0.3), ("fast", 0.0)):
        _new(aws, task_id)
        a = aws.store.claim(task_id, "w").attempt
        time.sleep(run_for)
        aws.store.finish(task_id, a, result=TaskResult())
    newest, older = aws.store.recent_finished(2)
    assert newest.task_id == "fast" and older.task_id == "slow"
    assert newest.finished_at - newest.started_at < 0.2 <= older.finished_at - older.started_at


def test_blob_keys_merge_without_duplicates(aws):
    aws.store.create(TaskRecord(task_id="t1", request=GenerationRequest(), blob_keys=["uploads/t1/src.wav"]))
    a = aws.store.claim("t1", "w").attempt
    aws.store.finish("t1", a, result=TaskResult(), blob_keys=["outputs/t1/1-0.mp3", "uploads/t1/src.wav"])
    assert aws.store.get("t1").blob_keys == ["uploads/t1/src.wav", "outputs/t1/1-0.mp3"]


def test_idempotency_key_is_claimed_in_the_create_transaction(aws):
    """Two creates that both passed the intake's pre-check: the key's conditional put lets one through."""
    from service.aws.dynamo_store import IdempotencyKeyTaken

    aws.store.create(TaskRecord(task_id="a", request=GenerationRequest(), idempotency_key="k", request_digest="d"))
    with pytest.raises(IdempotencyKeyTaken):
        aws.store.create(TaskRecord(task_id="b", request=GenerationRequest(), idempotency_key="k", request_digest="d"))
    assert aws.store.get("b") is None and aws.store.counts()["total"] == 1
    assert aws.store.find_by_idempotency_key("k").task_id == "a"
    aws.store.delete("a")  # the mapping goes with its task
    assert aws.store.find_by_idempotency_key("k") is None
    aws.store.create(TaskRecord(task_id="c", request=GenerationRequest(), idempotency_key="k", request_digest="d"))
    assert aws.store.find_by_idempotency_key("k").task_id == "c"


def _large_result(tag: str) -> TaskResult:
    """A result over DynamoDB's 400 KB item limit."""
    return TaskResult(dit_model=tag, metas={"genres": "ambient " * 20000},
                      generation_info={"notes": [tag + " " + "🎼" * 250] * 300})


def test_a_large_result_fenced_out_in_the_race_window_leaves_no_parts(aws):
    _new(aws, "t1")
    first = aws.store.claim("t1", "w1").attempt
    rival = _race(aws, "TransactWriteItems", lambda: _rival(aws).claim("t1", "w2").attempt)
    assert aws.store.finish("t1", first, result=_large_result("late")) is False  # redelivered meanwhile
    assert rival == [first + 1]
    late = [result_part_key("t1", first, part) for part in ("generation_info", "metas")]
    assert [aws.blobs.size(k) for k in late] == [None, None]  # what it spilled went with its write
    assert aws.store.finish("t1", first + 1, result=_large_result("winner")) is True
    rec = aws.store.get("t1")
    assert rec.result == _large_result("winner") and not set(late) & set(rec.blob_keys)


def _after_failed(backend, operation, rival_write):
    """Run `rival_write` once, right after the store's next `operation` call came back refused: the
    window between a conditional write's failure and the store's reading why."""
    fired = []

    def hook(http_response, **kwargs):
        if not fired and http_response.status_code >= 300:
            fired.append(rival_write())

    backend.store._db.meta.events.register(f"after-call.dynamodb.{operation}", hook)
    return fired


@pytest.mark.parametrize("limit", ["queue", "caller"])
def test_a_submit_refused_at_a_limit_while_a_worker_claims_is_a_refusal(aws, limit):
    """Issue 21.9: the limit's condition failed, then a worker claimed a task before the store re-read the
    counts, which no longer showed the limit reached: the create answered TaskExists (a 500)."""
    from service.ports import CallerBusy, CallerLimits, QueueFull

    limits = CallerLimits(max_queued=1, max_active=5) if limit == "caller" else None
    first = TaskRecord(task_id="a", request=GenerationRequest(), owner="key:me")
    aws.store.create(first, max_queued=1 if limit == "queue" else None, caller_limits=limits)
    claimed = _after_failed(aws, "TransactWriteItems", lambda: _rival(aws).claim("a", "w1").attempt)
    with pytest.raises(QueueFull if limit == "queue" else CallerBusy):
        aws.store.create(TaskRecord(task_id="b", request=GenerationRequest(), owner="key:me"),
                         max_queued=1 if limit == "queue" else None, caller_limits=limits)
    assert claimed == [1] and aws.store.get("b") is None
    assert aws.store.counts()["queued"] == 0 and aws.store.counts()["total"] == 1
