"""bench/cold_load.py (model start-up, cold disk vs warm page cache): its page-cache tools on a plain file, then the
whole run on tiny models in this interpreter (`--tiny --in-process`): original layout converted on the first start,
the later starts' files evicted (cold) or left cached (warm), each row measured through Engine.load."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


def test_eviction_empties_the_page_cache_and_mincore_sees_it(tmp_path):
    import cold_load as cl

    data = tmp_path / "weights.bin"
    data.write_bytes(os.urandom(1 << 20))
    assert data.read_bytes()  # read once: every page is cached
    assert cl.resident_pages(data) == (256, 256) and cl.resident_share([data]) == 1.0
    cl.evict([data])  # written back first: a dirty page would stay
    if cl.filesystem(tmp_path) != "tmpfs":  # tmpfs pages are the file itself: the bench labels the row instead
        assert cl.resident_share([data]) == 0.0
    read0 = cl.disk_read_bytes()
    assert cl.raw_read([data])["bytes"] == 1 << 20
    assert cl.resident_share([data]) == 1.0 and cl.disk_read_bytes() >= read0


@pytest.mark.integration  # a real engine and LM on tiny checkpoints (tests/conftest.py's kinds)
def test_a_tiny_run_converts_once_then_loads_cold_and_warm(tmp_path):
    import cold_load as cl

    out = tmp_path / "cold"
    assert cl.main(["--tiny", "--in-process", "--vae-compile", "false", "--work-dir", str(tmp_path / "work"),
                    "--out", str(out)]) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    rows = {r["row"]: r for r in data["rows"]}
    assert list(rows) == list(cl.ROWS) and all(r["status"] == "measured" for r in rows.values())
    first, cold, warm = (rows[n] for n in cl.ROWS)
    # only the first start converts: its VAE and text encoder loads inside the conversion are rows of their own
    assert any(k.strip().startswith("within the conversion") for k in first["stages"])
    assert not any("within the conversion" in k for k in [*cold["stages"], *warm["stages"]])
    for row in rows.values():
        assert row["random_weights"] and row["lm_random_weights"] and row["lm_loaded"] and row["lm_dtype"]
        assert row["load_wall_s"] > 0 and row["weights_gib"] > 0
        assert {"from_pretrained: DiT", "from_pretrained: VAE", "from_pretrained: text encoder",
                "from_pretrained: 5 Hz LM"} <= set(row["stages"])
        assert row["resident_after_page_in"] > 0.99  # every weight page read (a few small files are not)
    assert warm["resident_before"] > 0.99 and warm["load_read_mib"] == 0  # the cold start left them cached
    assert not any(k.startswith("fingerprint") for r in rows.values() for k in r["stages"])  # one model: no hash
    full, warm_full, sidecar = data["meta"]["fingerprint"]
    assert full["files_hashed"] == warm_full["files_hashed"] == full["files"] > 0
    assert sidecar["files_hashed"] == 0  # a later start reads none of them
    if data["meta"]["filesystem"] != "tmpfs":
        assert first["resident_before"] == cold["resident_before"] == 0.0 and cold["evicted_files"] > 0
        assert data["meta"]["raw_read"]["resident_before"] == 0.0
    table = out.with_suffix(".md").read_text()
    assert "RANDOM" in table and "--tiny --in-process" in table and "| later start, cold | 0 % |" in table
