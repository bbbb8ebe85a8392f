"""The fit check's estimates (engine/memory.py) against the memory measured at full size on CPU
(bench/memory_table.py -> bench/memory_measured.json: random weights of the published shapes, one module per
process). Each measured module's tensor layout is written back as safetensors headers over a sparse file
(no data: the estimate reads headers only), so engine.memory.weight_bytes runs exactly as it does on a real
model folder."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from engine import memory

MEASURED = json.loads((Path(__file__).resolve().parents[1] / "bench" / "memory_measured.json").read_text())
ROWS = [r for r in MEASURED["rows"] if r["status"] == "measured"]
TOLERANCE = 0.15
FILES = {"transformer": "transformer/diffusion_pytorch_model.safetensors",
         "condition_encoder": "condition_encoder/diffusion_pytorch_model.safetensors",
         "audio_tokenizer": "audio_tokenizer/diffusion_pytorch_model.safetensors",
         "audio_token_detokenizer": "audio_token_detokenizer/diffusion_pytorch_model.safetensors",
         "vae": "vae/diffusion_pytorch_model.safetensors", "text_encoder": "text_encoder/model.safetensors",
         "lm": "model.safetensors"}
_BYTES = {"BF16": 2, "F32": 4, "I64": 8, "I32": 4, "I16": 2, "I8": 1}


def write_headers(folder: Path, layout: dict) -> None:
    """One safetensors file per component holding the layout's tensors (names keep their suffixes, so the
    estimate's rules see what they would in a real file), their data a hole."""
    for component, groups in layout.items():
        tensors = {f"{g}.{i}.{pattern}": (code, shape)
                   for g, (pattern, shape, code, count) in enumerate(groups) for i in range(count)}
        header, offset = {}, 0
        for name in sorted(tensors):  # safetensors wants the data in the names' order
            code, shape = tensors[name]
            size = _BYTES[code]
            for dim in shape:
                size *= dim
            header[name] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + size]}
            offset += size
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        path = folder / FILES[component]
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(text)) + text)
            f.truncate(8 + len(text) + offset)


@pytest.fixture(scope="module")
def model_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("measured_layouts")
    for module, layout in MEASURED["layouts"].items():
        write_headers(root / module, layout)
    return root


def estimate(folder: Path, row: dict) -> int:
    quantized = None if row["module"].startswith("lm-") else ("transformer",)  # engine/service.QUANTIZED_COMPONENTS
    return memory.weight_bytes(folder / row["module"], row["dtype"], quantize=row["quantize"],
                               quantized_components=quantized)


def test_the_table_covers_every_module_and_says_why_a_run_is_missing():
    measured = {(r["module"], r["dtype"], r["quantize"]) for r in ROWS}
    for module in ("dit", "dit-xl", "dit_encoders", "vae", "text_encoder", "lm-0.6B", "lm-1.7B", "lm-4B"):
        assert (module, "bfloat16", "none") in measured, module
    for module in ("dit", "dit-xl", "lm-0.6B", "lm-1.7B", "lm-4B"):
        assert (module, "bfloat16", "int8") in measured, module
    assert all(r["reason"] for r in MEASURED["rows"] if r["status"] != "measured")
    assert MEASURED["random_weights"] is True


@pytest.mark.parametrize("row", ROWS, ids=lambda r: f"{r['module']}-{r['dtype']}-{r['quantize']}")
def test_weight_estimate_is_within_15_percent_of_the_resident_memory_measured(model_folders, row):
    """int8: against the resident weights once malloc_trim has returned the heap the freed bf16 weights took
    (bench/memory_table.py records both; without the trim glibc keeps up to 1 GiB of it)."""
    expected = estimate(model_folders, row)
    measured = row["weights_rss_trimmed_bytes"] if row["quantize"] != "none" else row["weights_rss_bytes"]
    assert abs(expected / measured - 1) <= TOLERANCE, (expected / memory.GB, measured / memory.GB)


def test_the_decode_estimate_is_within_15_percent_of_the_measured_decodes():
    decodes = [(r["dtype"], s) for r in ROWS if r["module"] == "vae" for s in r["steps"]]
    assert decodes
    for dtype, step in decodes:
        expected = memory.vae_decode_bytes(1, step["seconds"], 128, 4 if dtype == "float32" else 2)
        assert abs(expected / step["working_set_bytes"] - 1) <= TOLERANCE, (dtype, step["seconds"], expected / memory.GB)


def test_a_dit_step_fits_in_the_working_memory_the_fit_check_reserves():
    """The check asks weights + workspace_bytes at start: a model it lets load must run its first step."""
    steps = [(r["dtype"], r["quantize"], s) for r in ROWS if r["module"] in ("dit", "dit-xl") for s in r["steps"]]
    assert {"dit", "dit-xl"} <= {r["module"] for r in ROWS if r.get("steps")}
    for dtype, mode, step in steps:
        reserved = memory.workspace_bytes(128, 4 if dtype == "float32" else 2)
        assert step["over_loaded_bytes"] <= reserved, (dtype, mode, step["over_loaded_bytes"] / memory.GB)


def test_the_lm_kv_cache_the_fit_check_counts_is_what_the_cache_takes_at_full_size():
    """The transformers LM's KV cache (engine/lm/kv_budget.fit_cache_bytes, from the LM's config: one song with
    CFG at the full context) against bench/memory_table.py's: the cache allocated as the decode allocates it, at the
    published LM sizes. The estimate equals its tensors and is within 15 % of the memory it added."""
    from engine.lm import kv_budget

    steps = [(r, s) for r in ROWS if r["module"].startswith("lm-") for s in r.get("steps", [])]
    assert {r["module"] for r, _ in steps} == {"lm-0.6B", "lm-1.7B", "lm-4B"}
    for row, step in steps:
        expected = kv_budget.fit_cache_bytes(step["config"], 4 if row["dtype"] == "float32" else 2)
        assert (step["rows"], step["tokens"]) == (2, kv_budget.LM_MAX_CONTEXT)
        assert expected == step["cache_tensor_bytes"], (row["module"], row["dtype"])
        assert abs(expected / step["working_set_bytes"] - 1) <= TOLERANCE, (row["module"], row["dtype"], row["quantize"])
    # README's KV row shows the fit check's figure (what its GPU totals add), not the measured working set
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    line = next(t for t in readme.splitlines() if t.startswith("| its KV cache on transformers, as the fit check"))
    counted = {r["module"]: kv_budget.fit_cache_bytes(s["config"], 2) for r, s in steps if r["dtype"] == "bfloat16"}
    assert f"| {' / '.join(f'{counted[m] / memory.GB:g}' for m in ('lm-0.6B', 'lm-1.7B', 'lm-4B'))} GiB |" in line


# README's table of settings per machine (and infra/README.md's copy): each GPU figure is a sum of these, in GiB as
# printed. Weights: bench/memory_measured.json (int8 after malloc_trim); "KV": the fit check's LM cache
# (kv_budget.fit_cache_bytes, a bf16 cache); "decode": the measured VAE decode of one 30 s song in bf16.
def _weights(module: str, quantize: str = "none") -> int:
    row = next(r for r in ROWS if (r["module"], r["dtype"], r["quantize"]) == (module, "bfloat16", quantize))
    return row["weights_rss_trimmed_bytes"] if quantize != "none" else row["weights_rss_bytes"]


def _kv(module: str) -> int:
    from engine.lm import kv_budget

    step = next(s for r in ROWS if (r["module"], r["dtype"]) == (module, "bfloat16") for s in r.get("steps", []))
    return kv_budget.fit_cache_bytes(step["config"], 2)


def _components() -> dict[str, int]:
    shared = _weights("dit_encoders") + _weights("vae") + _weights("text_encoder")
    vae = next(r for r in ROWS if (r["module"], r["dtype"]) == ("vae", "bfloat16"))
    return {"2B": _weights("dit") + shared, "2B int8": _weights("dit", "int8") + shared,
            "DiT+encoders": _weights("dit") + _weights("dit_encoders"),
            "DiT+encoders int8": _weights("dit", "int8") + _weights("dit_encoders"),
            "LM 1.7B": _weights("lm-1.7B"), "LM 1.7B int8": _weights("lm-1.7B", "int8"),
            "LM 0.6B": _weights("lm-0.6B"), "LM 0.6B int8": _weights("lm-0.6B", "int8"),
            "KV 1.7B": _kv("lm-1.7B"), "KV 0.6B": _kv("lm-0.6B"),
            "decode": next(s["working_set_bytes"] for s in vae["steps"] if s["seconds"] == 30.0)}


# Each setting's recipe: the components its total adds.
RECIPES = {"16 GB+": ("2B", "LM 1.7B", "KV 1.7B", "decode"),
           "12 GB int8": ("2B int8", "LM 1.7B int8", "KV 1.7B", "decode"),
           "12 GB 0.6B": ("2B", "LM 0.6B", "KV 0.6B", "decode"),
           "8 GB": ("2B int8", "LM 0.6B int8", "KV 0.6B", "decode"),
           "8 GB without the LM": ("2B int8", "decode"),
           "4-6 GB stage int8": ("DiT+encoders int8",), "4-6 GB stage bf16": ("DiT+encoders",)}


def _gib(size: float) -> str:
    from decimal import ROUND_HALF_UP, Decimal

    return str(Decimal(size / memory.GB).quantize(Decimal("0.1"), ROUND_HALF_UP))


def _total(name: str) -> list[str]:
    return [_gib(sum(_components()[c] for c in RECIPES[name]))]


def _sum(name: str) -> list[str]:
    """The terms as printed, then their total (of the unrounded terms)."""
    return [_gib(_components()[c]) for c in RECIPES[name]] + _total(name)


def _figures(doc: str, row: str) -> list[str]:
    """In order: every decimal figure (not a model size: 0.6B) in the last cell of README.md's table row that
    starts with `row`, or every "N.N GiB" of infra/README.md's."""
    import re

    text = (Path(__file__).resolve().parents[1] / doc).read_text()
    line = next(t for t in text.splitlines() if t.startswith(f"| {row}"))
    if doc == "README.md":
        return re.findall(r"\d+\.\d+(?![\dB])", line.rsplit("|", 2)[1])
    return re.findall(r"(\d+\.\d+) GiB", line)


@pytest.mark.parametrize("doc,row,expected", [
    ("README.md", "GPU, 16 GB or more", lambda: _sum("16 GB+")),
    ("README.md", "GPU, 12 GB", lambda: _sum("12 GB int8") + _sum("12 GB 0.6B")),
    ("README.md", "GPU, 8 GB", lambda: _sum("8 GB") + _sum("8 GB without the LM")),
    ("README.md", "GPU, 4-6 GB", lambda: _total("4-6 GB stage int8") + _total("4-6 GB stage bf16")),
    ("infra/README.md", "g5.xlarge", lambda: _total("16 GB+")),
    ("infra/README.md", "g4dn.xlarge",
     lambda: _total("12 GB 0.6B") + _total("12 GB int8") + _total("16 GB+") + [_gib(_components()["decode"])]),
], ids=lambda v: v if isinstance(v, str) else "")
def test_the_machine_tables_gpu_figures_are_the_measured_sums(doc, row, expected):
    """Each figure is its components from bench/memory_measured.json and the fit check, summed unrounded and
    rounded half up to one decimal as printed (a term is its component rounded the same way)."""
    assert _figures(doc, row) == expected(), (doc, row)
