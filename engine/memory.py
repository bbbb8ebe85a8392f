"""Will the models fit? Checked before loading, so a worker refuses at start with numbers instead of failing
with an out-of-memory error (on CPU: being OOM-killed) on its first task. And: is there room for an untiled
VAE decode now, or must it be tiled?

A model's weights take about the size of its safetensors files, scaled to the dtype it is loaded in
(weights are stored in bf16; fp32 doubles them); quantised ones (ACESTEP_QUANTIZE) at a byte per Linear weight
plus a scale per row. Components shared between models are counted once.
Generation needs working memory on top: its peak is the VAE decode (measured, below), plus the runtime
itself. At start the check asks for the smallest generation's: one song decoded in tiles.

Measured at full size on CPU (bench/vae_cpu.py, random weights, bf16; bench/RESULTS.md): an untiled
decode's working set is 0.88 GiB for 10 s, 2.34 GiB for 30 s, 4.61 GiB for 60 s (issue 25's runs: 2.6, 4.8,
and 18.6 GiB for 240 s) -- 1.5-1.9x the earlier estimate from layer shapes, which let a 240 s song go untiled
on a 23 GiB machine. The fit below is within -7..+12 % of every bf16 figure (float32: +4..+12 %; bench/
memory_table.py's runs too, tests/test_memory_table.py).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from engine.types import GenerationError

GB = 1024**3
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# What the process holds besides weights and the decode (torch's libraries, the allocator, small tensors); the
# full-size peaks (8.6 GiB bf16, 17.4 GiB fp32 for a 30 s song) are weights + this + the decode within ~5 %.
RUNTIME_BYTES = GB // 2


def weight_bytes(model_dir: Path, dtype: str, skip_components: Iterable[str] = (), quantize: str = "none",
                 quantized_components: Optional[Iterable[str]] = None) -> int:
    """Bytes the model's weights take once loaded as `dtype` (the stored files are bf16 or fp32); with
    `quantize` (engine/quantize.py), the Linear weights of `quantized_components` (None: the whole folder, as
    an LM's) at the mode's bytes per parameter plus a scale per row."""
    skip = set(skip_components)
    quantized = None if quantized_components is None else set(quantized_components)
    total = 0
    for file in model_dir.rglob("*.safetensors"):
        component = file.relative_to(model_dir).parts[0]
        if component in skip:
            continue
        mode = quantize if quantized is None or component in quantized else "none"
        total += _loaded_size(file, dtype, mode)
    return total


def _loaded_size(file: Path, dtype: str, quantize: str = "none") -> int:
    from safetensors import safe_open  # reads the header only, not the tensors

    size = 0
    with safe_open(str(file), framework="pt") as f:
        for key in f.keys():
            piece = f.get_slice(key)
            shape = list(piece.get_shape())
            count = 1
            for dim in shape:
                count *= dim
            stored = piece.get_dtype()
            floating = stored in ("F32", "BF16", "F16", "F64")
            if floating and quantize != "none" and _is_linear_weight(key, shape):
                from engine.quantize import quantised_weight_bytes

                size += quantised_weight_bytes(shape, quantize)
                continue
            size += count * (_DTYPE_BYTES.get(dtype, 4) if floating else _stored_bytes(stored))
            if key.endswith(".weight_v"):  # weight norm (the VAE): the layer keeps the weight it computes beside g, v
                size += count * _DTYPE_BYTES.get(dtype, 4)
    return size


def _is_linear_weight(key: str, shape: list[int]) -> bool:
    """What engine/quantize.py quantises, read from a header: 2-D `.weight`s but the token embedding (an
    nn.Embedding; an LM head tied to it is not stored, and stays unquantised with it)."""
    return len(shape) == 2 and key.endswith(".weight") and "embed_tokens" not in key


def _stored_bytes(code: str) -> int:
    return {"I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}.get(code, 4)


class DoesNotFit(GenerationError):
    """check_fits refused a load for memory (nothing was loaded), as opposed to a load that failed: a run-time
    model switch (service/model_switch.py) then retries after unloading the models in use."""


def check_fits(needed: int, free: Optional[int], device: str, what: str, workspace: int = 0,
               lm_cache: int = 0, lm_cache_terms: str = "") -> None:
    """Raise DoesNotFit (a GenerationError) that says how much is needed (weights + `workspace`) and how much
    is there. lm_cache: the part of `needed` that is the 5 Hz LM's KV cache, named apart with what it holds."""
    if free is None:
        return
    if needed + workspace > free:
        cpu = str(device).startswith("cpu")
        cache = (f" and {lm_cache / GB:.2f} GB for the 5 Hz LM's KV cache ({lm_cache_terms})" if lm_cache else "")
        where, more = "", "Use a machine with more RAM"
        if isinstance(free, ContainerRoom):  # the container's limit, not the host's memory, is what to raise
            where = (f" within the container's memory limit of {free.limit / GB:.1f} GB ({free.in_use / GB:.1f} GB "
                     f"of it in use, file cache aside)")
            more = "Raise the container's hard memory limit (ECS container `memory`, docker --memory)"
        raise DoesNotFit(
            f"{what} needs about {(needed - lm_cache) / GB:.1f} GB for weights{cache} plus {workspace / GB:.1f} GB "
            f"to generate, "
            f"but {device} has {free / GB:.1f} GB {'available' if cpu else 'free'}{where}. "
            + (f"{more}, serve fewer models (ACESTEP_CONFIG_PATH2/3), load in bf16 "
               "(ACESTEP_DTYPE=bfloat16: half of float32), quantise (ACESTEP_QUANTIZE=int8), or a smaller model "
               "(2B instead of XL)." if cpu else
               "Use a GPU with more memory, serve fewer models (ACESTEP_CONFIG_PATH2/3), quantise "
               "(ACESTEP_QUANTIZE=int8), or a smaller model (2B instead of XL)."))


def workspace_bytes(full_rate_channels: int, dtype_bytes: int) -> int:
    """Working memory of the smallest generation: one song, its decode tiled (one tile's working set),
    plus the runtime."""
    return RUNTIME_BYTES + vae_decode_bytes(1, TILE_SECONDS, full_rate_channels, dtype_bytes)


def decoder_channels(model_dir: Path) -> int:
    """The VAE decoder's full-rate width from `<model>/vae/config.json` (the published 128 when unreadable)."""
    try:
        vae = json.loads((model_dir / "vae" / "config.json").read_text())
        return int(vae["decoder_channels"]) * int(vae["channel_multiples"][0])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return 128


class ContainerRoom(int):
    """A CPU figure set by the container's memory limit rather than the host's memory: what the limit leaves,
    carrying the limit and the use it was read with, so a refusal names the limit an operator raises (the
    container's hard memory limit: ECS container `memory`, docker --memory). Arithmetic on it gives plain ints."""

    limit: int
    in_use: int

    def __new__(cls, room: int, limit: int, in_use: int) -> "ContainerRoom":
        figure = super().__new__(cls, room)
        figure.limit, figure.in_use = limit, in_use
        return figure

    def __getnewargs__(self) -> tuple[int, int, int]:  # pickle and copy rebuild it through __new__
        return int(self), self.limit, self.in_use


def free_bytes(device) -> Optional[int]:
    """Memory the models may take: a CUDA device's free memory; on CPU the system's available memory
    (Linux's MemAvailable, before this worker loads anything), and no more than the container's limit less its
    non-reclaimable use (a ContainerRoom when that is smaller); None where unknown."""
    if getattr(device, "type", str(device)) == "cuda":
        import torch

        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    if str(getattr(device, "type", device)) == "cpu":
        host = _meminfo("MemAvailable")
        cgroup = cgroup_memory()
        if cgroup is None:
            return host
        # Nothing is loaded yet: the container's inactive file cache is mostly the weights just downloaded,
        # which the kernel drops before it OOM-kills, so it is not counted as used (a refusal here is final).
        in_use = max(0, cgroup.usage - cgroup.inactive_file)
        room = max(0, cgroup.limit - in_use)
        return ContainerRoom(room, cgroup.limit, in_use) if host is None or room < host else host
    return None


MEMINFO = "/proc/meminfo"
PROCESS_STATUS = "/proc/self/status"
# The container's memory limit and use (docker --memory, an ECS container's `memory`): this process's own cgroup,
# named in /proc/self/cgroup, under v2's unified mount, else v1's memory controller's. Without a private cgroup
# namespace the mount's root is the whole host's, not the container's.
PROCESS_CGROUP = "/proc/self/cgroup"
CGROUP_V2_ROOT = "/sys/fs/cgroup"
CGROUP_V1_ROOT = "/sys/fs/cgroup/memory"


@dataclass(frozen=True)
class CgroupMemory:
    """One cgroup's memory limit, its use (page cache included) and, within that use, the inactive file cache
    (clean pages the kernel reclaims first), all file cache and the shared memory (tmpfs, shm) in it, in bytes."""

    limit: int
    usage: int
    inactive_file: int
    file: int = 0
    shmem: int = 0


def _read_text(path: Path) -> Optional[str]:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _stat_field(text: Optional[str], key: str) -> int:
    for line in (text or "").splitlines():
        name, _, value = line.partition(" ")
        if name == key and value.strip().isdigit():
            return int(value)
    return 0


def _own_cgroup() -> tuple[Path, bool]:
    """This process's cgroup folder and whether it is v2's: /proc/self/cgroup's line of v1's memory controller,
    else v2's "0::/path"; the mount's root where unreadable or where the path is not there (a private cgroup
    namespace shows "/", or a path outside what is mounted)."""
    v1, v2 = None, None
    for line in (_read_text(Path(PROCESS_CGROUP)) or "").splitlines():
        _hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if "memory" in controllers.split(","):
            v1 = path
        elif controllers == "" and path:
            v2 = path
    if v1 is None and (v2 is not None or (Path(CGROUP_V2_ROOT) / "memory.max").exists()):
        root, path, is_v2 = Path(CGROUP_V2_ROOT), v2 or "/", True
    else:
        root, path, is_v2 = Path(CGROUP_V1_ROOT), v1 or "/", False
    own = root / path.lstrip("/")
    return (own if own.is_dir() else root), is_v2


def cgroup_levels() -> list[CgroupMemory]:
    """The limits over this process: its own cgroup's and every ancestor's up to the mount's root (a parent's
    limit holds its children too: an ECS task's memory over its containers'), each with that cgroup's use and
    memory.stat (both hierarchical). v2: memory.max ("max" = no limit), memory.current, stat's inactive_file,
    file, shmem; v1: limit_in_bytes, usage_in_bytes, stat's total_inactive_file, total_cache, total_shmem (v1
    without a limit reads about 2**63, which the host's figure undercuts). Empty where none is set or readable."""
    folder, is_v2 = _own_cgroup()
    root = Path(CGROUP_V2_ROOT if is_v2 else CGROUP_V1_ROOT)
    names = (("memory.max", "memory.current", "inactive_file", "file", "shmem") if is_v2 else
             ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file", "total_cache", "total_shmem"))
    levels = []
    while True:
        limit, usage = _read_text(folder / names[0]), _read_text(folder / names[1])
        if limit is not None and usage is not None and limit.isdigit() and usage.isdigit():
            stat = _read_text(folder / "memory.stat")
            use = int(usage)
            levels.append(CgroupMemory(int(limit), use, *(min(use, _stat_field(stat, key)) for key in names[2:])))
        if folder == root or folder.parent == folder:
            return levels
        folder = folder.parent


def cgroup_memory() -> Optional[CgroupMemory]:
    """The cgroup whose limit leaves this process least, counting its inactive file cache as free (the start-up
    reading, free_bytes); None without a limit. MemAvailable is the host's and ignores the limit."""
    levels = cgroup_levels()
    return min(levels, key=lambda c: c.limit - (c.usage - c.inactive_file)) if levels else None


def cgroup_room(own_file: int) -> Optional[int]:
    """What the cgroups over this process may still take before the kernel OOM-kills it, for a decode now: the
    host's reckoning (MemAvailable less this process's RssFile) within each limit. The kernel reclaims page cache
    only at the limit, so a running container's use sits near it: all file cache but shared memory (tmpfs, shm,
    which cannot be dropped) counts as free, less this process's own resident file pages (its mmapped weights,
    which reclaim would only page back in: `own_file`). The smallest over the levels; None without a limit."""
    levels = cgroup_levels()
    if not levels:
        return None
    return min(max(0, c.limit - (c.usage - c.file + c.shmem) - own_file) for c in levels)


def _meminfo(key: str) -> Optional[int]:
    try:
        with open(MEMINFO) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def _own_file_backed_bytes() -> int:
    """This process's resident file-backed pages (RssFile): weights loaded by mmap from safetensors and the
    libraries. MemAvailable counts them as reclaimable page cache, but dropping them would only page the
    weights back in: they are not free for a decode."""
    try:
        with open(PROCESS_STATUS) as f:
            for line in f:
                if line.startswith("RssFile:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


# ---------------------------------------------------------------- VAE decode: tiled only when needed

SAMPLES_PER_LATENT_FRAME = 1920  # 48 kHz audio per 25 Hz latent frame (the VAE's hop)
SAMPLE_RATE = 48000
# The measured working set, as full-rate (48 kHz x decoder width) tensors alive at the peak per item, over the
# song plus a fixed length: bf16, 128 channels: 6.8 x 128 x 2 bytes x 48,000/s = 0.078 GiB per second of song,
# + 0.09 GiB (the fit of bench/vae_cpu.py's, bench/memory_table.py's and issue 25's figures). float32 measured
# at 1.67x bf16's, not 2x (bench/memory_measured.json: 10 s 1.31 vs 0.78 GiB, 30 s 3.89 vs 2.34).
_LIVE_FULL_RATE_TENSORS = 6.8
_FIXED_SECONDS = 1.2
_FLOAT32_DECODE_BYTES = 3.34  # per element: 1.67x bf16's 2
TILE_SECONDS = 512 / 25  # diffusers' AutoencoderOobleck.tile_latent_min_length: one tile's window
DECODE_HEADROOM = 0.8  # use at most this share of what is free (fragmentation, the allocator's rounding)


def vae_decode_bytes(items: int, seconds: float, full_rate_channels: int, dtype_bytes: int) -> int:
    """Working memory an untiled VAE decode of `items` songs of `seconds` needs at its peak (fitted to
    full-size measurements; a batch counts each item whole)."""
    samples = (math.ceil(seconds * 25) * SAMPLES_PER_LATENT_FRAME) + _FIXED_SECONDS * SAMPLE_RATE
    element = _FLOAT32_DECODE_BYTES if dtype_bytes == 4 else dtype_bytes
    return int(items * samples * full_rate_channels * element * _LIVE_FULL_RATE_TENSORS)


def tile_vae_decode(allowed: bool, needed: int, free: Optional[int]) -> bool:
    """Tile the VAE decode (+12 % time at 60 s on CPU, for the tiles' overlap) only when the request allows it
    and an untiled decode would not fit in what is free. Unknown free memory: untiled."""
    return allowed and free is not None and needed > free * DECODE_HEADROOM


def available_bytes(device) -> Optional[int]:
    """Memory a decode could use now: on CUDA the device's free memory plus what torch's allocator holds
    unused; on CPU the system's available memory less this process's own file-backed pages (its mmapped
    weights, which MemAvailable counts as free), and no more than the container's cgroup leaves (cgroup_room);
    None when unknown."""
    if getattr(device, "type", str(device)) == "cuda":
        import torch

        free, _total = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    available, own_file = _meminfo("MemAvailable"), _own_file_backed_bytes()  # /proc/self/status read once
    known = [f for f in (None if available is None else max(0, available - own_file), cgroup_room(own_file))
             if f is not None]
    return min(known) if known else None
