"""Upstream `acestep-api` environment variables this server does not read, and why.

A deployment moved from upstream keeps its environment; a variable that silently does nothing
would look like it works. The entry points log one warning at start naming each one that is set.
ACESTEP_TMPDIR is honoured (temporary files go there).
"""
from __future__ import annotations

import logging
import os
import tempfile
from typing import Mapping

log = logging.getLogger(__name__)

NOT_USED: dict[str, str] = {
    "ACESTEP_OFFLOAD_TO_CPU": "models stay on ACESTEP_DEVICE; the worker checks at start that they fit",
    "ACESTEP_OFFLOAD_DIT_TO_CPU": "models stay on ACESTEP_DEVICE",
    "ACESTEP_LM_OFFLOAD_TO_CPU": "the 5 Hz LM stays on ACESTEP_LM_DEVICE",
    "ACESTEP_VAE_ON_CPU": "the VAE runs on ACESTEP_DEVICE",
    "ACESTEP_GPU_MAPPING": "a worker runs every component on ACESTEP_DEVICE (one worker per GPU)",
    "ACESTEP_USE_FLASH_ATTENTION": "torch/diffusers pick the attention kernel",
    "ACESTEP_API_WORKERS": "the API is one process; generation workers are ACESTEP_QUEUE_WORKERS",
    "ACESTEP_DOWNLOAD_SOURCE": "models come from the Hugging Face hub (or the AWS stack's S3 mirror)",
    "ACESTEP_VAE_DECODE_CHUNK_SIZE": "tiled decoding is the request field use_tiled_decode",
    "ACESTEP_MPS_DECODE_OFFLOAD": "no MPS-specific offload",
    "ACESTEP_DISABLE_TQDM": "progress bars are always off (progress is in /query_result)",
    "ACESTEP_DEBUG_STATS": "timings are in every result's generation_info and in /v1/stats",
    "ACESTEP_CONDA_ENV": "read by upstream's launcher scripts only",
}


def warn_unused_upstream_env(env: Mapping[str, str]) -> list[str]:
    """Log one warning listing the set upstream variables this server ignores; apply ACESTEP_TMPDIR.

    Returns the names warned about.
    """
    tmpdir = env.get("ACESTEP_TMPDIR")
    if tmpdir:
        os.makedirs(tmpdir, exist_ok=True)
        tempfile.tempdir = tmpdir
        os.environ["TMPDIR"] = tmpdir  # worker processes inherit it
    names = [name for name in NOT_USED if env.get(name)]
    if names:
        log.warning("upstream settings not used by this server: %s",
                    "; ".join(f"{name} ({NOT_USED[name]})" for name in names))
    return names


__all__ = ["NOT_USED", "warn_unused_upstream_env"]
