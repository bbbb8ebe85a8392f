"""TaskStore on DynamoDB.

Every status transition is a conditional write on (status, attempt), so a task finishes once and a
late or duplicate worker is fenced out. Transitions that change a status also update the counter
item in the same TransactWriteItems, which keeps counts() to one GetItem. See schema.py for the
table layout and the two sparse indexes behind queue_positions() and recent_finished(). A result
too large for an item spills its largest parts to the blob store (result_spill.py); reads put them
back, so no reader outside this adapter knows.
"""
from __future__ import annotations

import json
import logging
import time
from decimal import Decimal
from typing import Any, Optional

from boto3.dynamodb.types import TypeDeserializer, TypeSerializer
from botocore.exceptions import ClientError

from ..records import (
    CANCELLED, FAILED, GIVEN_BACK_STAGE, HEARTBEAT_RETENTION_SECONDS, QUEUED, RUNNING, STATUSES, SUCCEEDED, TERMINAL,
    FailureReason, TaskRecord, TaskResult, WorkerHeartbeat, dump_request, load_request,
)
from ..caller_limits import check_caller
from ..ports import BlobStore, CallerBusy, CallerLimits, QueueFull, TaskStore, WebhookDue
from . import schema as S
from .clients import error_code
from .result_spill import Spilled, discard, restore, spill

log = logging.getLogger(__name__)

_RETRIES = 8  # optimistic-concurrency retries when another writer moved the task between read and write
_QUEUED_MARK = "q"
_ACTIVE = "active"  # a caller's queued + running tasks (owner counter item)
_FINISHED_MARK = "f"
_WEBHOOK_MARK = "w"
_UNSENT_MARK = "u"
_PARTS = "result_parts"  # result part -> the blob key it spilled to (result_spill.py)
# Every worker's beat lives in one item (DynamoDB: 400 KB): one beat is stored in at most this much, so the
# item holds 24 workers at the worst (a usual beat with its devices is 1-2 KB). An outsized beat loses its
# device report first, then the tail of its error text (_bounded_beat).
BEAT_MAX_BYTES = 16 * 1024


# DynamoDB's low-level JSON: an attribute value ({"S": "..."}, {"N": "1"}, {"M": {...}}, ...), and an item
# (also a key, or ExpressionAttributeValues): attribute names to values.
AttributeValue = dict[str, Any]
Item = dict[str, AttributeValue]


class TaskExists(ValueError):
    """create() was given an id that is already in the table."""


class IdempotencyKeyTaken(ValueError):
    """create() was given an Idempotency-Key that another task already holds."""


class _ConditionFailed(Exception):
    """A conditional write was refused. `reasons`: TransactWriteItems' CancellationReasons, one per item
    in order (with the item as it was when asked for ALL_OLD); empty for a single write."""

    def __init__(self, reasons: Optional[list[dict[str, Any]]] = None):
        super().__init__()
        self.reasons = reasons or []

    def failed(self, index: int) -> Optional[dict[str, Any]]:
        """The reason item `index` failed its condition (its "Item" when returned), else None."""
        if index < len(self.reasons) and self.reasons[index].get("Code") == "ConditionalCheckFailed":
            return self.reasons[index]
        return None


_SERIALIZER, _DESERIALIZER = TypeSerializer(), TypeDeserializer()


def _attr(value: Any) -> AttributeValue:
    """A Python value as an attribute value (boto3's serializer; a float goes as the Decimal of its repr, so
    it reads back equal)."""
    attr: AttributeValue = _SERIALIZER.serialize(Decimal(repr(value)) if isinstance(value, float) else value)
    return attr


def _plain(item: Item) -> dict[str, Any]:
    """An item's values as Python values (boto3's deserializer: numbers come back as Decimal)."""
    return {name: _DESERIALIZER.deserialize(attr) for name, attr in item.items()}


def _n(value: float | int) -> AttributeValue:
    return _attr(value)


def _s(value: str) -> AttributeValue:
    return _attr(value)


def _num(item: Item, name: str) -> Optional[float]:
    attr = item.get(name)
    return float(attr["N"]) if attr and "N" in attr else None


def _str(item: Item, name: str) -> Optional[str]:
    attr = item.get(name)
    return attr["S"] if attr and "S" in attr else None


def _task_key(task_id: str) -> Item:
    return {S.PK: _s(S.TASK_PREFIX + task_id)}


def _task_id(item: Item) -> str:
    """The task id of a task item (or of its entry in an index), from its key."""
    key: str = item[S.PK]["S"]
    return key[len(S.TASK_PREFIX):]


def _idempotency_key(key: str) -> Item:
    return {S.PK: _s(S.IDEMPOTENCY_PREFIX + key)}


class DynamoTaskStore(TaskStore):
    def __init__(self, client: Any, table_name: str, ttl_days: int = 7, blobs: Optional[BlobStore] = None):
        self._db = client
        self._table = table_name
        self._ttl_seconds = max(1, int(ttl_days)) * 86400
        self._blobs = blobs  # where result parts too large for an item go (None: a large result is refused)

    # -- reads -------------------------------------------------------------------------------

    def get(self, task_id: str) -> Optional[TaskRecord]:
        item = self._get_item(task_id)
        return self._to_record(item) if item else None

    def get_many(self, task_ids: list[str]) -> dict[str, TaskRecord]:
        out: dict[str, TaskRecord] = {}
        unique = list(dict.fromkeys(task_ids))
        for start in range(0, len(unique), 100):  # BatchGetItem takes at most 100 keys
            keys = [_task_key(t) for t in unique[start:start + 100]]
            request: Optional[dict[str, Any]] = {self._table: {"Keys": keys, "ConsistentRead": True}}
            while request:
                resp = self._db.batch_get_item(RequestItems=request)
                for item in resp.get("Responses", {}).get(self._table, []):
                    rec = self._to_record(item)
                    out[rec.task_id] = rec
                request = resp.get("UnprocessedKeys") or None
                if request:
                    time.sleep(0.05)
        return out

    def _update_if(self, **update: Any) -> bool:
        """One conditional UpdateItem on the table: False when its ConditionExpression does not hold."""
        try:
            self._db.update_item(TableName=self._table, **update)
            return True
        except ClientError as exc:
            if error_code(exc) == "ConditionalCheckFailedException":
                return False
            raise

    def _marked(self, index: str, part: str, mark: str,
                upto: Optional[tuple[str, float]] = None) -> dict[str, Any]:
        """Query arguments for a sparse index's entries: the items whose `part` attribute holds `mark` and,
        with `upto` (sort attribute, bound), whose sort key is at most the bound."""
        condition, names, values = "#p = :p", {"#p": part}, {":p": _s(mark)}
        if upto is not None:
            condition += " AND #s <= :upto"
            names["#s"], values[":upto"] = upto[0], _n(float(upto[1]))
        return dict(TableName=self._table, IndexName=index, KeyConditionExpression=condition,
                    ExpressionAttributeNames=names, ExpressionAttributeValues=values)

    def counts(self) -> dict[str, int]:
        resp = self._db.get_item(TableName=self._table, Key={S.PK: _s(S.COUNTER_KEY)}, ConsistentRead=True)
        item = resp.get("Item", {})
        counts = {status: max(0, int(_num(item, status) or 0)) for status in STATUSES}
        counts["total"] = max(0, int(_num(item, "total") or 0))
        return counts

    def recent_finished(self, limit: int) -> list[TaskRecord]:
        """The finished index gives the newest ids in one Query; one BatchGetItem reads them."""
        if limit <= 0:
            return []
        resp = self._db.query(**self._marked(S.FINISHED_INDEX, S.FINISHED_PART, _FINISHED_MARK),
                              ScanIndexForward=False, Limit=int(limit))  # newest first
        ids = [_task_id(i) for i in resp.get("Items", [])]
        records = self.get_many(ids)
        return [records[t] for t in ids if t in records]

    def queue_positions(self, task_ids: list[str]) -> dict[str, int]:
        """One paginated Query of the queued index (it holds at most ACESTEP_QUEUE_MAXSIZE items)."""
        wanted = set(task_ids)
        if not wanted:
            return {}
        positions: dict[str, int] = {}
        rank = 0
        kwargs = self._marked(S.QUEUED_INDEX, S.QUEUED_PART, _QUEUED_MARK)
        while True:
            resp = self._db.query(**kwargs)  # ascending seq: the queue's order
            for item in resp.get("Items", []):
                rank += 1
                task_id = _task_id(item)
                if task_id in wanted:
                    positions[task_id] = rank
            if not resp.get("LastEvaluatedKey") or len(positions) == len(wanted):
                return positions
            kwargs["ExclusiveStartKey"] = resp["LastEvaluatedKey"]

    def queued_task_ids(self, limit: int) -> list[str]:
        """The queued index in queue order (it holds at most ACESTEP_QUEUE_MAXSIZE items)."""
        ids: list[str] = []
        kwargs = self._marked(S.QUEUED_INDEX, S.QUEUED_PART, _QUEUED_MARK)
        while len(ids) < limit:
            resp = self._db.query(**kwargs)
            ids.extend(_task_id(i) for i in resp.get("Items", []))
            if not resp.get("LastEvaluatedKey"):
                break
            kwargs["ExclusiveStartKey"] = resp["LastEvaluatedKey"]
        return ids[:max(0, int(limit))]

    def record_heartbeat(self, beat: WorkerHeartbeat) -> None:
        """All beats live in one item's map, so a reader gets every worker with one GetItem."""
        update = dict(TableName=self._table, Key={S.PK: _s(S.WORKERS_KEY)},
                      UpdateExpression="SET #b.#w = :beat", ExpressionAttributeNames={"#b": "beats", "#w": beat.worker_id},
                      ExpressionAttributeValues={":beat": _s(_bounded_beat(beat))}, ReturnValues="ALL_NEW")
        try:
            item = self._db.update_item(**update)["Attributes"]
        except ClientError as exc:
            if error_code(exc) != "ValidationException":  # the map does not exist yet
                raise
            self._db.update_item(TableName=self._table, Key={S.PK: _s(S.WORKERS_KEY)},
                                 UpdateExpression="SET beats = if_not_exists(beats, :empty)",
                                 ExpressionAttributeValues={":empty": {"M": {}}})
            item = self._db.update_item(**update)["Attributes"]
        stale = [w for w, b in _beats(item).items() if b.age(time.time()) > HEARTBEAT_RETENTION_SECONDS]
        for worker_id in stale:
            self.forget_heartbeat(worker_id)

    def heartbeats(self) -> list[WorkerHeartbeat]:
        resp = self._db.get_item(TableName=self._table, Key={S.PK: _s(S.WORKERS_KEY)}, ConsistentRead=True)
        now = time.time()
        beats = _beats(resp.get("Item", {})).values()
        return sorted((b for b in beats if b.age(now) <= HEARTBEAT_RETENTION_SECONDS), key=lambda b: b.worker_id)

    def forget_heartbeat(self, worker_id: str) -> None:
        try:
            self._db.update_item(TableName=self._table, Key={S.PK: _s(S.WORKERS_KEY)}, UpdateExpression="REMOVE #b.#w",
                                 ExpressionAttributeNames={"#b": "beats", "#w": worker_id})
        except ClientError as exc:
            if error_code(exc) != "ValidationException":  # no map yet: nothing to forget
                raise

    def get_meta(self, key: str) -> Optional[dict[str, Any]]:
        return self.get_meta_versioned(key)[0]

    def get_meta_versioned(self, key: str) -> tuple[Optional[dict[str, Any]], int]:
        resp = self._db.get_item(TableName=self._table, Key={S.PK: _s(S.META_PREFIX + key)}, ConsistentRead=True)
        item = resp.get("Item", {})
        value = _str(item, "value")
        return (json.loads(value) if value is not None else None), int(_num(item, "version") or 0)

    # -- writes ------------------------------------------------------------------------------

    def put_meta(self, key: str, value: dict[str, Any]) -> None:
        self._db.update_item(TableName=self._table, Key={S.PK: _s(S.META_PREFIX + key)},
                             UpdateExpression="SET #v = :v ADD #ver :one",
                             ExpressionAttributeNames={"#v": "value", "#ver": "version"},
                             ExpressionAttributeValues={":v": _s(json.dumps(value)), ":one": _n(1)})

    def put_meta_if(self, key: str, value: dict[str, Any], version: int) -> bool:
        expected = "attribute_not_exists(#ver)" if version == 0 else "#ver = :expected"
        values = {":v": _s(json.dumps(value)), ":next": _n(version + 1)}
        if version:
            values[":expected"] = _n(version)
        return self._update_if(Key={S.PK: _s(S.META_PREFIX + key)},
                               UpdateExpression="SET #v = :v, #ver = :next", ConditionExpression=expected,
                               ExpressionAttributeNames={"#v": "value", "#ver": "version"},
                               ExpressionAttributeValues=values)

    def create(self, record: TaskRecord, max_queued: Optional[int] = None,
               caller_limits: Optional[CallerLimits] = None) -> None:
        """Insert a new task. With `max_queued`, the counter update in the same transaction is
        conditional on fewer queued tasks than that (QueueFull otherwise): the limit holds exactly
        under concurrent submits, with no count read outside the write."""
        spilled = spill(record.result, record.task_id, record.attempt, self._blobs) if record.result else None
        item = _to_item(record, self._next_seq(), self._ttl_seconds, spilled)
        put = {
            "TableName": self._table,
            "Item": item,
            "ConditionExpression": "attribute_not_exists(#pk)",
            "ExpressionAttributeNames": {"#pk": S.PK},
        }
        count = self._count_move(None, record.status)
        if max_queued is not None:
            count["Update"]["ConditionExpression"] = "attribute_not_exists(#mq) OR #mq < :mq"
            count["Update"]["ExpressionAttributeNames"]["#mq"] = QUEUED
            count["Update"]["ExpressionAttributeValues"][":mq"] = _n(int(max_queued))
            count["Update"]["ReturnValuesOnConditionCheckFailure"] = "ALL_OLD"
        writes = [{"Put": put}, count, *self._owner_moves(record.owner, None, record.status)]
        if record.owner and caller_limits is not None:  # the caller's counter, conditional in the same write
            owner_count = writes[2]["Update"]
            owner_count["ConditionExpression"] = ("(attribute_not_exists(#oq) OR #oq < :oq) AND "
                                                  "(attribute_not_exists(#oa) OR #oa < :oa)")
            owner_count["ExpressionAttributeNames"].update({"#oq": QUEUED, "#oa": _ACTIVE})
            owner_count["ExpressionAttributeValues"].update({":oq": _n(caller_limits.max_queued),
                                                             ":oa": _n(caller_limits.max_active)})
            owner_count["ReturnValuesOnConditionCheckFailure"] = "ALL_OLD"
        if record.idempotency_key:
            writes.append({"Put": {
                "TableName": self._table,
                "Item": {**_idempotency_key(record.idempotency_key), "task_id": _s(record.task_id),
                         S.TTL_ATTR: item[S.TTL_ATTR]},
                "ConditionExpression": "attribute_not_exists(#pk)",
                "ExpressionAttributeNames": {"#pk": S.PK},
            }})
        written = False
        try:
            self._transact(writes)
            written = True
        except _ConditionFailed as refused:
            raise _create_refusal(record, len(writes), refused, max_queued, caller_limits) from None
        finally:
            if not written and spilled:
                discard(spilled.parts, self._blobs)

    def _next_seq(self) -> int:
        """The next queue sequence number; a gap left by a failed create is harmless."""
        return int(self._db.update_item(
            TableName=self._table,
            Key={S.PK: _s(S.COUNTER_KEY)},
            UpdateExpression="ADD #seq :one",
            ExpressionAttributeNames={"#seq": "seq"},
            ExpressionAttributeValues={":one": _n(1)},
            ReturnValues="UPDATED_NEW",
        )["Attributes"]["seq"]["N"])

    def find_by_idempotency_key(self, key: str) -> Optional[TaskRecord]:
        """The task submitted under `key`; a mapping whose task has expired is dropped."""
        owner = self._idempotency_owner(key)
        if owner is None:
            return None
        record = self.get(owner)
        if record is None:
            try:
                self._db.delete_item(TableName=self._table, Key=_idempotency_key(key), ConditionExpression="task_id = :t",
                                     ExpressionAttributeValues={":t": _s(owner)})
            except ClientError as exc:
                if error_code(exc) != "ConditionalCheckFailedException":  # re-used meanwhile: keep it
                    raise
        return record

    def _idempotency_owner(self, key: str) -> Optional[str]:
        resp = self._db.get_item(TableName=self._table, Key=_idempotency_key(key), ConsistentRead=True)
        return _str(resp.get("Item", {}), "task_id")

    def delete(self, task_id: str) -> None:
        for _ in range(_RETRIES):
            item = self._get_item(task_id)
            if not item:
                return
            delete = {"Delete": {"TableName": self._table, "Key": _task_key(task_id), **self._fence(item)}}
            writes = [delete, self._count_move(_str(item, "status"), None),
                      *self._owner_moves(_str(item, "owner"), _str(item, "status"), None)]
            key = _str(item, "idempotency_key")
            if key:
                writes.append({"Delete": {"TableName": self._table, "Key": _idempotency_key(key)}})
            try:
                self._transact(writes)
                return
            except _ConditionFailed:
                continue
        raise RuntimeError(f"delete({task_id}): the task kept changing")

    def claim(self, task_id: str, worker_id: str) -> Optional[TaskRecord]:
        for _ in range(_RETRIES):
            item = self._get_item(task_id)
            status = _str(item, "status") if item else None
            if not item or status not in (QUEUED, RUNNING):
                return None
            attempt = int(_num(item, "attempt") or 0) + 1
            record = self._to_record(item, strict=True)  # StoredRequestInvalid before anything is claimed
            now = time.time()
            update = self._update(
                task_id, item,
                "SET #st = :running, attempt = :attempt, worker_id = :w, started_at = :now, "
                "progress = :zero, stage = :stage REMOVE #qp, #up, #us",  # a delivered task had its message
                {"#st": "status", "#qp": S.QUEUED_PART, "#up": S.UNSENT_PART, "#us": S.UNSENT_SINCE},
                {":running": _s(RUNNING), ":attempt": _n(attempt), ":w": _s(worker_id),
                 ":now": _n(now), ":zero": _n(0), ":stage": _s("running")},
            )
            try:
                # A redelivered running task keeps its status, so only queued -> running moves a count.
                self._transact([update] + ([self._count_move(QUEUED, RUNNING),
                                            *self._owner_moves(_str(item, "owner"), QUEUED, RUNNING)]
                                           if status == QUEUED else []))
            except _ConditionFailed:
                continue  # someone else claimed or finished it first: look again
            record.status, record.attempt, record.worker_id = RUNNING, attempt, worker_id
            record.started_at, record.progress, record.stage = now, 0.0, "running"
            return record
        return None

    def update_progress(self, task_id: str, attempt: int, progress: float, stage: str) -> bool:
        return self._update_running_attempt(task_id, attempt, "SET progress = :p, stage = :stage",
                                            {":p": _n(float(progress)), ":stage": _s(stage)})

    def give_back(self, task_id: str, attempt: int) -> bool:
        return self._update_running_attempt(task_id, attempt,
                                            "ADD given_back :one SET progress = :zero, stage = :stage",
                                            {":one": _n(1), ":zero": _n(0.0), ":stage": _s(GIVEN_BACK_STAGE)})

    def _update_running_attempt(self, task_id: str, attempt: int, expression: str, values: Item) -> bool:
        """Apply `expression` only while `attempt` still runs the task; False when it no longer does."""
        return self._update_if(
            Key=_task_key(task_id),
            UpdateExpression=expression,
            ConditionExpression="#st = :running AND attempt = :a",
            ExpressionAttributeNames={"#st": "status"},
            ExpressionAttributeValues={**values, ":running": _s(RUNNING), ":a": _n(int(attempt))},
        )

    def finish(self, task_id: str, attempt: int, *, result: Optional[TaskResult] = None,
               error: Optional[str] = None, reason: Optional[FailureReason] = None,
               blob_keys: Optional[list[str]] = None) -> bool:
        item = self._get_item(task_id)
        if not item or _str(item, "status") != RUNNING or int(_num(item, "attempt") or 0) != attempt:
            return False
        final = FAILED if error is not None else SUCCEEDED
        now = time.time()
        started = _num(item, "started_at")
        names = {"#st": "status", "#fp": S.FINISHED_PART, "#fa": S.FINISHED_SORT,
                 "#d": S.DURATION_ATTR, "#ttl": S.TTL_ATTR}
        values = {":final": _s(final), ":now": _n(now), ":stage": _s(final),
                  ":f": _s(_FINISHED_MARK), ":exp": _n(int(now) + self._ttl_seconds),
                  ":d": _n(max(0.0, now - started) if started is not None else 0.0)}
        sets = ["#st = :final", "#fa = :now", "stage = :stage", "#fp = :f", "#d = :d", "#ttl = :exp"]
        sets.append("progress = :prog")
        if _str(item, "webhook_url"):
            sets.append(_outbox(names, values))
        values[":prog"] = _n(1.0 if final == SUCCEEDED else 0.0)
        spilled = spill(result, task_id, attempt, self._blobs) if result is not None else None
        if spilled is not None:
            sets.append("#res = :res, #rp = :rp")
            names.update({"#res": "result", "#rp": _PARTS})
            values.update({":res": _s(spilled.stored_json), ":rp": _parts_attr(spilled.parts)})
        if error is not None:
            sets.append("#err = :err")
            names["#err"] = "error"
            values[":err"] = _s(error)
        if reason is not None:
            sets.append("#why = :why")
            names["#why"] = "reason"
            values[":why"] = _s(reason.value)
        new_keys = _new_keys(item, [*(blob_keys or []), *(spilled.parts.values() if spilled else [])])
        if new_keys:
            sets.append("blob_keys = list_append(if_not_exists(blob_keys, :empty), :keys)")
            values[":empty"] = {"L": []}
            values[":keys"] = {"L": [_s(k) for k in new_keys]}
        update = self._update(task_id, item, "SET " + ", ".join(sets), names, values)
        written = False
        try:
            self._transact([update, self._count_move(RUNNING, final),
                            *self._owner_moves(_str(item, "owner"), RUNNING, final)])
            written = True
        except _ConditionFailed:
            pass  # another attempt claimed or finished it in between
        finally:
            if not written and spilled:
                discard(spilled.parts, self._blobs)
        return written

    def fail_unfinished(self, task_id: str, error: str, reason: FailureReason) -> bool:
        return self._end_unfinished(task_id, FAILED, error, reason)

    def cancel(self, task_id: str, reason: str) -> bool:
        return self._end_unfinished(task_id, CANCELLED, reason, FailureReason.CANCELLED)

    def _end_unfinished(self, task_id: str, final: str, error: str, reason: FailureReason) -> bool:
        """queued/running -> `final` whatever attempt holds it; False when unknown or finished."""
        for _ in range(_RETRIES):
            item = self._get_item(task_id)
            status = _str(item, "status") if item else None
            if not item or status is None or status in TERMINAL:
                return False
            now = time.time()
            names = {"#st": "status", "#err": "error", "#why": "reason", "#fa": S.FINISHED_SORT, "#ttl": S.TTL_ATTR,
                     "#qp": S.QUEUED_PART, "#up": S.UNSENT_PART, "#us": S.UNSENT_SINCE}
            values = {":final": _s(final), ":err": _s(error), ":why": _s(reason.value), ":now": _n(now),
                      ":exp": _n(int(now) + self._ttl_seconds)}
            sets = "SET #st = :final, #err = :err, #why = :why, #fa = :now, stage = :final, #ttl = :exp"
            if _str(item, "webhook_url"):
                sets += ", " + _outbox(names, values)
            started = _num(item, "started_at")
            if started is not None:  # it ran: count its run time like any finished task's
                sets += ", #fp = :f, #d = :d"
                names.update({"#fp": S.FINISHED_PART, "#d": S.DURATION_ATTR})
                values.update({":f": _s(_FINISHED_MARK), ":d": _n(max(0.0, now - started))})
            update = self._update(task_id, item, sets + " REMOVE #qp, #up, #us", names, values)
            try:
                self._transact([update, self._count_move(status, final),
                                *self._owner_moves(_str(item, "owner"), status, final)])
                return True
            except _ConditionFailed:
                continue
        return False

    # -- tasks whose message is not known sent (ghosts.py) ---------------------------------------

    def mark_sent(self, task_id: str, since: Optional[float] = None) -> bool:
        """The task's message went out: it leaves the unsent index. `since`: only while it is still the
        mark a reconciler took (take_unsent); False when the mark (or the task) is gone or moved on."""
        condition, values = "attribute_exists(#up)", {}
        if since is not None:
            condition += " AND #us = :since"
            values[":since"] = _n(float(since))
        return self._update_if(Key=_task_key(task_id), UpdateExpression="REMOVE #up, #us",
                               ConditionExpression=condition,
                               ExpressionAttributeNames={"#up": S.UNSENT_PART, "#us": S.UNSENT_SINCE},
                               **({"ExpressionAttributeValues": values} if values else {}))

    def unsent_before(self, cutoff: float, limit: int) -> list[tuple[str, float]]:
        """(task id, marked since) of queued tasks whose message is not known sent since before `cutoff`."""
        resp = self._db.query(**self._marked(S.UNSENT_INDEX, S.UNSENT_PART, _UNSENT_MARK, (S.UNSENT_SINCE, cutoff)),
                              Limit=int(limit))
        return [(_task_id(i), float(_num(i, S.UNSENT_SINCE) or 0.0))
                for i in resp.get("Items", [])]

    def take_unsent(self, task_id: str, seen_since: float, now: float) -> bool:
        """Fence one resend: moves the mark from `seen_since` to `now` while the task is still queued. One
        of several reconcilers that saw the same mark wins; one that dies before its send leaves the mark
        at `now`, found again after the grace period."""
        return self._update_if(Key=_task_key(task_id), UpdateExpression="SET #us = :now",
                               ConditionExpression="#us = :seen AND #st = :queued",
                               ExpressionAttributeNames={"#us": S.UNSENT_SINCE, "#st": "status"},
                               ExpressionAttributeValues={":now": _n(float(now)), ":seen": _n(float(seen_since)),
                                                          ":queued": _s(QUEUED)})

    # -- the webhook outbox --------------------------------------------------------------------

    def webhooks_due(self, now: float, limit: int) -> list[WebhookDue]:
        if limit <= 0:
            return []
        resp = self._db.query(**self._marked(S.WEBHOOK_INDEX, S.WEBHOOK_PART, _WEBHOOK_MARK, (S.WEBHOOK_DUE, now)),
                              Limit=int(limit))
        return [WebhookDue(_task_id(i), _str(i, "webhook_url") or "",
                           int(_num(i, S.WEBHOOK_ATTEMPTS) or 0), float(_num(i, S.WEBHOOK_DUE) or 0.0))
                for i in resp.get("Items", [])]

    def claim_webhook(self, due: WebhookDue, lease_until: float) -> bool:
        # The index is read eventually consistent: an entry another process just took fails the condition.
        return self._outbox_write(due.task_id, due.due_at, f"SET #d = :next ADD {S.WEBHOOK_ATTEMPTS} :one",
                                  {":next": _n(float(lease_until)), ":one": _n(1)})

    def settle_webhook(self, task_id: str, claimed_until: float, retry_at: Optional[float]) -> bool:
        if retry_at is None:
            return self._outbox_write(task_id, claimed_until, "REMOVE #d, #wp", {}, {"#wp": S.WEBHOOK_PART})
        return self._outbox_write(task_id, claimed_until, "SET #d = :next", {":next": _n(float(retry_at))})

    def _outbox_write(self, task_id: str, seen_due: float, expression: str, values: Item,
                      names: Optional[dict[str, str]] = None) -> bool:
        return self._update_if(Key=_task_key(task_id), UpdateExpression=expression,
                               ConditionExpression="#d = :seen",
                               ExpressionAttributeNames={"#d": S.WEBHOOK_DUE, **(names or {})},
                               ExpressionAttributeValues={**values, ":seen": _n(float(seen_due))})

    # -- helpers -----------------------------------------------------------------------------

    def _to_record(self, item: Item, strict: bool = False) -> TaskRecord:
        record = _to_record(item, strict)
        stored = _str(item, "result")
        if stored is not None:
            record.result = restore(stored, _parts(item), self._blobs)
        return record

    def _get_item(self, task_id: str) -> Optional[Item]:
        resp = self._db.get_item(TableName=self._table, Key=_task_key(task_id), ConsistentRead=True)
        item: Optional[Item] = resp.get("Item")
        return item

    def _fence(self, item: Item) -> dict[str, Any]:
        """Condition: the task is still in the (status, attempt) state we read."""
        return {
            "ConditionExpression": "#fst = :fst AND attempt = :fatt",
            "ExpressionAttributeNames": {"#fst": "status"},
            "ExpressionAttributeValues": {":fst": item["status"], ":fatt": _n(int(_num(item, "attempt") or 0))},
        }

    def _update(self, task_id: str, item: Item, expression: str, names: dict[str, str], values: Item) -> dict[str, Any]:
        fence = self._fence(item)
        return {"Update": {
            "TableName": self._table,
            "Key": _task_key(task_id),
            "UpdateExpression": expression,
            "ConditionExpression": fence["ConditionExpression"],
            "ExpressionAttributeNames": {**names, **fence["ExpressionAttributeNames"]},
            "ExpressionAttributeValues": {**values, **fence["ExpressionAttributeValues"]},
        }}

    def _owner_moves(self, owner: Optional[str], src: Optional[str], dst: Optional[str]) -> list[dict[str, Any]]:
        """The caller's counter (queued, running, and active = both) for the same move; [] without an owner."""
        if not owner:
            return []
        deltas = {s: d for s, d in ((QUEUED, 0), (RUNNING, 0), (_ACTIVE, 0))}
        for status, sign in ((src, -1), (dst, +1)):
            if status in (QUEUED, RUNNING):
                deltas[status] += sign
                deltas[_ACTIVE] += sign
        moved = {k: v for k, v in deltas.items() if v}
        if not moved:
            return []
        names = {f"#o{i}": k for i, k in enumerate(moved)}
        values = {f":o{i}": _n(v) for i, v in enumerate(moved.values())}
        return [{"Update": {"TableName": self._table, "Key": {S.PK: _s(S.OWNER_PREFIX + owner)},
                            "UpdateExpression": "ADD " + ", ".join(f"#o{i} :o{i}" for i in range(len(moved))),
                            "ExpressionAttributeNames": names, "ExpressionAttributeValues": values}}]

    def _count_move(self, src: Optional[str], dst: Optional[str]) -> dict[str, Any]:
        """Counter update for a task leaving `src` and entering `dst` (None = not in the table)."""
        deltas: dict[str, int] = {}
        if src:
            deltas[src] = deltas.get(src, 0) - 1
        if dst:
            deltas[dst] = deltas.get(dst, 0) + 1
        if src is None:
            deltas["total"] = 1
        if dst is None:
            deltas["total"] = -1
        names = {f"#c{i}": k for i, k in enumerate(deltas)}
        values = {f":c{i}": _n(v) for i, v in enumerate(deltas.values())}
        expression = "ADD " + ", ".join(f"#c{i} :c{i}" for i in range(len(deltas)))
        return {"Update": {"TableName": self._table, "Key": {S.PK: _s(S.COUNTER_KEY)},
                           "UpdateExpression": expression,
                           "ExpressionAttributeNames": names, "ExpressionAttributeValues": values}}

    def _transact(self, items: list[dict[str, Any]]) -> None:
        for attempt in range(_RETRIES):
            try:
                if len(items) == 1 and "Update" in items[0]:
                    self._db.update_item(**items[0]["Update"])
                else:
                    self._db.transact_write_items(TransactItems=items)
                return
            except ClientError as exc:
                code = error_code(exc)
                if code == "ConditionalCheckFailedException":
                    raise _ConditionFailed() from None
                if code != "TransactionCanceledException":
                    raise
                reasons = exc.response.get("CancellationReasons", [])
                if any(r.get("Code") == "ConditionalCheckFailed" for r in reasons):
                    raise _ConditionFailed(reasons) from None
                # TransactionConflict: another transaction touched the counter item; back off and retry.
                time.sleep(0.02 * (attempt + 1))
        raise RuntimeError("DynamoDB transaction kept conflicting")


def _outbox(names: dict[str, str], values: Item) -> str:
    """The SET clause that puts a task's webhook in the outbox, due now (`:now`, in the same write that ends it)."""
    names.update({"#wp": S.WEBHOOK_PART, "#wd": S.WEBHOOK_DUE})
    values[":wmark"] = _s(_WEBHOOK_MARK)
    return "#wp = :wmark, #wd = :now"


def _beats(item: Item) -> dict[str, WorkerHeartbeat]:
    out = {}
    for worker_id, value in item.get("beats", {}).get("M", {}).items():
        try:
            out[worker_id] = WorkerHeartbeat.model_validate_json(value["S"])
        except (KeyError, ValueError):
            continue  # written by another version: ignore it
    return out


def _bounded_beat(beat: WorkerHeartbeat) -> str:
    """The beat's JSON in at most BEAT_MAX_BYTES (UTF-8): without its devices, then with its error cut, if need be."""
    text = beat.model_dump_json()
    if len(text.encode()) <= BEAT_MAX_BYTES:
        return text
    log.warning("worker %s: its heartbeat is %d bytes: stored without its device report", beat.worker_id, len(text.encode()))
    beat = beat.model_copy(update={"devices": None})
    text = beat.model_dump_json()
    for _ in range(4):  # JSON escapes make a character cost up to 6 bytes: cut again if one cut was not enough
        over = len(text.encode()) - BEAT_MAX_BYTES
        if over <= 0 or not beat.error:
            break
        raw = beat.error.encode()
        beat = beat.model_copy(update={"error": raw[: max(0, len(raw) - over - 3)].decode(errors="ignore") + "…"})
        text = beat.model_dump_json()
    return text


def _new_keys(item: Optional[Item], keys: Optional[list[str]]) -> list[str]:
    have = {k["S"] for k in (item or {}).get("blob_keys", {}).get("L", [])}
    return [k for k in dict.fromkeys(keys or []) if k not in have]


def _parts_attr(parts: dict[str, str]) -> AttributeValue:
    return _attr(dict(parts))


def _parts(item: Item) -> dict[str, str]:
    return {part: v["S"] for part, v in item.get(_PARTS, {}).get("M", {}).items()}


def _to_item(record: TaskRecord, seq: int, ttl_seconds: int, spilled: Optional[Spilled]) -> Item:
    values: dict[str, Any] = {
        S.PK: S.TASK_PREFIX + record.task_id,
        "task_id": record.task_id,
        "request": dump_request(record.request),  # as bounded at submit (task_limits)
        "status": record.status,
        "created_at": float(record.created_at),
        "progress": float(record.progress),
        "stage": record.stage,
        "attempt": int(record.attempt),
        "blob_keys": list(dict.fromkeys(record.blob_keys)),
        S.QUEUED_SORT: seq,
        S.TTL_ATTR: int(record.created_at) + ttl_seconds,
    }
    if record.status == QUEUED:
        values[S.QUEUED_PART] = _QUEUED_MARK
        values[S.UNSENT_PART], values[S.UNSENT_SINCE] = _UNSENT_MARK, float(record.created_at)  # until sent
    optional = {"started_at": record.started_at, "finished_at": record.finished_at}
    for name, value in optional.items():
        if value is not None:
            values[name] = float(value)
    if record.worker_id is not None:
        values["worker_id"] = record.worker_id
    if spilled is not None:
        values["result"] = spilled.stored_json
        values[_PARTS] = dict(spilled.parts)
        values["blob_keys"] += [k for k in spilled.parts.values() if k not in record.blob_keys]
    if record.error is not None:
        values["error"] = record.error
    if record.reason is not None:
        values["reason"] = record.reason.value
    if record.webhook_url is not None:
        values["webhook_url"] = record.webhook_url
    if record.owner is not None:
        values["owner"] = record.owner
    if record.idempotency_key is not None:
        values["idempotency_key"] = record.idempotency_key
        values["request_digest"] = record.request_digest or ""
    return {name: _attr(value) for name, value in values.items()}


def _create_refusal(record: TaskRecord, writes: int, refused: _ConditionFailed, max_queued: Optional[int],
                    caller_limits: Optional[CallerLimits]) -> Exception:
    """What a refused create transaction means (its writes: the task, the counter, the caller's counter when
    limited, the idempotency key last when given). Which condition failed, and the counts it saw, come from
    the refusal itself: a worker's claim between the refusal and a re-read would show a limit no longer
    reached."""
    if refused.failed(0):
        return TaskExists(f"task {record.task_id} already exists")
    if record.idempotency_key and refused.failed(writes - 1):
        return IdempotencyKeyTaken(record.idempotency_key)
    if record.owner and caller_limits is not None and (busy := refused.failed(2)) is not None:
        mine = busy.get("Item", {})
        queued, active = int(_num(mine, QUEUED) or 0), int(_num(mine, _ACTIVE) or 0)
        check_caller(queued, max(0, active - queued), caller_limits)  # raises its own, more precise refusal
        return CallerBusy("you have reached your limit of tasks in flight")
    if max_queued is not None and (full := refused.failed(1)) is not None:
        waiting = int(_num(full.get("Item", {}), QUEUED) or max_queued)
        return QueueFull(f"{waiting} tasks waiting (max {max_queued})")
    return RuntimeError(f"create({record.task_id}): refused without a failed condition")


def _to_record(item: Item, strict: bool = False) -> TaskRecord:
    """The record without its result (DynamoTaskStore._to_record puts that back whole). strict:
    StoredRequestInvalid when its request no longer parses (records.load_request)."""
    values = _plain(item)

    def number(name: str) -> Optional[float]:
        value = values.get(name)
        return float(value) if isinstance(value, Decimal) else None

    def text(name: str) -> Optional[str]:
        value = values.get(name)
        return value if isinstance(value, str) else None

    return TaskRecord(
        task_id=values["task_id"],
        request=load_request(values["task_id"], values["request"], strict),
        status=values["status"],
        created_at=number("created_at") or 0.0,
        started_at=number("started_at"),
        finished_at=number(S.FINISHED_SORT),
        progress=number("progress") or 0.0,
        stage=text("stage") or "",
        attempt=int(number("attempt") or 0),
        given_back=int(number("given_back") or 0),
        worker_id=text("worker_id"),
        error=text("error"),
        reason=FailureReason(why) if (why := text("reason")) else None,
        blob_keys=list(values.get("blob_keys") or []),
        idempotency_key=text("idempotency_key"),
        request_digest=text("request_digest") or None,
        webhook_url=text("webhook_url"),
        owner=text("owner"),
    )
