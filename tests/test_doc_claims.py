"""What the docs say about settings and routes is what the code does.

- `.env.example` names every setting (service/config.py) and only variables the code reads; copied to `.env`
  as it is, it changes nothing (its values are the defaults).
- Every default README.md / infra/README.md / .env.example states for a setting, in README's configuration
  table or as "`ACESTEP_X` (N)" in the text, is the setting's default.
- Every route README.md names exists, and every route of the app is named in README.md.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from engine.adapter_manifest import adapter_dirs
from entrypoints.bootstrap import DEFAULT_LM
from service.config import ENV_NAMES, Settings, load_settings
from tests.api_support import make_api

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
ENV_EXAMPLE = (ROOT / ".env.example").read_text()
DEFAULTS = {name: Settings.model_fields[attr].default for name, attr in ENV_NAMES.items()}
# Settings whose empty default the code resolves to what the docs name.
RESOLVED = {"ACESTEP_LORA_DIR": adapter_dirs("<ACESTEP_CHECKPOINT_DIR>")[0], "ACESTEP_LM_MODEL_PATH": DEFAULT_LM}
# Defaults stated by what they mean: OPENROUTER_MAX_WAIT's 0 is "as long as ACESTEP_GENERATION_TIMEOUT".
MEANS = {("OPENROUTER_MAX_WAIT", "ACESTEP_GENERATION_TIMEOUT"): 0.0}


def read_by_code() -> set[str]:
    """Variables the code reads besides the settings (os.environ look-ups; a trailing _ is a prefix)."""
    names = set()
    for folder in ("service", "engine", "entrypoints", "handlers", "infra"):
        for path in (ROOT / folder).rglob("*.py"):
            if "node_modules" not in path.parts and "cdk.out" not in path.parts:
                names |= set(re.findall(r"[\"']((?:ACESTEP|OPENROUTER)_[A-Z0-9_]+)[\"']", path.read_text()))
    return names


def example_lines() -> dict[str, str]:
    """NAME -> value of every `NAME=value` line, commented out or not."""
    return dict(re.findall(r"^#?\s*((?:ACESTEP|OPENROUTER)_[A-Z0-9_]+)=(.*)$", ENV_EXAMPLE, re.M))


def test_env_example_names_every_setting_and_only_what_the_code_reads():
    named = set(example_lines())
    assert not set(DEFAULTS) - named, f"settings .env.example does not document: {sorted(set(DEFAULTS) - named)}"
    code = read_by_code()
    unread = [n for n in named - set(DEFAULTS) if n not in code and not any(n.startswith(p) for p in code
                                                                              if p.endswith("_"))]
    assert not unread, f".env.example names variables nothing reads: {unread}"


def test_env_example_copied_as_it_is_changes_nothing():
    active = dict(re.findall(r"^((?:ACESTEP|OPENROUTER)_[A-Z0-9_]+)=(.*)$", ENV_EXAMPLE, re.M))
    set_beyond_settings = {n: v for n, v in active.items() if n not in DEFAULTS and v}
    assert not set_beyond_settings, f"set in .env.example, though their default is unset: {set_beyond_settings}"
    settings = {n: v for n, v in active.items() if n in DEFAULTS}
    assert load_settings(env=settings, dotenv_path=None) == load_settings(env={}, dotenv_path=None)


def same(stated: str, default: object, name: str) -> bool:
    stated = stated.replace(" under the checkpoint dir", "").strip("`").strip()
    if (name, stated) in MEANS:
        return MEANS[name, stated] == default
    if name in RESOLVED:
        return stated == RESOLVED[name]
    if stated.startswith("empty"):
        return default == ""
    seconds = re.fullmatch(r"([\d.]+) (s|min)", stated)
    if seconds:
        return float(seconds.group(1)) * (60 if seconds.group(2) == "min" else 1) == default
    if isinstance(default, bool):
        return stated in (str(default).lower(), "on" if default else "off")
    if isinstance(default, (int, float)):
        return float(stated) == default
    return stated == default


def stated_defaults() -> list[tuple[str, str, str]]:
    """(doc, variable, the default it states), from README's configuration table and "`NAME` (N)" in prose."""
    found = []
    table = re.search(r"^## Configuration\n.*?((?:^\|[^\n]*\n)+)", README, re.M | re.S)
    assert table, "README.md has no configuration table"
    for row in table.group(1).splitlines()[2:]:
        names_cell, default_cell = row.split("|")[1:3]
        names = re.findall(r"`((?:ACESTEP|OPENROUTER)_\w+)`", names_cell)
        defaults = [d.split("(")[0].strip() for d in default_cell.split(" / ")]
        for name, default in zip(names, defaults if len(defaults) == len(names) else defaults[:1]):
            found.append(("README.md", name, default))
    value = r"(?:default )?(`[^`]+`(?: under the checkpoint dir)?|[\d.]+(?: s| min)?)"
    for doc in ("README.md", "infra/README.md"):
        text = (ROOT / doc).read_text()
        found += [(doc, m.group(1), m.group(2)) for m in
                  re.finditer(rf"`((?:ACESTEP|OPENROUTER)_\w+)`,? \({value}[;,)]", text.replace("\n", " "))]
    return found


def test_the_docs_find_their_stated_defaults():
    assert len(stated_defaults()) >= 20, stated_defaults()


@pytest.mark.parametrize("doc,name,stated", stated_defaults(), ids=lambda v: str(v)[:40])
def test_stated_defaults_are_the_settings_defaults(doc, name, stated):
    if name not in DEFAULTS:
        pytest.fail(f"{doc} names {name} as a setting with a default; service/config.py has no such setting")
    assert same(stated, DEFAULTS[name], name), f"{doc}: {name} default {stated!r}, the code's is {DEFAULTS[name]!r}"


def test_every_route_readme_names_exists_and_every_route_is_named(settings):
    spec = make_api(settings).client.get("/openapi.json").json()["paths"]
    routes = {(method.upper(), re.sub(r"\{\w+\}", "{}", path)) for path, ops in spec.items() for method in ops}
    text = README.replace("\n", " ")
    named = {(m, re.sub(r"\{\w+\}", "{}", p)) for m, p in re.findall(r"\b(GET|POST|PUT|DELETE) (/[\w/{}]*\w\}?)", text)}
    for prefix, alternatives in re.findall(r"(/v1/\w+/)([\w|]+\|[\w|]+)", text):  # /v1/lora/load|unload|...
        named |= {(m, prefix + a) for m, _ in routes for a in alternatives.split("|") if (m, prefix + a) in routes}
    assert not named - routes, f"README names routes the app does not have: {sorted(named - routes)}"
    mentioned = {(m, p) for m, p in routes if f"`{p}`" in re.sub(r"\{\w+\}", "{}", text)}  # `/v1/metrics` gives...
    # the upload targets are not called by name: POST /v1/uploads and /v1/adapters/uploads answer their URL
    unnamed = routes - named - mentioned - {("PUT", "/v1/uploads/{}"), ("PUT", "/v1/adapters/uploads/{}")}
    assert not unnamed, f"routes README.md does not name: {sorted(unnamed)}"


def test_readme_memory_table_is_bench_memory_measured():
    """README's per-module resident weights (GiB, two decimals) are bench/memory_measured.json's rows; int8 after
    malloc_trim, as its footnote says."""
    import json

    rows = json.loads((ROOT / "bench" / "memory_measured.json").read_text())["rows"]
    measured = {}
    for row in rows:
        if row["status"] == "measured":
            column = "int8" if row["quantize"] == "int8" else {"bfloat16": "bf16", "float32": "float32"}[row["dtype"]]
            size = row["weights_rss_trimmed_bytes"] if column == "int8" else row["weights_rss_bytes"]
            measured[row["module"], column] = f"{size / 2 ** 30:.2f}"
    table = {"2B DiT": ("dit",), "XL DiT": ("dit-xl",), "its condition encoder": ("dit_encoders",), "VAE": ("vae",),
             "text encoder": ("text_encoder",), "5 Hz LM": ("lm-0.6B", "lm-1.7B", "lm-4B")}
    checked = 0
    for line in README.splitlines():
        label = next((k for k in table if line.startswith(f"| {k}")), None)
        if label is None:
            continue
        cells = line.split("|")[2:5]
        for column, cell in zip(("bf16", "float32", "int8"), cells):
            figures = re.findall(r"\d+\.\d\d", cell.split("(")[0])
            for module, figure in zip(table[label], figures):
                assert measured.get((module, column)) == figure, (label, column, figure, measured.get((module, column)))
                checked += 1
    assert checked >= 15, checked


def test_readme_cpu_song_table_is_the_batch_1_run_in_results():
    """README's "30 s song" table: wall, CPU-s, DiT / VAE decode CPU-s and peak RSS of bench/RESULTS.md's
    one-song-per-request run (bench/song_cpu.py --batch-size 1)."""
    results = (ROOT / "bench" / "RESULTS.md").read_text()
    section = results.split("## Whole songs on CPU, one song per request", 1)[1].split("\n## ", 1)[0]
    configs = {"bf16 (": "bf16", "bf16 + int8 DiT": "bf16+int8", "float32": "float32"}
    checked = 0
    for line in README.split("| 30 s song |", 1)[1].split("\n\n", 1)[0].splitlines()[2:]:
        cells = [c.strip() for c in line.split("|")[1:-1]]
        config = next(v for k, v in configs.items() if cells[0].startswith(k))
        row = re.search(rf"^\| 30 s \| {re.escape(config)} \| 8 \|(.*)$", section, re.M)
        assert row, config
        measured = [c.strip().strip("*") for c in row.group(1).split("|")]
        wall, cpu, dit, vae, peak = measured[0], measured[1], measured[3].split(" / ")[1], \
            measured[4].split(" / ")[1], measured[6].split()[0].strip("*")
        assert cells[1] == f"{wall} s" and cells[2] == cpu, (config, cells, measured)
        assert cells[3] == f"{dit} / {vae}", (config, cells[3], dit, vae)
        assert cells[4] == f"{float(peak):.1f} GiB", (config, cells[4], peak)
        checked += 1
    assert checked == 3
