"""bench/song_cpu.py (whole songs on CPU per configuration): one row measured in-process on the tiny checkpoint
through the worker's loading path, and its memory gate, which must hold a full-size row back on a busy machine."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.engine_fixtures import tiny_checkpoint_dir  # noqa: F401  (session fixture)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

GIB = 1024**3


def test_a_row_times_each_stage_in_wall_and_cpu_seconds_with_its_peak(tiny_checkpoint_dir, tmp_path):  # noqa: F811
    import soundfile as sf
    import song_cpu

    assert song_cpu.row_env("bf16+int8", tiny_checkpoint_dir, threads=2)["ACESTEP_QUANTIZE_DIT"] == "int8"
    env = song_cpu.row_env("float32", tiny_checkpoint_dir, threads=2)  # the cheapest row on tiny models
    row = song_cpu.measure_row(env, 10.0, warm_up=False, audio_format="wav32", save_audio=tmp_path / "song.wav")
    song, rate = sf.read(row["audio_file"], dtype="float32")
    assert rate == 48000 and len(song) == 10 * 48000 and song_cpu.snr_db(song, song) == float("inf")
    assert song_cpu.snr_db(song * 1.1, song) == pytest.approx(20.0)  # the error is a tenth of the signal
    # which Snake the song's decode ran (a tiny decoder is not compiled under auto), every activation counted
    assert row["snake"]["snake"] == "eager" and row["snake"]["calls"]["eager"] > 0 == row["snake"]["calls"]["compiled"]
    assert row["random_weights"] and row["dtype"] == "float32" and row["quantization"]["dit"] == "none"
    assert row["steps"] == 8  # the turbo default
    for name, stage in row["stages"].items():
        assert stage["calls"] >= 1 and stage["cpu_s"] > 0 and stage["peak_gib"] > 0, name
        # the bench's hooks and the engine's own clock time the same calls
        assert abs(stage["wall_s"] - stage["engine_wall_s"]) <= 0.05 + 0.2 * stage["engine_wall_s"], (name, stage)
    assert row["stages"]["DiT"]["calls"] == 8
    assert row["peak_gib"] >= max(s["peak_gib"] for s in row["stages"].values())
    assert row["cpu_s"] >= sum(s["cpu_s"] for s in row["stages"].values())
    table = song_cpu.markdown([dict(row, config="bf16"), {"config": "float32", "song_s": 30.0, "status": "skipped",
                                                          "reason": "MemAvailable 9.0 GiB (needed 20.0)"}],
                              {"size": "tiny", "model": "m", "machine": "x", "date": "d", "load_avg_start": "1",
                               "command": "c"})
    assert "| 10 s | bf16 | 8 |" in table and "skipped: MemAvailable 9.0 GiB" in table and "VAE decode" in table


def test_the_gate_waits_for_memory_and_for_other_benchmarks_then_gives_up():
    import song_cpu

    now = [0.0]
    readings = iter([(4 * GIB, []), (12 * GIB, ["123 python bench/lm.py"]), (12 * GIB, [])])
    seen: list = []

    def available():
        seen.append(next(readings))
        return seen[-1][0]

    ok, why = song_cpu.wait_until_safe(11.0, available=available, others=lambda: seen[-1][1],
                                       sleep=lambda s: now.__setitem__(0, now[0] + s), clock=lambda: now[0])
    assert ok and now[0] == 20.0 and "12.0 GiB" in why
    ok, why = song_cpu.wait_until_safe(11.0, limit_s=30, available=lambda: 4 * GIB, others=lambda: [],
                                       sleep=lambda s: now.__setitem__(0, now[0] + s), clock=lambda: now[0])
    assert not ok and "MemAvailable 4.0 GiB (needed 11.0)" in why
    # the 30 s float32 song runs last, and only with 20 GiB free
    assert song_cpu.ordered_rows(["float32", "bf16"], [10.0, 30.0])[-1] == ("float32", 30.0)
    assert song_cpu.needed_gib("float32", 10.0, last_row=True) == 20.0  # 14.8 + 3 expected: the floor decides
    assert song_cpu.needed_gib("float32", 30.0, last_row=True) == song_cpu.expected_peak_gib("float32", 30.0) + 3.0
    assert song_cpu.needed_gib("bf16", 30.0, last_row=False) == song_cpu.expected_peak_gib("bf16", 30.0) + 3.0
