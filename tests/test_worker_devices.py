"""Workers' device reports: carried by their heartbeats through both stores, shown by the API as upstream's
`gpus`, `gpu_mapping`, `device_map` (and per worker in /health's `workers[].devices`); a dead worker's do not show."""
from __future__ import annotations

import json
import sys
import time

from engine import device_probe
from engine.types import DeviceReport, GpuDevice, HostInfo, Placement
from service.aws.dynamo_store import BEAT_MAX_BYTES
from service.observability.health import ALIVE_WITHIN_SECONDS
from service.records import WorkerHeartbeat
from service.worker import Worker
from service.worker_devices import worker_devices
from tests.api_support import make_api
from tests.conftest import open_backend
from tests.support_engine import SineEngine

GIB = 1024 ** 3


def gpu_report(lm: bool = True) -> DeviceReport:
    """What a GPU engine's devices() gives (engine.device_probe.report on an H100 with the LM beside the DiT)."""
    return DeviceReport(
        device="cuda:0", gpus=(GpuDevice(0, "NVIDIA H100 80GB HBM3", 80 * GIB, 60 * GIB + GIB // 2, (9, 0)),),
        host=HostInfo("AMD EPYC 9654", 16, 128 * GIB, 100 * GIB),
        placement=Placement("cuda:0", "cuda:0", "cuda:0", "cuda:0" if lm else None),
        models=("acestep-v15-turbo",), lm_model="acestep-5Hz-lm-1.7B" if lm else None, dtype="bfloat16",
        lm_dtype="bfloat16" if lm else None, quantization={"dit": "none", "lm": "none"}, offload_mode="auto",
        offload_active=False)


def beat(worker_id: str, report: DeviceReport, age: float = 0.0) -> WorkerHeartbeat:
    now = time.time() - age
    return WorkerHeartbeat(worker_id=worker_id, started_at=now - 60, beat_at=now, lm_model=report.lm_model or "none",
                           models=list(report.models), devices=worker_devices(report))


def test_a_cpu_workers_beat_carries_its_machine_through_both_stores(backend, settings):
    worker = Worker(settings, backend, SineEngine(["m1", "m2"]), worker_id="cpu-worker")
    backend.store.record_heartbeat(worker.heartbeat())
    backend.store.record_heartbeat(beat("gpu-worker", gpu_report()))
    stored = {b.worker_id: b for b in backend.store.heartbeats()}
    cpu = stored["cpu-worker"].devices
    assert cpu is not None and cpu.device == "cpu" and cpu.kind == "cpu" and cpu.models == ["m1", "m2"]
    assert (cpu.placement.dit, cpu.placement.vae, cpu.placement.text_encoder, cpu.placement.lm) == ("cpu",) * 3 + (None,)
    # its CPU and RAM as the OS says them; a GPU only where the machine has one (none is made up)
    assert cpu.host.cpu == device_probe.cpu_name() and cpu.host.cores >= 1
    assert cpu.host.total_ram_bytes and 0 < (cpu.host.available_ram_bytes or 0) <= cpu.host.total_ram_bytes
    assert len(cpu.gpus) == cpu.gpu_count == len(device_probe.visible_gpus() if "torch" in sys.modules else ())
    assert stored["gpu-worker"].devices == worker_devices(gpu_report())  # every field back as written


def test_dynamodb_keeps_an_outsized_beat_inside_its_item_budget(settings, tmp_path):
    with open_backend("aws", settings, tmp_path) as backend:
        huge = beat("w", gpu_report()).model_copy(update={"error": "é\"" * 12_000})
        backend.store.record_heartbeat(huge)
        (stored,) = backend.store.heartbeats()
        assert len(stored.model_dump_json().encode()) <= BEAT_MAX_BYTES
        assert stored.devices is None and stored.error and stored.error.endswith("…")  # the device report goes first
        assert stored.model_copy(update={"error": None}) == huge.model_copy(update={"error": None, "devices": None})


def test_api_answers_upstreams_gpu_keys_from_live_workers_only(settings):
    api = make_api(settings, api_key="k")
    cpu = Worker(api.settings, api.backend, SineEngine(), worker_id="cpu-worker").heartbeat()
    for b in (cpu, beat("gpu-worker", gpu_report()), beat("dead-gpu", gpu_report(lm=False), age=ALIVE_WITHIN_SECONDS + 5)):
        api.backend.store.record_heartbeat(b)
    health = api.client.get("/health").json()["data"]
    workers = {w["worker_id"]: w for w in health["workers"]}
    assert set(workers) == {"cpu-worker", "gpu-worker"}  # the dead one is gone everywhere
    listings = [api.client.get(path, headers={"Authorization": "Bearer k"}).json()["data"]
                for path in ("/v1/models", "/v1/model_inventory")]
    for data in (health, *listings):
        assert data["gpus"] == [{"index": 0, "name": "NVIDIA H100 80GB HBM3", "total_vram_gb": 80.0,
                                 "free_vram_gb": 60.5, "compute_capability": [9, 0], "worker_id": "gpu-worker"}] + \
            [g | {"worker_id": "cpu-worker"} for g in workers["cpu-worker"]["devices"]["gpus"]]  # what the CPU box has
        assert data["gpu_mapping"] is None  # ACESTEP_GPU_MAPPING is not read here
        assert data["device_map"] == {  # the newest live beat's (the GPU worker beat last)
            "dit": "cuda:0", "vae": "cuda:0", "text_encoder": "cuda:0", "lm": "cuda:0", "lm_tensor_parallel": 1,
            "summary": "dit:0, vae:0, text_encoder:0, lm:0", "multi_device": False}
    assert workers["cpu-worker"]["devices"]["device_map"]["summary"] == "dit:cpu, vae:cpu, text_encoder:cpu"
    gpu = workers["gpu-worker"]["devices"]
    assert gpu["kind"] == "cuda" and gpu["device_map"] == health["device_map"]
    assert gpu["host"] == {"cpu": "AMD EPYC 9654", "cores": 16, "total_ram_gb": 128.0, "available_ram_gb": 100.0}
    assert (gpu["dtype"], gpu["lm_model"], gpu["offload"]) == ("bfloat16", "acestep-5Hz-lm-1.7B",
                                                                {"mode": "auto", "active": False})
    host = workers["cpu-worker"]["devices"]["host"]
    assert host["cpu"] == device_probe.cpu_name() and host["total_ram_gb"] > 0
    json.dumps(health)  # plain JSON all through


def test_a_card_the_engine_does_not_use_is_never_given_a_cuda_context(monkeypatch):
    """engine.device_probe.visible_gpus: free memory of the engine's own card from mem_get_info, of another card
    from NVML only (mem_get_info would open a context on it, hundreds of MB, every heartbeat), null without
    NVML; names and totals are read once per process. torch.cuda is faked here: this machine has no GPU."""
    import torch

    calls: dict[str, list[int]] = {"mem_get_info": [], "properties": []}

    class Props:
        total_memory = 24 * GIB

    def properties(index):
        calls["properties"].append(index)
        return Props()

    def nvml_used(index):
        if index == 2:
            raise RuntimeError("NVML not available")
        return 4 * GIB

    device_probe._gpu_facts.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: "NVIDIA L4")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (8, 9))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index: calls["mem_get_info"].append(index) or (3 * GIB, 24 * GIB))
    monkeypatch.setattr(torch.cuda, "device_memory_used", nvml_used, raising=False)
    try:
        for _ in range(2):
            gpus = device_probe.visible_gpus(frozenset({0}))
            assert [g.free_bytes for g in gpus] == [3 * GIB, 20 * GIB, None]
            assert {g.compute_capability for g in gpus} == {(8, 9)} and {g.total_bytes for g in gpus} == {24 * GIB}
    finally:
        device_probe._gpu_facts.cache_clear()
    assert calls["mem_get_info"] == [0, 0] and calls["properties"] == [0, 1, 2]
    # through the heartbeat to upstream's item: the unread card says null, never a guess
    from service.gpu_status import gpu_entry
    from service.worker_devices import GpuState

    entries = [gpu_entry(GpuState(**g.__dict__)) for g in gpus]
    assert [e["free_vram_gb"] for e in entries] == [3.0, 20.0, None]