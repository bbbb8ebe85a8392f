"""Which runtime runs the 5 Hz LM: ACESTEP_LM_BACKEND = pt | vllm | auto (torch-free, imports no runtime).

    pt    transformers (engine.lm.transformers_backend), CPU or GPU: the reference.
    vllm  stock vLLM (engine.lm.vllm_backend): required; the worker refuses to start without it.
    auto  vLLM when it is installed, else transformers with a logged warning (the default).

Upstream's `vllm` quietly falls back to PyTorch when its vLLM cannot start; here `vllm` is strict so a
deployment that asked for it never runs slower without saying so, and `auto` is the forgiving choice.
"""
from __future__ import annotations

import importlib.util
import logging

log = logging.getLogger("engine.lm")

BACKENDS = ("pt", "vllm", "auto")


class LMBackendUnavailable(RuntimeError):
    """The configured LM backend cannot run here (the message says what to install or set)."""


def vllm_installed() -> bool:
    """True when `import vllm` can work (looked up without importing it: vLLM's import takes seconds)."""
    try:
        return importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):
        return False


def quantize_refusal(backend: str, quantize_lm: str) -> str | None:
    """Why the 5 Hz LM cannot start on `backend` with weight-only quantisation `quantize_lm` (ACESTEP_QUANTIZE_LM,
    which is ACESTEP_QUANTIZE's value when unset), or None. vLLM quantises through its own `quantization=`, which
    this setting does not reach yet. The worker's load refuses it; `cdk synth` does too (infra/worker_engine.py)."""
    if backend != "vllm" or quantize_lm in ("", "none"):
        return None
    return (f"ACESTEP_QUANTIZE_LM={quantize_lm} (ACESTEP_QUANTIZE's value when ACESTEP_QUANTIZE_LM is unset) is not "
            "wired to the vLLM backend yet (ACESTEP_LM_BACKEND=vllm, or auto where vLLM is installed); set "
            "ACESTEP_QUANTIZE_LM=none (the DiT keeps ACESTEP_QUANTIZE), or ACESTEP_LM_BACKEND=pt")


def resolve_backend(choice: str | None) -> str:
    """"pt" or "vllm" for a configured choice; LMBackendUnavailable when vllm is required and missing."""
    name = (choice or "auto").strip().lower()
    if name not in BACKENDS:
        raise LMBackendUnavailable(f"ACESTEP_LM_BACKEND={choice!r} is not one of {', '.join(BACKENDS)}")
    if name == "pt":
        return "pt"
    if vllm_installed():
        return "vllm"
    if name == "vllm":
        raise LMBackendUnavailable(
            "ACESTEP_LM_BACKEND=vllm but vLLM is not installed in this environment: install it (GPU: the "
            "`gpu` extra or the worker image built with --build-arg WITH_VLLM=true; CPU: `make vllm-venv`), "
            "or set ACESTEP_LM_BACKEND=pt (transformers) or auto (vLLM when installed, else transformers)")
    log.warning("ACESTEP_LM_BACKEND=auto: vLLM is not installed, the 5 Hz LM runs on transformers (pt)")
    return "pt"
