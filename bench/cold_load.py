"""Model start-up from a cold disk vs a warm page cache, as a worker loads the models (issue 24/25 leftover).

    flock /tmp/fullsize.lock .venv/bin/python bench/cold_load.py      # full size (published shapes, RANDOM weights)
    .venv/bin/python bench/cold_load.py --tiny                         # the same path on tiny models (seconds)

The checkpoint set is built once under --work-dir, in ACE-Step's published (original) layout, as a newcomer
downloads it: <root>/acestep-v15-turbo/ (the 2B turbo DiT's one state dict), vae/, Qwen3-Embedding-0.6B/, and
the 1.7B 5 Hz LM in acestep-5Hz-lm-1.7B/, all bf16 as published, random weights (labelled so in every folder).
The engine converts the original layout once into <root>/.diffusers/<name>/ (engine/weights/converted_cache.py).

Rows, each in a fresh interpreter, as a worker starts (EngineConfig.from_env + Engine.load, transformers LM):
  first start, cold   the converted cache removed, every file evicted: conversion + load (a newcomer's first run)
  later start, cold   every file of the set evicted from the page cache (an ECS worker, a restart after a while)
  later start, warm   right after: the files are in the page cache
Eviction: fsync, then posix_fadvise(POSIX_FADV_DONTNEED) on every file under the root (no root needed); each row
records the share of the files' pages resident before it (mmap + mincore, as fincore does) and /proc/meminfo's
Cached, so a "cold" row that was not cold shows it. A tmpfs cannot be evicted: its rows say so.
Per row: Engine.load's wall and CPU seconds, the bytes the process read from the disk (/proc/self/io read_bytes),
then "page-in": one read of every weight page (safetensors maps the files; pages Engine.load did not read are paid
by the first request), so load + page-in is the time to a fully resident model. Per stage inside the load
(instrumented by wrapping the loader's own functions, not replaced): conversion, the shared-component fingerprint
(hashes vae/, text encoder, ... files), each module's from_pretrained (DiT, condition encoder, VAE, text encoder,
LM), the CPU VAE's prepare (fused Snake compile), the LM planner. Also a raw cold sequential read of the files a
later start loads (16 MiB reads), i.e. what this disk gives, so readers can scale the figures to their disk.
One model fingerprints nothing (there is nothing to share with); the fingerprint check after the rows measures what
a start with 2+ models pays per model: every file hashed (no sidecar: every start before engine/weights/fingerprint.py
kept them), cold and warm, then a cold start that finds the sidecars.

Memory: one child at a time, each waits (10 s polls, up to 5 min) for MemAvailable >= its expected peak + 3 GiB.
Wrap full-size runs in `flock /tmp/fullsize.lock` (one full-size benchmark at a time on a shared machine).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # before bench/ (the script's folder): bench/engine.py is not the engine package

from measure import GIB, loadavg, reset_peak, run_child, status_bytes, timed, wait_for_memory, write_results  # noqa: E402

MODEL = "acestep-v15-turbo"
LM_NAME = "acestep-5Hz-lm-1.7B"
MIB = 1024**2
ROWS = ("first start, cold", "later start, cold", "later start, warm")
EXPECTED_PEAK_GIB = 11.0  # DiT set 6.3 GB + LM 3.5 GB resident once paged in, bf16
HEADROOM_GIB = 3.0
BUILD_PEAK_GIB = 7.5  # the full-size DiT set built in bf16 (bench/song_cpu.py)
# from_pretrained classes -> the module they load
MODULES = {"AceStepTransformer1DModel": "DiT", "AceStepConditionEncoder": "condition encoder",
           "AceStepAudioTokenizer": "audio tokenizer", "AceStepAudioTokenDetokenizer": "audio detokenizer",
           "AutoencoderOobleck": "VAE", "Qwen3Model": "text encoder", "Qwen3ForCausalLM": "5 Hz LM"}


# ---------------------------------------------------------------- the page cache (Linux; standard library only)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
_PAGE = os.sysconf("SC_PAGE_SIZE")
_MAP_FAILED = ctypes.c_void_p(-1).value


def files_under(root: Path) -> list[Path]:
    """Every regular file under root (hidden folders included: the converted cache is .diffusers/)."""
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def resident_pages(path: Path) -> tuple[int, int]:
    """(pages of `path` in the page cache, pages of the file): mmap + mincore, as util-linux's fincore counts."""
    size = path.stat().st_size
    pages = (size + _PAGE - 1) // _PAGE
    if size == 0:
        return 0, 0
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED: maps, reads nothing
        if addr in (None, _MAP_FAILED):
            raise OSError(ctypes.get_errno(), f"mmap {path}")
        try:
            vec = (ctypes.c_ubyte * pages)()
            if _libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore {path}")
            flags = bytes(vec)
            return sum(1 for b in flags if b & 1) if pages < 4096 else pages - flags.count(0), pages
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)


def resident_share(files: list[Path]) -> float:
    """The share of the files' pages in the page cache, 0..1."""
    counts = [resident_pages(f) for f in files]
    total = sum(n for _, n in counts)
    return sum(r for r, _ in counts) / total if total else 0.0


def evict(files: list[Path]) -> None:
    """Drop the files' pages from the page cache: written back first (a dirty page is not dropped), then
    POSIX_FADV_DONTNEED. Pages another process maps stay; resident_share says what is left."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def meminfo_bytes(key: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def disk_read_bytes() -> int:
    """Bytes this process (all its threads) made the block layer read: page-cache hits count nothing."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


def filesystem(path: Path) -> str:
    """The file system type holding `path` (/proc/mounts, longest mount point): tmpfs pages cannot be evicted."""
    best, kind = "", "unknown"
    target = str(path.resolve())
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            mount = parts[1].replace("\\040", " ")
            if (target == mount or target.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
                best, kind = mount, parts[2]
    return kind


def raw_read(files: list[Path]) -> dict:
    """Sequential 16 MiB reads of every file: what this disk gives (run it cold)."""
    buf = bytearray(16 * MIB)
    total = 0
    with timed() as span:
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                while n := fh.readinto(buf):
                    total += n
    return {"bytes": total, "wall_s": round(span.wall_s, 2), "cpu_s": round(span.cpu_s, 2),
            "mib_per_s": round(total / MIB / span.wall_s, 1) if span.wall_s else None}


# ---------------------------------------------------------------- the load's stages (child)

class Stages:
    """Wall, CPU seconds and disk bytes read per named stage; a stage called twice adds up."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, float]] = {}
        self.open: list[str] = []  # the stages running now, outermost first

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        read0 = disk_read_bytes()
        self.open.append(name)
        try:
            with timed() as span:
                yield
        finally:
            self.open.pop()
        row = self.rows.setdefault(name, {"wall_s": 0.0, "cpu_s": 0.0, "read_mib": 0.0, "calls": 0})
        row["wall_s"] += span.wall_s
        row["cpu_s"] += span.cpu_s
        row["read_mib"] += (disk_read_bytes() - read0) / MIB
        row["calls"] += 1

    def rounded(self) -> dict[str, dict[str, float]]:
        return {k: {m: round(v, 2) for m, v in r.items()} for k, r in self.rows.items()}


@contextmanager
def instrumented(stages: Stages) -> Iterator[None]:
    """Wrap the loader's own functions with stage timers for the block (the originals run; restored after)."""
    from diffusers import DiffusionPipeline, ModelMixin
    from transformers import PreTrainedModel

    import engine.lm_bridge
    import engine.service
    import engine.vae_fast
    import engine.weights.converted_cache

    undo: list[Callable[[], None]] = []

    def wrap_function(owner, attr: str, stage: str) -> None:
        original = getattr(owner, attr)

        def wrapper(*args, **kwargs):
            with stages.stage(stage):
                return original(*args, **kwargs)

        setattr(owner, attr, wrapper)
        undo.append(lambda: setattr(owner, attr, original))

    def wrap_classmethod(cls, name: Optional[str]) -> None:
        original = cls.__dict__["from_pretrained"]

        def wrapper(klass, *args, **kwargs):
            # the conversion loads the VAE and text encoder too: its loads are its own rows
            within = "  within the conversion: " if any(s.startswith("convert") for s in stages.open) else ""
            with stages.stage(name or within + "from_pretrained: " + MODULES.get(klass.__name__, klass.__name__)):
                return original.__func__(klass, *args, **kwargs)

        cls.from_pretrained = classmethod(wrapper)
        undo.append(lambda: setattr(cls, "from_pretrained", original))

    # resolve_model imports ensure_converted at call time: the module attribute is what it gets
    wrap_function(engine.weights.converted_cache, "ensure_converted", "convert (first run) / cache check")
    wrap_function(engine.service, "component_fingerprint", "fingerprint shared components (hash)")
    wrap_function(engine.vae_fast, "prepare", "VAE prepare (fold, fused Snake compile)")
    wrap_function(engine.lm_bridge, "load_planner", "5 Hz LM planner (incl. its from_pretrained)")
    wrap_classmethod(DiffusionPipeline, "pipeline from_pretrained (incl. its modules)")
    wrap_classmethod(ModelMixin, None)
    wrap_classmethod(PreTrainedModel, None)
    try:
        yield
    finally:
        for step in reversed(undo):
            step()


def engine_modules(engine) -> list:
    """Every torch module the engine holds: each model's pipeline components and the LM."""
    import torch

    found = []
    for model in engine._models.values():
        found += [c for c in model.pipe.components.values() if isinstance(c, torch.nn.Module)]
    lm = getattr(getattr(engine.planner, "backend", None), "model", None)
    if isinstance(lm, torch.nn.Module):
        found.append(lm)
    return found


def page_in(modules: list) -> int:
    """Read one element of every page of every weight (a mapped file's pages come in from the disk); bytes read."""
    import torch

    seen: set[int] = set()
    total = 0
    with torch.no_grad():
        for module in modules:
            for t in [*module.parameters(), *module.buffers()]:
                if t.device.type != "cpu" or t.numel() == 0 or t.data_ptr() in seen:
                    continue
                seen.add(t.data_ptr())
                step = max(1, _PAGE // t.element_size())
                t.detach().reshape(-1)[::step].float().sum()
                total += t.numel() * t.element_size()
    return total


def start_files(root: Path) -> list[Path]:
    """The files a start reads: the converted cache and the LM once converted, else the original layout and the LM."""
    cache = root / ".diffusers" / MODEL
    if (cache / "model_index.json").is_file():
        return files_under(cache) + files_under(lm_dir(root))
    return [f for f in files_under(root) if not f.relative_to(root).parts[0] == ".diffusers"]


def measure_start(env: Mapping[str, str], root: Path) -> dict[str, Any]:
    """One worker start in this process: import, Engine.load, page-in; the row's figures. The page-cache shares
    are over the files this start reads (start_files, as they were before it)."""
    files = start_files(root)
    row: dict[str, Any] = {"resident_before": round(resident_share(files), 4),
                           "cached_before_gib": round(meminfo_bytes("Cached") / GIB, 2), "load_avg": loadavg()}
    reset_peak()
    with timed() as imports:
        from engine.config import EngineConfig
        from engine.service import Engine
    stages = Stages()
    read0 = disk_read_bytes()
    with instrumented(stages), timed() as load:
        engine = Engine.load(EngineConfig.from_env(env))
    load_read = disk_read_bytes() - read0
    files = start_files(root)  # the first start has written the converted cache
    row["resident_after_load"] = round(resident_share(files), 4)
    read0 = disk_read_bytes()
    with timed() as touch:
        weight_bytes = page_in(engine_modules(engine))
    touch_read = disk_read_bytes() - read0
    info = engine.describe()
    row.update(
        import_s=round(imports.wall_s, 2),
        load_wall_s=round(load.wall_s, 2), load_cpu_s=round(load.cpu_s, 2), load_read_mib=round(load_read / MIB),
        page_in_wall_s=round(touch.wall_s, 2), page_in_cpu_s=round(touch.cpu_s, 2),
        page_in_read_mib=round(touch_read / MIB),
        ready_wall_s=round(load.wall_s + touch.wall_s, 2),
        weights_gib=round(weight_bytes / GIB, 3),
        resident_after_page_in=round(resident_share(files), 4),
        peak_rss_gib=round(status_bytes("VmHWM") / GIB, 3), rss_gib=round(status_bytes("VmRSS") / GIB, 3),
        stages=stages.rounded(),
        dtype=str(engine.dtype).replace("torch.", ""), lm_loaded=engine.lm_loaded,
        random_weights=info["random_weights"], lm_random_weights=info["lm_random_weights"],
        lm_dtype=info["lm_dtype"], status="measured",
    )
    return row


FINGERPRINT_ROWS = ("no sidecar, cold (every start before)", "no sidecar, warm (every start before)",
                    "sidecar, cold (a later start now)")


def fingerprint_check(root: Path) -> list[dict[str, Any]]:
    """What a start configured with 2+ models pays to fingerprint one model's shareable components (one model
    fingerprints nothing): hashing every file, cold and warm (the sidecars removed: every start before them), and
    a cold start that finds the sidecars the first measurement wrote. Each in a fresh in-process hash cache."""
    from engine.weights import fingerprint
    from engine.weights.checkpoints import SHAREABLE_COMPONENTS

    model = root / ".diffusers" / MODEL
    folders = [model / c for c in SHAREABLE_COMPONENTS if (model / c).is_dir()]
    files = [f for d in folders for f in files_under(d)]
    hashed: list[Path] = []
    real = fingerprint.hash_file

    def counting(file: Path) -> str:
        hashed.append(file)
        return real(file)

    rows = []
    fingerprint.hash_file = counting
    try:
        for name in FINGERPRINT_ROWS:
            if name.startswith("no sidecar"):
                for d in folders:
                    fingerprint.sidecar_path(d).unlink(missing_ok=True)
            if ", cold" in name:
                evict(files)
            resident = resident_share(files)
            fingerprint._HASH_CACHE.clear()
            hashed.clear()
            read0 = disk_read_bytes()
            with timed() as span:
                for d in folders:
                    fingerprint.component_fingerprint(d)
            rows.append({"row": name, "resident_before": round(resident, 4), "wall_s": round(span.wall_s, 2),
                         "cpu_s": round(span.cpu_s, 2), "read_mib": round((disk_read_bytes() - read0) / MIB),
                         "files_hashed": len(hashed), "files": len(files),
                         "gib": round(sum(f.stat().st_size for f in files) / GIB, 2)})
    finally:
        fingerprint.hash_file = real
    return rows


# ---------------------------------------------------------------- building the set

def checkpoint_root(args) -> Path:
    return args.work_dir / ("tiny" if args.tiny else "full")


def lm_dir(root: Path) -> Path:
    return root / LM_NAME


def build(root: Path, tiny: bool, part: str) -> None:
    """part "dit": the DiT, vae/ and text encoder in the original layout; "lm": the 1.7B LM (tiny: a tiny LM)."""
    import torch

    if part == "dit":
        from engine.weights.checkpoints import build_tiny_checkpoint

        if not tiny:
            torch.set_default_dtype(torch.bfloat16)  # built in bf16 directly: ~7 GiB peak instead of ~13
        build_tiny_checkpoint(root / MODEL, seed=0, model_name=MODEL, size="tiny" if tiny else "full",
                              layout="original")
        (root / MODEL / ".built").write_text("complete\n")
        return
    from engine.lm.tiny import build_tiny_lm

    if tiny:  # 1,024 code tokens (as the launcher's demo LM): its planner builds in a fraction of the time
        build_tiny_lm(lm_dir(root), seed=0, audio_codes=1024)
    else:
        from lm import save_full_lm  # bench/lm.py: random weights in the published 1.7B shape, bf16

        torch.set_default_dtype(torch.bfloat16)
        save_full_lm(lm_dir(root))
    (lm_dir(root) / ".built").write_text("complete\n")


def ensure_built(args, root: Path, meta: dict) -> bool:
    for part, folder in (("dit", root / MODEL), ("lm", lm_dir(root))):
        if (folder / ".built").is_file():
            continue
        if args.in_process:
            build(root, args.tiny, part)
            continue
        if not args.tiny:
            ok, free = wait_for_memory(int((BUILD_PEAK_GIB + HEADROOM_GIB) * GIB), limit_s=args.poll_limit_s)
            if not ok:
                print(f"not building the {part}: MemAvailable {free / GIB:.1f} GiB", file=sys.stderr)
                return False
        with timed() as span:
            built = run_child([__file__, "--build", part, "--work-dir", str(args.work_dir)] + (["--tiny"] if args.tiny else []),
                      env=dict(os.environ, OMP_NUM_THREADS=str(args.threads), OMP_WAIT_POLICY="PASSIVE"),
                      cwd=str(ROOT), show_stderr=True)
        meta[f"build_{part}"] = dict(built, wall_s=round(span.wall_s, 1))
    return True


def row_env(root: Path, args) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACESTEP_")}
    env.update(OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1",
               ACESTEP_CHECKPOINT_DIR=str(root), ACESTEP_CONFIG_PATH=MODEL, ACESTEP_DEVICE=args.device,
               ACESTEP_ALLOW_DOWNLOAD="false", ACESTEP_DTYPE=args.dtype, ACESTEP_LM_MODEL_PATH=str(lm_dir(root)),
               ACESTEP_LM_BACKEND="pt", ACESTEP_VAE_COMPILE=args.vae_compile)
    return env


def folder_sizes(root: Path) -> dict[str, float]:
    sizes: dict[str, float] = {}
    for f in files_under(root):
        top = f.relative_to(root).parts
        key = "/".join(top[:2]) if top[0] == ".diffusers" else top[0]
        sizes[key] = sizes.get(key, 0) + f.stat().st_size
    return {k: round(v / GIB, 3) for k, v in sizes.items() if v >= MIB}


# ---------------------------------------------------------------- parent

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny random models (seconds; no memory gate)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", help="ACESTEP_DTYPE (auto: bf16 on AMX / AVX512-BF16 CPUs)")
    p.add_argument("--vae-compile", default="auto", help="ACESTEP_VAE_COMPILE (auto: the worker's default)")
    p.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "acestep-cold-load",
                   help="where the checkpoint set is built once and reused (on the disk you want measured)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cold_load")
    p.add_argument("--in-process", action="store_true",
                   help="rows in this interpreter, not a fresh one each (tests; the imports are then warm)")
    p.add_argument("--poll-limit-s", type=float, default=300.0)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--build", choices=["dit", "lm"], help=argparse.SUPPRESS)
    return p.parse_args(argv)


def run_row(args, root: Path) -> dict:
    if args.in_process:
        return measure_start(row_env(root, args), root)
    if not args.tiny:
        ok, free = wait_for_memory(int((EXPECTED_PEAK_GIB + HEADROOM_GIB) * GIB), limit_s=args.poll_limit_s)
        if not ok:
            return {"status": "skipped", "reason": f"MemAvailable {free / GIB:.1f} GiB"}
    cmd = [__file__, "--child", "--work-dir", str(args.work_dir), "--threads", str(args.threads), "--device",
           args.device, "--dtype", args.dtype, "--vae-compile", args.vae_compile] + (["--tiny"] if args.tiny else [])
    return run_child(cmd, env=row_env(root, args), cwd=str(ROOT), show_stderr=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    root = checkpoint_root(args)
    if args.build:
        with timed() as span:
            build(root, args.tiny, args.build)
        print(json.dumps({"built": args.build, "wall_s": round(span.wall_s, 1),  # run_child reads it
                          "peak_rss_gib": round(status_bytes("VmHWM") / GIB, 2)}), flush=True)
        return 0
    if args.child:
        print(json.dumps(measure_start(row_env(root, args), root)), flush=True)
        return 0
    shown = sys.argv[1:] if argv is None else argv
    meta: dict[str, Any] = {
        "command": "flock /tmp/fullsize.lock .venv/bin/python bench/cold_load.py" + "".join(" " + a for a in shown),
        "size": "tiny" if args.tiny else "full-size", "model": MODEL, "lm": LM_NAME, "random_weights": True,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} threads",
        "date": time.strftime("%Y-%m-%d %H:%M"), "load_avg_start": loadavg(), "work_dir": str(root),
        "filesystem": None, "mem_available_start_gib": round(meminfo_bytes("MemAvailable") / GIB, 1)}
    root.mkdir(parents=True, exist_ok=True)
    meta["filesystem"] = filesystem(root)
    if not ensure_built(args, root, meta):
        return 1
    rows: list[dict] = []
    cache = root / ".diffusers" / MODEL
    for name in ROWS:
        print(f"{name} ...", file=sys.stderr, flush=True)
        if name.startswith("first start"):
            shutil.rmtree(cache, ignore_errors=True)  # the conversion a newcomer's first start makes
        files = files_under(root)
        evicted: dict[str, Any] = {}
        if name.endswith("cold"):
            cached0 = meminfo_bytes("Cached")
            evict(files)
            evicted = {"evicted_files": len(files), "evicted_gib": round(sum(f.stat().st_size for f in files) / GIB, 2),
                       "meminfo_cached_drop_gib": round((cached0 - meminfo_bytes("Cached")) / GIB, 2)}
        row = dict(run_row(args, root), row=name, **evicted)
        rows.append(row)
        if name.startswith("first start"):  # the disk's own speed, cold, over what a later start reads
            later = files_under(cache) + files_under(lm_dir(root))
            evict(later)
            resident = resident_share(later)
            meta["raw_read"] = dict(raw_read(later), resident_before=round(resident, 4))
        print("  " + (f"load {row['load_wall_s']} s, ready {row['ready_wall_s']} s, read {row['load_read_mib']}"
                      f"+{row['page_in_read_mib']} MiB, peak {row['peak_rss_gib']} GiB"
                      if row.get("status") == "measured" else f"{row.get('status')}: {row.get('reason')}"),
              file=sys.stderr, flush=True)
    print("fingerprint check (a start with 2+ models) ...", file=sys.stderr, flush=True)
    meta["fingerprint"] = fingerprint_check(root)
    meta["sizes_gib"] = folder_sizes(root)
    meta["load_avg_end"] = loadavg()
    write_results(args.out, meta, rows, markdown)
    return 0


def markdown(rows: list[dict], meta: dict) -> str:
    raw = meta.get("raw_read") or {}
    lines = [f"Model start-up, cold disk vs warm page cache ({meta['size']} {meta['model']} + {meta['lm']}, RANDOM "
             f"weights, published layout), {meta['machine']}, {meta['filesystem']} at {meta['work_dir']}, "
             f"{meta['date']}; load average {meta['load_avg_start']} -> {meta.get('load_avg_end')}",
             f"`{meta['command']}`", "",
             "Imports: torch, diffusers, transformers and the engine (their files are not evicted). Read from disk: "
             "/proc/self/io read_bytes. Page-in: one read of every weight page after Engine.load (safetensors maps "
             "the files: what the load leaves unread, the first request pays). Effective MiB/s: disk bytes read / "
             "(load + page-in). Whole start: imports + load + page-in.", "",
             f"Files (GiB): {meta.get('sizes_gib')}",
             f"Raw cold sequential read of what a later start loads: {raw.get('bytes', 0) / GIB:.2f} GiB in "
             f"{raw.get('wall_s')} s = **{raw.get('mib_per_s')} MiB/s**", "",
             "| start | resident before | imports s | Engine.load wall / CPU-s | read from disk MiB "
             "| page-in wall s (MiB read) | load + page-in s | effective MiB/s | whole start s | peak RSS GiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r.get("status") != "measured":
            lines.append(f"| {r['row']} | {r.get('status')}: {r.get('reason', '')} | | | | | | | | |")
            continue
        read = r["load_read_mib"] + r["page_in_read_mib"]
        rate = f"{read / r['ready_wall_s']:.0f}" if r["ready_wall_s"] and read > 0 else "-"
        lines.append(f"| {r['row']} | {100 * r['resident_before']:.0f} % | {r['import_s']:.1f} | {r['load_wall_s']:.1f} / "
                     f"{r['load_cpu_s']:.1f} | {r['load_read_mib']} | {r['page_in_wall_s']:.1f} "
                     f"({r['page_in_read_mib']}) | **{r['ready_wall_s']:.1f}** | {rate} "
                     f"| {r['import_s'] + r['ready_wall_s']:.1f} | {r['peak_rss_gib']:.2f} |")
    measured = [r for r in rows if r.get("status") == "measured"]
    if measured:
        names = list(dict.fromkeys(k for r in measured for k in r["stages"]))
        lines += ["", "Inside Engine.load, per stage: wall s / CPU-s / MiB read from disk",
                  "", "| stage | " + " | ".join(r["row"] for r in measured) + " |",
                  "|---|" + "---:|" * len(measured)]
        for name in names:
            cells = []
            for r in measured:
                s = r["stages"].get(name)
                cells.append(f"{s['wall_s']:.1f} / {s['cpu_s']:.1f} / {s['read_mib']:.0f}" if s else "-")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("\n" + "; ".join(
            f"{r['row']}: resident after load "
            f"{100 * r['resident_after_load']:.0f} %, after page-in {100 * r['resident_after_page_in']:.0f} %, "
            f"Cached dropped by the eviction {r.get('meminfo_cached_drop_gib', '-')} GiB, dtype {r['dtype']}"
            for r in measured))
    if meta.get("fingerprint"):
        lines += ["", "Fingerprint of the shareable components (vae/, text encoder, encoders) of one model, as a start "
                  "with 2+ models computes it (one model computes none)", "",
                  "| fingerprint | resident before | wall s | CPU-s | MiB read from disk | files hashed |",
                  "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['row']} | {100 * r['resident_before']:.0f} % | {r['wall_s']:.2f} | {r['cpu_s']:.2f} "
                  f"| {r['read_mib']} | {r['files_hashed']} of {r['files']} ({r['gib']} GiB) |"
                  for r in meta["fingerprint"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
