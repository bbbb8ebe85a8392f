"""The CPU as a real target: which dtype it runs fast, and OpenMP settings that do not spin on shared cores.

Torch-free at import: the worker's entry point calls `passive_omp_wait_policy` before anything imports torch
(OpenMP reads its environment once, when the library loads).

- dtype: bf16 where the CPU computes it natively (AMX-BF16 or AVX512-BF16 on x86, the BF16 extension on
  Arm); there a 30 s song took 82 s / 8.6 GiB against 136 s / 17.4 GiB in float32 (issue 25, measured
  with full-size random weights). Without them bf16 is emulated and slower than float32, so float32 stays.
- OMP_WAIT_POLICY=PASSIVE: OpenMP's worker threads sleep instead of spinning between parallel regions.
  On cores shared with the API, the encoders and other workers, one DiT step took 18 s with the default
  policy and 2.2 s with PASSIVE. A value the user set is kept.
"""
from __future__ import annotations

import os
from typing import Iterable, MutableMapping, Optional

# /proc/cpuinfo flags (x86 "flags", Arm "Features") that mean native bf16 arithmetic
BF16_FLAGS = {"amx_bf16": "AMX-BF16", "avx512_bf16": "AVX512-BF16", "bf16": "Arm BF16"}


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> Optional[set[str]]:
    """The first CPU's feature flags, or None where /proc/cpuinfo is not there to say (not Linux)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip().lower() in ("flags", "features"):
                    return set(value.split())
    except OSError:
        pass
    return None


def native_bf16(flags: Optional[Iterable[str]]) -> Optional[str]:
    """The name of the CPU feature that computes bf16 natively, or None."""
    present = set(flags or ())
    for flag, name in BF16_FLAGS.items():
        if flag in present:
            return name
    return None


def auto_cpu_dtype(flags: Optional[Iterable[str]]) -> tuple[str, str]:
    """(dtype name, why) for ACESTEP_DTYPE=auto on CPU."""
    feature = native_bf16(flags)
    if feature:
        return "bfloat16", f"auto: bfloat16 on CPU (the CPU has {feature})"
    return "float32", "auto: float32 on CPU (no AMX-BF16 / AVX512-BF16 / Arm BF16: bf16 would be emulated, slower)"


def passive_omp_wait_policy(env: MutableMapping[str, str] = os.environ) -> bool:
    """Set OMP_WAIT_POLICY=PASSIVE unless the user chose a policy; True when it was set here."""
    if env.get("OMP_WAIT_POLICY", "").strip():
        return False
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    return True

