"""The submit gate remembers a confirmed "workers can serve" for a moment, and nothing else."""
from __future__ import annotations

import time

from handlers.submit_gate import SubmitGate
from service.config import Settings
from service.embedded import make_embedded_backend
from service.records import MODELS_META_KEY, ModelsMeta, WorkerHeartbeat


def beat(worker_id: str, **fields) -> WorkerHeartbeat:
    now = time.time()
    return WorkerHeartbeat(worker_id=worker_id, started_at=now, beat_at=now, **fields)


def test_a_healthy_worker_is_remembered_a_refusal_is_not(tmp_path):
    backend = make_embedded_backend(Settings(data_dir=str(tmp_path)))
    gate = SubmitGate(backend, accept_seconds=3600)
    reads = [0]
    original = backend.store.heartbeats

    def heartbeats():
        reads[0] += 1
        return original()

    backend.store.heartbeats = heartbeats  # type: ignore[method-assign]
    assert gate.unservable_reason() is None  # no worker yet: accepted but not remembered
    backend.store.record_heartbeat(beat("gpu-1", state="failed", error="no weights"))
    assert "gpu-1: no weights" in (gate.unservable_reason() or "")  # seen at once
    assert "gpu-1: no weights" in (gate.unservable_reason() or "")  # and again: refusals are re-read
    backend.store.record_heartbeat(beat("gpu-2"))
    assert gate.unservable_reason() is None
    seen = reads[0]
    assert gate.unservable_reason() is None and reads[0] == seen  # remembered: no read


def test_an_lm_reported_by_a_worker_is_remembered_none_reported_is_not(tmp_path):
    backend = make_embedded_backend(Settings(data_dir=str(tmp_path)))
    gate = SubmitGate(backend, accept_seconds=3600)
    assert gate.lm_served()  # nobody reported: accept, and look again next time
    backend.store.put_meta(MODELS_META_KEY, ModelsMeta(lm_model="none").model_dump())
    assert not gate.lm_served()
    backend.store.put_meta(MODELS_META_KEY, ModelsMeta(lm_model="acestep-5Hz-lm-1.7B").model_dump())
    assert gate.lm_served()
    backend.store.put_meta(MODELS_META_KEY, ModelsMeta(lm_model="none").model_dump())
    assert gate.lm_served()  # remembered for accept_seconds
