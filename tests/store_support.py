"""Helpers for tests that reach under a store port (both adapters)."""
from __future__ import annotations


def corrupt_request(backend, task_id: str, stored: str) -> None:
    """Overwrite a task's stored request as an older or foreign writer might have left it."""
    store = backend.store
    if hasattr(store, "db"):  # SQLite
        with store.db.write() as c:
            c.execute("UPDATE tasks SET request = ? WHERE task_id = ?", (stored, task_id))
    else:  # DynamoDB
        from service.aws import schema

        store._db.update_item(TableName=store._table, Key={schema.PK: {"S": schema.TASK_PREFIX + task_id}},
                              UpdateExpression="SET #r = :r", ExpressionAttributeNames={"#r": "request"},
                              ExpressionAttributeValues={":r": {"S": stored}})
