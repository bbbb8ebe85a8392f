"""bench/gpu.py, the one-command GPU benchmark, exercised on CPU with tiny models (`--device cpu --tiny`): every
configuration it runs loads through the engine's real paths and writes its rows to the JSON and the markdown table."""
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
                     "--configs", "offload", "--checkpoint-dir", str(tiny_checkpoint_dir), "--out", str(out)]) == 0
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
