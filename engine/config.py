"""Engine settings (torch-free): which DiT models to load, from where, on what device."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Mapping, Optional

from engine.adapter_manifest import adapter_dirs
from engine.offload import parse_mode as offload_mode  # torch-free
from engine.quantize import parse_mode  # torch-free until a model is quantised

DEFAULT_MODEL = "acestep-v15-turbo"
_TRUE = {"1", "true", "yes", "y", "on"}


def model_name_from_path(path: str) -> str:
    """Upstream names a model by the basename of its config path (`.../acestep-v15-base/` -> `acestep-v15-base`)."""
    return os.path.basename(path.strip().rstrip("/\\"))


@dataclass
class EngineConfig:
    checkpoint_dir: str = "checkpoints"
    # First is the default model (request.model unset).
    model_names: list[str] = field(default_factory=lambda: [DEFAULT_MODEL])
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto (bf16/fp16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16
    allow_download: bool = True
    lm_model: Optional[str] = None  # the 5 Hz LM folder (name under checkpoint_dir, or a path); None: DiT only
    # Models served from their random-weight demo stand-in (<checkpoint_dir>/.demo/<name>) while their real
    # weights are missing: chosen at start-up (checkpoints.ensure_demo_models); real weights still win.
    demo_models: list[str] = field(default_factory=list)
    lm_backend: str = "auto"  # pt | vllm | auto (engine.lm.backend_choice)
    # Throughput (engine/speedups.py, engine/timing.py, engine/memory.py, engine/plan.py)
    stage_timings: bool = True  # per-stage times in generation_info (never synchronises the GPU)
    warmup: str = "auto"  # a tiny generation at load: auto (on for CUDA) | true | false
    length_bucket_seconds: float = 0.0  # batch tasks whose lengths share a bucket this wide (0: equal lengths)
    compile_dit: bool = False
    cuda_graphs: bool = False  # torch.compile mode "reduce-overhead" (implies compile_dit)
    compile_backend: str = "inductor"
    attention_backend: str = ""  # diffusers attention dispatcher backend for the DiT ("": its default)
    # LoRA/LoKr adapters (engine/adapters.py): where named ones live ("": <checkpoint_dir>/loras), where fetched
    # uploads are kept ("": <lora_dir>/.uploaded), and the memory the loaded ones may hold (least recently used out)
    lora_dir: str = ""
    adapter_cache_dir: str = ""
    adapter_budget_mb: int = 512
    # Only the running module on the accelerator (engine/offload.py): none | auto (when all would not fit) | modules
    offload: str = "auto"
    # The CPU VAE's fused Snake (decode and encode) compiled at load (engine/vae_fast.py): auto | true | false
    vae_compile: str = "auto"
    # The transformers LM's KV cache (engine/lm/transformers_backend.py): auto (static on CPU) | static | dynamic
    lm_kv_cache: str = "auto"
    # Weight-only quantisation after loading (engine/quantize.py): none | int8 | fp8, the DiT's and the LM's
    quantize: str = "none"
    quantize_lm: str = "none"

    def __post_init__(self) -> None:
        self.quantize = parse_mode(self.quantize, "ACESTEP_QUANTIZE_DIT")
        self.quantize_lm = parse_mode(self.quantize_lm, "ACESTEP_QUANTIZE_LM")

    @property
    def resolved_lora_dir(self) -> str:
        return adapter_dirs(self.checkpoint_dir, self.lora_dir, self.adapter_cache_dir)[0]

    @property
    def resolved_adapter_cache_dir(self) -> str:
        return adapter_dirs(self.checkpoint_dir, self.lora_dir, self.adapter_cache_dir)[1]

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "EngineConfig":
        """Read ACESTEP_CHECKPOINT_DIR, ACESTEP_CONFIG_PATH/2/3, ACESTEP_DEVICE, ACESTEP_DTYPE,
        ACESTEP_ALLOW_DOWNLOAD (default true; HF_HUB_OFFLINE=1 forces false), ACESTEP_LM_MODEL_PATH,
        ACESTEP_LM_BACKEND, ACESTEP_QUANTIZE (_DIT, _LM), ACESTEP_OFFLOAD, ACESTEP_VAE_COMPILE and ACESTEP_LM_KV_CACHE."""
        env = os.environ if env is None else env
        names: list[str] = []
        for key in ("ACESTEP_CONFIG_PATH", "ACESTEP_CONFIG_PATH2", "ACESTEP_CONFIG_PATH3"):
            raw = env.get(key, DEFAULT_MODEL if key == "ACESTEP_CONFIG_PATH" else "")
            name = model_name_from_path(raw) if raw.strip() else ""
            if name and name not in names:
                names.append(name)
        lm = env.get("ACESTEP_LM_MODEL_PATH", "").strip()
        return cls(
            checkpoint_dir=env.get("ACESTEP_CHECKPOINT_DIR", "checkpoints"),
            model_names=names or [DEFAULT_MODEL],
            device=env.get("ACESTEP_DEVICE", "auto") or "auto",
            dtype=env.get("ACESTEP_DTYPE", "auto") or "auto",
            allow_download=env.get("ACESTEP_ALLOW_DOWNLOAD", "true").strip().lower() in _TRUE,
            lm_model=model_name_from_path(lm) if lm else None,
            lm_backend=env.get("ACESTEP_LM_BACKEND", "auto").strip().lower() or "auto",
            lora_dir=env.get("ACESTEP_LORA_DIR", ""),
            adapter_cache_dir=env.get("ACESTEP_ADAPTER_CACHE", ""),
            adapter_budget_mb=int(env.get("ACESTEP_ADAPTER_CACHE_MB", "512") or 512),
            offload=offload_mode(env.get("ACESTEP_OFFLOAD", "auto")),
            vae_compile=env.get("ACESTEP_VAE_COMPILE", "auto").strip().lower() or "auto",
            lm_kv_cache=env.get("ACESTEP_LM_KV_CACHE", "auto").strip().lower() or "auto",
            # ACESTEP_QUANTIZE for both models; ACESTEP_QUANTIZE_DIT / _LM override it per model
            quantize=env.get("ACESTEP_QUANTIZE_DIT", "").strip() or env.get("ACESTEP_QUANTIZE", "none"),
            quantize_lm=env.get("ACESTEP_QUANTIZE_LM", "").strip() or env.get("ACESTEP_QUANTIZE", "none"),
        )

    @property
    def default_model(self) -> str:
        return self.model_names[0]

    def downloads_possible(self, env: Mapping[str, str] | None = None) -> bool:
        env = os.environ if env is None else env
        offline = env.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE
        return self.allow_download and not offline
