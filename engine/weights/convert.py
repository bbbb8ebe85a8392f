"""Convert one DiT of ACE-Step's original layout into the diffusers layout that `AceStepPipeline.from_pretrained`
loads, and (for tiny test models) export a pipeline back into the original layout.

The original layout and the key/config mapping are described in engine/weights/original_layout.py. The conversion is
strict: every source key must land on a parameter or buffer of a component, every parameter and persistent buffer
must be filled, shapes must match (else ConversionError naming the key and both shapes). Tensors keep the dtype
they are stored in.
"""
from __future__ import annotations

import filecmp
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

import torch
from diffusers import AceStepPipeline, AceStepTransformer1DModel, AutoencoderOobleck, FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.ace_step.modeling_ace_step import (
    AceStepAudioTokenDetokenizer,
    AceStepAudioTokenizer,
    AceStepConditionEncoder,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoTokenizer

from engine.weights import original_layout as layout
from engine.weights.atomic_dir import build_then_swap, exclusive_lock, mkdirs_readable, share_readable
from engine.weights.demo_marker import DEMO_MARKER
from engine.weights.original_layout import ConversionError

log = logging.getLogger("engine.weights.convert")

COMPONENT_CLASSES = {
    "transformer": AceStepTransformer1DModel,
    "condition_encoder": AceStepConditionEncoder,
    "audio_tokenizer": AceStepAudioTokenizer,
    "audio_token_detokenizer": AceStepAudioTokenDetokenizer,
}
_MAX_PROBLEMS_SHOWN = 20


# ---------------------------------------------------------------- original -> diffusers
def convert_original(root: str | Path, name: str, dst: str | Path) -> Path:
    """Convert DiT `name` under `root` (original layout) into a diffusers-layout folder `dst`, atomically."""
    dst = Path(dst)
    with exclusive_lock(dst), build_then_swap(dst) as tmp:
        write_diffusers_layout(root, name, tmp)
    return dst


def write_diffusers_layout(root: str | Path, name: str, out_dir: Path) -> None:
    """Build the pipeline from the original files and `save_pretrained` it into `out_dir` (not atomic by itself)."""
    root = Path(root)
    missing = layout.missing_parts(root, name)
    if missing:
        raise ConversionError(f"original-layout model {name!r} under {root} is incomplete; missing: "
                              + ", ".join(missing))
    dit = layout.dit_dir(root, name)
    components = build_dit_components(dit)
    vae_dir = layout.shared_dir(root, name, layout.VAE_DIR)  # the DiT folder's own (XL repos bundle one), or root's
    text_dir = layout.shared_dir(root, name, layout.TEXT_ENCODER_DIR)
    vae = AutoencoderOobleck.from_pretrained(str(vae_dir), torch_dtype=stored_dtype(vae_dir))
    # diffusers records the folder it loaded from; a fixed name keeps the output independent of where SRC is.
    vae.register_to_config(_name_or_path=layout.VAE_DIR)
    pipe = AceStepPipeline(
        vae=vae,
        text_encoder=AutoModel.from_pretrained(str(text_dir), dtype=stored_dtype(text_dir)),
        tokenizer=AutoTokenizer.from_pretrained(str(text_dir)),
        # ACE-Step feeds its own sigmas in [0, 1]: the scheduler must pass them through unchanged.
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1, shift=1.0),
        **components,
    )
    pipe.save_pretrained(str(out_dir))
    if (dit / DEMO_MARKER).is_file():  # a random-weight demo stays labelled as one
        shutil.copy2(dit / DEMO_MARKER, out_dir / DEMO_MARKER)


def build_dit_components(dit: Path) -> dict[str, torch.nn.Module]:
    """The four DiT-side components, built from config.json and filled from the state dict + silence_latent.pt."""
    configs = layout.component_configs(layout.read_config(dit), source=str(dit / layout.CONFIG_FILE))
    by_component = split_by_component(load_original_state_dict(dit))
    by_component["condition_encoder"][layout.SILENCE_BUFFER] = load_silence_latent(dit)
    problems: list[str] = []
    modules = {}
    for component, cls in COMPONENT_CLASSES.items():
        # On the meta device: no memory and no random init for weights that are overwritten anyway.
        with torch.device("meta"):
            module = cls(**configs[component])
        problems += mismatches(component, module, by_component[component])
        modules[component] = module
    if problems:
        shown = problems[:_MAX_PROBLEMS_SHOWN]
        more = len(problems) - len(shown)
        raise ConversionError(f"{dit} does not match its config.json ({len(problems)} problem(s)):\n  "
                              + "\n  ".join(shown) + (f"\n  ... and {more} more" if more else ""))
    for component, module in modules.items():
        module.load_state_dict(by_component[component], strict=True, assign=True)
        module.eval()
    return modules


def load_original_state_dict(dit: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in layout.weight_files(dit):
        for key, tensor in load_file(str(file)).items():
            if key in state:
                raise ConversionError(f"key {key!r} appears in more than one shard of {dit}")
            state[key] = tensor
    return state


def split_by_component(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Original keys -> {component: {diffusers key: tensor}}; a key that belongs to no component is an error."""
    out: dict[str, dict[str, torch.Tensor]] = {c: {} for c in layout.DIT_COMPONENTS}
    unmapped = []
    for key, tensor in state.items():
        target = layout.diffusers_key(key)
        if target is None:
            unmapped.append(key)
        else:
            out[target[0]][target[1]] = tensor
    if unmapped:
        raise ConversionError(f"{len(unmapped)} key(s) of the state dict belong to no pipeline component: "
                              + ", ".join(repr(k) for k in sorted(unmapped)[:_MAX_PROBLEMS_SHOWN]))
    return out


def load_silence_latent(dit: Path) -> torch.Tensor:
    """silence_latent.pt holds [1, channels, frames]; the condition encoder's buffer is [1, frames, channels]."""
    path = dit / layout.SILENCE_LATENT
    latent = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(latent, torch.Tensor) or latent.dim() != 3:
        shape = tuple(latent.shape) if isinstance(latent, torch.Tensor) else type(latent).__name__
        raise ConversionError(f"{path} should hold a [1, channels, frames] tensor, not {shape}")
    return latent.transpose(1, 2).contiguous()


def mismatches(component: str, module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> list[str]:
    """Every key the module does not have, every parameter/buffer left unfilled, and every shape mismatch."""
    expected = {key: tuple(t.shape) for key, t in module.state_dict().items()}
    problems = []
    for key, tensor in sorted(tensors.items()):
        source = _source_name(component, key)
        if key not in expected:
            problems.append(f"unexpected key {source}: {component} has no {key!r}")
        elif tuple(tensor.shape) != expected[key]:
            problems.append(f"shape mismatch for {source} ({component} {key!r}): checkpoint "
                            f"{tuple(tensor.shape)}, config.json expects {expected[key]}")
    for key in sorted(set(expected) - set(tensors)):
        problems.append(f"missing key {_source_name(component, key)}: {component} {key!r} would stay unfilled")
    return problems


def _source_name(component: str, key: str) -> str:
    if component == "condition_encoder" and key == layout.SILENCE_BUFFER:
        return repr(layout.SILENCE_LATENT)
    return repr(layout.original_key(component, key))


def stored_dtype(folder: Path) -> Optional[torch.dtype]:
    """The dtype of the first floating-point tensor in the folder's safetensors files (None: none found)."""
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                dtype = f.get_slice(key).get_dtype()
                if dtype in _SAFETENSORS_FLOATS:
                    return _SAFETENSORS_FLOATS[dtype]
    return None


_SAFETENSORS_FLOATS = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


# ---------------------------------------------------------------- diffusers -> original (tiny test models)
def export_original_layout(pipe: AceStepPipeline, root: str | Path, name: str, shards: int = 1,
                           marker: Optional[dict] = None) -> Path:
    """Write `pipe` as ACE-Step's original layout: <root>/<name>/ (config.json, weights, silence_latent.pt) and the
    shared <root>/vae/ and <root>/Qwen3-Embedding-0.6B/ (rewritten only when their contents change, so a second DiT
    exported with the same seed leaves them, and caches keyed on them, alone). Returns the DiT folder."""
    root = Path(root)
    dit = layout.dit_dir(root, name)
    mkdirs_readable(dit)
    configs = {c: dict(getattr(pipe, c).config) for c in layout.DIT_COMPONENTS}
    (dit / layout.CONFIG_FILE).write_text(json.dumps(layout.flat_config(configs), indent=2) + "\n")
    state = {}
    for component in layout.DIT_COMPONENTS:
        for key, tensor in getattr(pipe, component).state_dict().items():
            if not (component == "condition_encoder" and key == layout.SILENCE_BUFFER):
                state[layout.original_key(component, key)] = tensor.detach().contiguous()
    _save_weights(dit, state, shards)
    silence = pipe.condition_encoder.silence_latent.detach().transpose(1, 2).contiguous().clone()
    torch.save(silence, str(dit / layout.SILENCE_LATENT))
    if marker is not None:
        (dit / DEMO_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    _write_if_changed(root / layout.VAE_DIR, lambda out: pipe.vae.save_pretrained(str(out)))
    _write_if_changed(root / layout.TEXT_ENCODER_DIR, lambda out: (pipe.text_encoder.save_pretrained(str(out)),
                                                                   pipe.tokenizer.save_pretrained(str(out))))
    share_readable(dit)
    return dit


def _save_weights(dit: Path, state: dict[str, torch.Tensor], shards: int) -> None:
    for stale in [dit / layout.SINGLE_WEIGHTS, dit / layout.SHARD_INDEX, *dit.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)
    if shards <= 1:
        save_file(state, str(dit / layout.SINGLE_WEIGHTS))
        return
    keys = list(state)
    weight_map = {}
    for i in range(shards):
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i::shards]
        save_file({k: state[k] for k in part}, str(dit / shard))
        weight_map.update({k: shard for k in part})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
             "weight_map": weight_map}
    (dit / layout.SHARD_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def _write_if_changed(dst: Path, write: Callable[[Path], object]) -> None:
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.tmp-"))
    try:
        write(tmp)
        if dst.is_dir() and _same_files(tmp, dst):
            share_readable(dst)  # written by an older version as mkdtemp left it (0700)
            return
        share_readable(tmp)
        if dst.exists():
            shutil.rmtree(dst)
        tmp.rename(dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _same_files(a: Path, b: Path) -> bool:
    names_a = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
    names_b = sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file())
    return names_a == names_b and all(filecmp.cmp(a / n, b / n, shallow=False) for n in names_a)
