"""Helpers for the API tests: an app on the embedded backend plus a worker with the sine engine."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional

from fastapi.testclient import TestClient

from handlers.app import create_app
from service.config import Settings
from service.embedded import make_embedded_backend
from service.ports import Backend
from service.worker import Worker
from tests.support_engine import SineEngine

KEY = "sk-test"


@dataclass
class Api:
    settings: Settings
    backend: Backend
    client: TestClient
    engine: SineEngine
    worker: Worker = field(init=False)

    def __post_init__(self):
        self.worker = Worker(self.settings, self.backend, self.engine, worker_id="test-worker")

    def run_worker(self, max_tasks: int = 50) -> int:
        """Process everything queued; returns how many leases were handled."""
        n = 0
        while n < max_tasks and self.worker.run_once(0.01):
            n += 1
        return n

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.settings.api_key}"} if self.settings.api_key else {}

    def submit(self, expect: int = 200, **payload) -> Optional[str]:
        r = self.client.post("/release_task", json=payload, headers=self.headers())
        assert r.status_code == expect, r.text
        return r.json()["data"]["task_id"] if expect == 200 else None

    def stored_request(self, task_id: str) -> dict:
        """The task's request as stored, field by field."""
        return self.backend.store.get(task_id).request.model_dump()

    def query(self, *task_ids: str) -> list[dict]:
        r = self.client.post("/query_result", json={"task_id_list": list(task_ids)}, headers=self.headers())
        assert r.status_code == 200, r.text
        return r.json()["data"]

    def items(self, task_id: str) -> list[dict]:
        entry = self.query(task_id)[0]
        assert isinstance(entry["result"], str)
        return json.loads(entry["result"])


def make_api(settings: Settings, **overrides) -> Api:
    """The overrides go on a validated copy: Settings are frozen, and the caller's object stays as it was."""
    settings = Settings.model_validate({**settings.model_dump(), **overrides})
    backend = make_embedded_backend(settings)
    engine = SineEngine(settings.model_names)
    return Api(settings, backend, TestClient(create_app(settings, backend)), engine)
