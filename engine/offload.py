"""Offload for small GPUs (ACESTEP_OFFLOAD): only the module that is running sits on the accelerator.

A generation runs its modules one after another -- text encoder, 5 Hz LM, DiT, VAE -- so a card that cannot
hold all of them can still hold the largest one plus the working memory. With offload on, every module waits in
host memory and moves to the accelerator just before it runs (a forward pre-hook on each of its submodules),
sending the one that ran before back. Upstream's `offload_to_cpu` / `offload_dit_to_cpu` init options do the
same per model; here the policy is one setting:

- none: everything resident (fastest).
- modules: offload always.
- auto (the default): offload when the fit check says the resident set does not fit the device but the largest
  module does (with the working memory on top in both cases).

The VAE decode falls back to the CPU when even its tiled working set would not fit beside the VAE's weights.
The decision (`decide`, `fit_bytes`, `load_on_device`) is pure and torch-free; `Offloader` moves the loaded modules.
A vLLM LM lives in its own process and memory (sized by engine/lm/vllm_backend.py) and is not moved.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Optional

if TYPE_CHECKING:
    import torch

MODES = ("none", "auto", "modules")
GB = 1024**3
# A pipeline's components per stage; the audio tokenizers (a few MB, called through methods other than forward,
# so no hook sees them start) stay on the device
STAGE_OF_COMPONENT = {"text_encoder": "text_encoder", "transformer": "dit", "condition_encoder": "dit", "vae": "vae"}
RESIDENT_COMPONENTS = ("audio_tokenizer", "audio_token_detokenizer")


def parse_mode(value: str, setting: str = "ACESTEP_OFFLOAD") -> str:
    mode = (value or "none").strip().lower()
    if mode not in MODES:
        raise ValueError(f"{setting}={value!r}: use one of {', '.join(MODES)}")
    return mode


def stage_bytes(model_dir: Path, dtype: str, skip_components: Iterable[str] = (), **weights) -> dict[str, int]:
    """Weight bytes of one model folder per stage (engine/memory.weight_bytes per component, `weights` its
    other arguments), the always-resident components under "resident"; shared `skip_components` left out."""
    from engine import memory

    skip = set(skip_components)
    components = {f.relative_to(model_dir).parts[0] for f in model_dir.rglob("*.safetensors")} - skip
    sizes: dict[str, int] = {}
    for component in sorted(components):
        stage = STAGE_OF_COMPONENT.get(component, "resident")
        size = memory.weight_bytes(model_dir, dtype, skip_components=(components - {component}) | skip, **weights)
        sizes[stage] = sizes.get(stage, 0) + size
    return sizes


def largest_stage(sizes: dict[str, int]) -> int:
    """What must fit on the device at once under offload: the largest stage plus the always-resident parts."""
    return max((v for k, v in sizes.items() if k != "resident"), default=0) + sizes.get("resident", 0)


def fit_bytes(mode: str, resident: int, largest: int, device_type: str = "cuda") -> int:
    """Weight bytes the fit check asks for while loading: all of them without offload or on the CPU (where
    host memory holds everything anyway), else the largest stage (auto then decides, once everything is
    counted, whether it must offload)."""
    return resident if mode == "none" or device_type == "cpu" else largest


def load_on_device(mode: str, needed: int, workspace: int, free: Optional[int]) -> bool:
    """Whether a model being loaded goes straight to the device: always without offload, never when it is
    forced, and under auto while everything loaded so far (`needed`) still fits beside the working memory."""
    if mode == "none":
        return True
    return mode == "auto" and (free is None or needed + workspace <= free)


@dataclass(frozen=True)
class Decision:
    """Whether to offload, why, and the bytes the fit check must find free for it."""
    offload: bool
    reason: str
    needed: int  # weights that must be on the device at once (all of them, or the largest module)


def decide(mode: str, resident: int, largest: int, free: Optional[int], workspace: int,
           device_type: str = "cuda") -> Decision:
    """The offload decision for weights of `resident` bytes in all, `largest` for the biggest single module,
    on a device with `free` bytes (None: unknown) and `workspace` bytes of working memory."""
    if mode == "modules":
        return Decision(True, "set: modules (ACESTEP_OFFLOAD)", largest)
    if mode == "none":
        return Decision(False, "set: none (ACESTEP_OFFLOAD)", resident)
    if device_type == "cpu" or free is None:
        why = "nothing to offload to on CPU" if device_type == "cpu" else "free memory unknown"
        return Decision(False, f"auto: off ({why})", resident)
    if resident + workspace <= free:
        return Decision(False, f"auto: off (all {resident / GB:.1f} GB of weights + {workspace / GB:.1f} GB "
                               f"working memory fit in {free / GB:.1f} GB)", resident)
    if largest + workspace <= free:
        return Decision(True, f"auto: on ({resident / GB:.1f} GB of weights + {workspace / GB:.1f} GB do not fit in "
                              f"{free / GB:.1f} GB; the largest module, {largest / GB:.1f} GB, does)", largest)
    return Decision(False, f"auto: off (not even the largest module, {largest / GB:.1f} GB, fits)", resident)


def decode_on_cpu(decode_bytes: int, free_at_decode: Optional[int], headroom: float = 0.8) -> bool:
    """The VAE decode falls back to the CPU when its working set would not fit in what the device has free
    once only the VAE is on it (unknown: stay on the device)."""
    return free_at_decode is not None and decode_bytes > free_at_decode * headroom


# ---------------------------------------------------------------- applying the policy to loaded modules

def vae_decode_bytes(pipe, items: int, seconds: float, tiled: bool) -> int:
    """The VAE decode's working set for a call (engine/memory's fit to full-size measurements)."""
    import torch

    from engine import memory

    vae = pipe.vae.config
    channels = int(vae.decoder_channels) * int(vae.channel_multiples[0])
    dtype_bytes = torch.tensor([], dtype=pipe.vae.dtype).element_size()
    return memory.vae_decode_bytes(items, memory.TILE_SECONDS if tiled else seconds, channels, dtype_bytes)


def module_bytes(modules: Iterable["torch.nn.Module"]) -> int:
    seen: set[int] = set()
    total = 0
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
    return total


class Offloader:
    """Keeps one group of modules (a stage of one model) on `device` at a time, the rest on `home` (the CPU).

    Groups are registered by key; entering a group (its forward pre-hooks do it) moves the others' modules home
    first, then its own to the device. A module shared by several groups (one text encoder for two models)
    moves once. `on_moved` callbacks run after a group moved (the LM's output head keeps views of its weight)."""

    def __init__(self, device: "torch.device", home: Optional["torch.device"] = None):
        import torch

        self.device = device
        self.home = home if home is not None else torch.device("cpu")
        self.groups: dict[str, list["torch.nn.Module"]] = {}
        self.stage_of: dict[str, str] = {}
        self.on_moved: dict[str, list[Callable[[], None]]] = {}
        self.current: Optional[str] = None
        self.placement: dict[str, str] = {}  # group -> "device" | "home": where this offloader put it
        self.vae_home: set[str] = set()  # VAE groups that decode on the CPU for the current call
        self.moves = 0
        self._handles: list = []
        self._hooked: set[int] = set()
        self.sizes: dict[str, int] = {}

    def add(self, key: str, stage: str, modules: Iterable[Optional["torch.nn.Module"]],
            on_moved: Optional[Callable[[], None]] = None) -> None:
        present = [m for m in modules if m is not None]
        if not present:
            return
        self.groups[key], self.stage_of[key] = present, stage
        self.sizes[key] = module_bytes(present)
        if on_moved is not None:
            self.on_moved.setdefault(key, []).append(on_moved)
        for module in present:
            if id(module) in self._hooked:  # shared with a group added before: its hooks enter that group
                continue
            self._hooked.add(id(module))
            for sub in module.modules():
                self._handles.append(sub.register_forward_pre_hook(lambda _m, _a, k=key: self.enter(k)))
        self._place(key, False)

    def inputs_follow(self, module: "torch.nn.Module") -> None:
        """Move `module`'s tensor inputs to where its weights are (the VAE decoder, when it decodes on the CPU
        while the DiT's latents are on the device)."""
        def follow(mod, args):
            where = next(mod.parameters()).device
            return tuple(a.to(where) if hasattr(a, "to") and getattr(a, "device", where) != where else a for a in args)

        self._handles.append(module.register_forward_pre_hook(follow))

    def enter(self, key: str) -> None:
        """Put group `key` on the device (on the CPU when it is a VAE decoding there) and every other home."""
        if self.current == key:
            return
        keep = {id(m) for m in self.groups[key]}
        for other in self.groups:
            if other != key and self.placement.get(other) != "home":
                self._place(other, False, skip=keep)
        self._place(key, key not in self.vae_home)
        self.current = key

    def free_at_stage(self, key: str, available: Optional[int]) -> Optional[int]:
        """What the device will have free while group `key` runs alone, from what it has `available` now."""
        if available is None:
            return None
        leaving = sum(self.sizes[k] for k, where in self.placement.items() if where == "device" and k != key)
        coming = self.sizes[key] if self.placement.get(key) != "device" else 0
        return max(0, available + leaving - coming)

    def decode_home(self, key: str, on_cpu: bool) -> None:
        """For the next call: the VAE of group `key` decodes on the CPU (or on the device again)."""
        if on_cpu:
            self.vae_home.add(key)
        else:
            self.vae_home.discard(key)
        if self.current == key:
            self.current = None  # re-place on the next entry

    def _place(self, key: str, on_device: bool, skip: Optional[set[int]] = None) -> None:
        for module in self.groups[key]:
            if skip is None or id(module) not in skip:
                module.to(self.device if on_device else self.home)
        self.moves += 1
        self.placement[key] = "device" if on_device else "home"
        for callback in self.on_moved.get(key, []):
            callback()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def pipeline_groups(name: str) -> dict[str, str]:
    """Offloader keys of one model's stages."""
    return {stage: f"{name}/{stage}" for stage in ("text_encoder", "dit", "vae")}


def install(device: "torch.device", pipes: dict, lm_backend=None,
            home: Optional["torch.device"] = None) -> Offloader:
    """An Offloader over every loaded model's stages (name -> AceStepPipeline) and a transformers LM's model
    (a vLLM one keeps its own memory); everything starts at home."""
    import torch

    offloader = Offloader(device, home)
    lm_model = getattr(lm_backend, "model", None)
    if isinstance(lm_model, torch.nn.Module):
        offloader.add("lm", "lm", [lm_model], on_moved=lambda: _refresh_head(lm_backend))
    for name, pipe in pipes.items():
        keys = pipeline_groups(name)
        offloader.add(keys["text_encoder"], "text_encoder", [pipe.text_encoder])
        offloader.add(keys["dit"], "dit", [pipe.transformer, pipe.condition_encoder])
        offloader.add(keys["vae"], "vae", [pipe.vae])
        offloader.inputs_follow(pipe.vae.decoder)
        for name in RESIDENT_COMPONENTS:  # small, and called through methods other than forward
            if getattr(pipe, name, None) is not None:
                getattr(pipe, name).to(device)
    return offloader


def _refresh_head(backend) -> None:
    """The transformers LM's trimmed output head holds views of the head weight: cut them again from the moved
    weight, or the old copy would stay alive on the device it left."""
    head = getattr(backend, "head", None)
    if head is not None:
        backend.head = type(head).of(backend.model, head.block_rows)


__all__ = ["Decision", "MODES", "Offloader", "decide", "decode_on_cpu", "fit_bytes", "install",
           "largest_stage", "load_on_device", "parse_mode", "pipeline_groups", "stage_bytes"]
