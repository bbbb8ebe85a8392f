"""bench/gpu.py, the one-command GPU benchmark, exercised on CPU with tiny models (`--device cpu --tiny`): every
configuration it runs loads through the engine's real paths and writes its rows to the JSON and the markdown table,
then the batching rows (a tiny song at batch 1 and 2), then the LM part on the tiny LM (transformers; vLLM's row
says why it is skipped: the main venv has none). On a GPU the defaults add the 240 s song, batch 4 and the 1.7B LM
shape; the full-size paths were run on CPU by hand (bench/RESULTS.md, "GPU benchmark")."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.engine_fixtures import TURBO, tiny_checkpoint_dir  # noqa: F401  (session fixture)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


def test_the_gpu_benchmark_runs_on_cpu_and_writes_its_rows(tiny_checkpoint_dir, tmp_path):  # noqa: F811
    import gpu

    out = tmp_path / "gpu"
    assert gpu.main(["--device", "cpu", "--tiny", "--durations", "10", "--steps", "2", "--no-warmup",
                     "--configs", "offload", "--checkpoint-dir", str(tiny_checkpoint_dir), "--out", str(out),
                     "--batch-config", "offload", "--batch-song", "10", "--batch-sizes", "1", "2",
                     "--parts", "configs", "batching", "lm", "--lm-seconds", "1", "--work-dir", str(tmp_path)]) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    rows = {r["config"]: r for r in data["rows"]}
    # one configuration for time: bf16 and int8 are the same path with other EngineConfig settings
    assert list(rows) == ["offload"] and data["meta"]["size"] == "tiny"
    assert rows["offload"]["offload"]["active"] and rows["offload"]["quantization"]["dit"] == "none"
    for row in rows.values():
        assert row["random_weights"] and row["wall_s"] > 0 and row["dit_s"] > 0 and row["vae_decode_s"] > 0
        assert row["peak_gib"] > 0 and row["dtype"] == "float32"
    table = out.with_suffix(".md").read_text()
    assert "| offload | 10 s |" in table and "random-weight" in table and "--device cpu --tiny" in table
    assert [(r["batch"], r["song_s"]) for r in data["batching"]] == [(1, 10.0), (2, 10.0)]
    assert all(r["per_song_s"] > 0 and r["random_weights"] for r in data["batching"])
    assert data["batching"][1]["gain_vs_first"] == round(data["batching"][0]["per_song_s"]
                                                         / data["batching"][1]["per_song_s"], 2)
    assert "| offload | 10 s | 2 |" in table
    # every row says what produced it: the device and the processor (the card's name on CUDA)
    assert data["meta"]["device"].startswith("cpu (") and "CPUs)" in data["meta"]["device"]
    assert {r["device"] for r in [*data["rows"], *data["batching"], *data["lm"]]} == {data["meta"]["device"]}
    assert table.count(f"| {data['meta']['device']} |") == 1 + 2 + 2  # the config, batch 1 and 2, both LM backends
    lm = {r["backend"]: r for r in data["lm"]}
    assert lm["transformers"]["codes"] == 5 and lm["transformers"]["tokens_per_s"] > 0
    assert lm["transformers"]["random_weights"] and lm["transformers"]["kv_tokens"] is None
    # the main venv has no vLLM (it runs in .venv-vllm): its row says why instead of failing the run
    assert lm["vllm"]["skipped"].startswith("import vllm failed") and "| vllm | skipped: import vllm" in table


def test_asking_for_cuda_without_a_gpu_says_so_before_building_anything(tmp_path):
    import gpu
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit, match="sees no CUDA device"):
        gpu.main(["--device", "cuda", "--work-dir", str(tmp_path), "--out", str(tmp_path / "gpu")])
    assert list(tmp_path.iterdir()) == []


def test_the_gpu_defaults_include_the_long_song_batch_4_and_both_lm_backends():
    import gpu

    args = gpu.parse_args(["--device", "cuda"])
    assert 240.0 in args.durations and args.batch_sizes == [1, 4] and args.batch_song == 30.0
    assert args.parts == ["configs", "batching", "lm"] and args.lm_backends == ["transformers", "vllm"]
    assert args.lm_seconds * 5 == 300 and args.lm_cfg > 1  # CFG on
    assert gpu.parse_args(["--device", "cpu"]).durations == [10.0]


def test_the_wheels_carried_to_a_lent_gpu_are_the_locks_versions():
    import gpu_wheels

    locked = gpu_wheels.pins(Path(__file__).resolve().parents[1] / "constraints.txt")
    assert {"diffusers", "torchao", "pydantic"} <= set(gpu_wheels.PACKAGES)
    assert [name for name in gpu_wheels.PACKAGES if name not in locked] == []
