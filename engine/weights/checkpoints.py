"""Finding, downloading and faking checkpoints (fingerprinting their components: engine/weights/fingerprint.py).

Two layouts are found under the checkpoint dir. The diffusers layout (what `AceStepPipeline.save_pretrained`
writes and the diffusers-format repos hold) is loaded as it is:
    <checkpoint_dir>/<model-name>/model_index.json
    <checkpoint_dir>/<model-name>/{transformer,condition_encoder,vae,text_encoder,tokenizer,scheduler,...}/
ACE-Step's original layout (how the official 2B models are published; engine/weights/original_layout.py) is converted
once into <checkpoint_dir>/.diffusers/<model-name>/ (engine/weights/converted_cache.py) and loaded from there:
    <checkpoint_dir>/<model-name>/{config.json,model.safetensors,silence_latent.pt}
    <checkpoint_dir>/vae/, <checkpoint_dir>/Qwen3-Embedding-0.6B/
A random-weight demo built because real weights are missing lives apart, in <checkpoint_dir>/.demo/<model-name>/
(diffusers layout, with the acestep_demo.json marker), and is served only while the real weights are missing and
the start-up chose it (EngineConfig.demo_models): real weights always win. A demo found in a real model's folder
(`acestep-models make-tiny`, or an older version of this service) is moved there before real weights are fetched.

Import is torch-free; building a tiny checkpoint or converting imports torch lazily.
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Mapping, Optional

from engine.weights import original_layout
from engine.weights import model_sources
from engine.config import EngineConfig
from engine.request import TASK_TYPES
from engine.types import GenerationError
from engine.weights.demo_marker import DEMO_MARKER, is_random, read_marker

log = logging.getLogger("engine.weights.checkpoints")

DEMO_DIR = ".demo"  # <checkpoint_dir>/.demo/<name>: the demo stand-in of a model whose real weights are missing
DEMO_NOTICE = "random weights: the audio is noise"
# Upstream's constants: turbo (guidance-distilled) DiTs officially support only these; base/sft support all.
TURBO_TASK_TYPES = ("text2music", "cover", "repaint")
ALL_TASK_TYPES = tuple(TASK_TYPES)
# Components that are identical across DiT variants in practice; the engine checks file contents before sharing.
SHAREABLE_COMPONENTS = ("vae", "text_encoder", "tokenizer", "condition_encoder", "audio_tokenizer",
                        "audio_token_detokenizer")


class ModelNotFound(GenerationError):
    """A configured model is not on disk and cannot be downloaded; the message says how to fix it."""


def model_dir(checkpoint_dir: str | os.PathLike, name: str) -> Path:
    return Path(checkpoint_dir) / name


def demo_model_dir(checkpoint_dir: str | os.PathLike, name: str) -> Path:
    return Path(checkpoint_dir) / DEMO_DIR / name


def is_complete(path: Path) -> bool:
    """model_index.json is present, every component it lists has its folder, and no download into it is under way."""
    index = path / "model_index.json"
    if model_sources.is_downloading(path):
        return False
    if not index.is_file():
        return False
    try:
        entries = json.loads(index.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    for key, value in entries.items():
        if key.startswith("_") or not isinstance(value, list) or value[0] is None:
            continue
        if not (path / key).is_dir():
            return False
    return True


def local_layout(checkpoint_dir: str | os.PathLike, name: str) -> Optional[str]:
    """"diffusers" or "original" for a model present under `checkpoint_dir`, None when neither is complete (or a
    download into its folder has not finished)."""
    if model_sources.is_downloading(model_dir(checkpoint_dir, name)):
        return None
    if is_complete(model_dir(checkpoint_dir, name)):
        return "diffusers"
    if not original_layout.missing_parts(checkpoint_dir, name):
        return "original"
    return None


def supported_task_types(name: str, marker: Optional[dict] = None, is_turbo: Optional[bool] = None) -> tuple:
    """The rule: a `task_types` list in the checkpoint's marker wins; otherwise a turbo DiT (transformer config
    `is_turbo`, or "turbo" in the model name) supports text2music/cover/repaint and any other (base, sft) all six."""
    if marker and marker.get("task_types"):
        return tuple(t for t in ALL_TASK_TYPES if t in marker["task_types"])
    turbo = is_turbo if is_turbo is not None else "turbo" in name.lower()
    return TURBO_TASK_TYPES if turbo else ALL_TASK_TYPES


def is_xl(transformer_config: Mapping, condition_encoder_config: Mapping) -> bool:
    """An XL DiT, by its own configs rather than its name: its transformer is wider than the condition encoder that
    feeds it (2560 over 2048 published; a 2B's are equal). Upstream runs the XL's timbre encoder differently
    (engine/xl_timbre.py)."""
    return int(transformer_config["hidden_size"]) != int(condition_encoder_config["hidden_size"])


def is_xl_folder(path: Path) -> bool:
    """is_xl for a diffusers-layout model folder, from its transformer/ and condition_encoder/ config.json;
    False when either is missing or unreadable."""
    try:
        configs = [json.loads((path / comp / "config.json").read_text()) for comp in ("transformer", "condition_encoder")]
        return is_xl(*configs)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def missing_model_message(name: str, path: Path, config: EngineConfig, reason: str) -> str:
    source = model_sources.source_for(name)
    return (
        f"model {name!r} is not available: no complete diffusers-format checkpoint at {path} "
        f"(looked for {path / 'model_index.json'} and its component folders), no original-layout checkpoint "
        f"({path / original_layout.CONFIG_FILE} + {original_layout.SINGLE_WEIGHTS} + "
        f"{original_layout.SILENCE_LATENT}, with {original_layout.VAE_DIR}/ and "
        f"{original_layout.TEXT_ENCODER_DIR}/ beside it) and {reason}. "
        f"Fix one of: download it with `acestep-models download {name} --checkpoint-dir {config.checkpoint_dir}` "
        f"(from {source.describe()}; set {model_sources.override_hint(name)} to use another) with network access "
        f"and HF_HUB_OFFLINE unset; "
        f"point ACESTEP_CHECKPOINT_DIR at the folder that holds {name}/; "
        f"or serve a random-weight demo with `acestep-models make-tiny {config.checkpoint_dir} --name {name}`."
    )


def download_model(name: str, checkpoint_dir: str | os.PathLike) -> Path:
    """Fetch `name` from its published source into `checkpoint_dir` (verified, pinned; see model_sources).

    A random-weight demo in the model's folder is moved to .demo/ first: real weights take its place.
    huggingface_hub shows per-file progress bars on stderr and resumes partial files. Raises
    model_sources.DownloadFailed (one line: model, cause, fix) or ModelNotFound.
    """
    source = model_sources.source_for(name)
    move_demo_aside(checkpoint_dir, name)
    folder = model_sources.download(source, Path(checkpoint_dir))
    # a whole-repo download may also be an original-layout bundle (an XL repo: DiT + its own vae/ + text encoder)
    if source.layout == "diffusers" and not is_complete(folder) and \
            original_layout.missing_parts(checkpoint_dir, name):
        raise ModelNotFound(f"downloaded {source.describe()} into {folder} but it is neither a diffusers-format "
                            f"AceStepPipeline (model_index.json or component folders missing) nor an original-layout "
                            f"DiT with its VAE and text encoder; set {model_sources.override_hint(name)} to the "
                            f"right repo")
    return folder


def move_demo_aside(checkpoint_dir: str | os.PathLike, name: str) -> Optional[Path]:
    """A random-weight model in `name`'s own folder is moved to .demo/<name> (replacing an older demo there), so
    real weights can take the folder. Returns where it went, None when the folder held no demo."""
    path = model_dir(checkpoint_dir, name)
    if not is_random(path):
        return None
    from engine.weights.atomic_dir import exclusive_lock

    demo = demo_model_dir(checkpoint_dir, name)
    with exclusive_lock(demo):
        if not is_random(path):  # another process moved it meanwhile
            return None
        if demo.exists():
            import shutil

            shutil.rmtree(demo)
        demo.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, demo)
    log.warning("moved the random-weight demo model out of %s into %s: the real weights go in its place", path, demo)
    return demo


def resolve_model(config: EngineConfig, name: str) -> Path:
    """Path of a complete diffusers-layout checkpoint for `name`: the local one, the conversion of a local
    original-layout one (converted on first use), the demo stand-in when the start-up chose one
    (config.demo_models), or a download when allowed; ModelNotFound otherwise."""
    path = model_dir(config.checkpoint_dir, name)
    if not model_sources.is_downloading(path):
        if is_complete(path):
            return path
        if (path / original_layout.CONFIG_FILE).is_file():  # a DiT folder of the original layout
            missing = original_layout.missing_parts(config.checkpoint_dir, name)
            if missing:  # an original DiT folder is here: downloading over it would mix two layouts
                raise ModelNotFound(f"model {name!r} at {path} is in ACE-Step's original layout but incomplete; "
                                    f"missing: {', '.join(missing)}")
            from engine.weights.converted_cache import ensure_converted  # it imports this module

            return ensure_converted(config.checkpoint_dir, name)
    if name in config.demo_models and is_complete(demo_model_dir(config.checkpoint_dir, name)):
        return demo_model_dir(config.checkpoint_dir, name)
    if not config.downloads_possible():
        reason = ("downloads are disabled (HF_HUB_OFFLINE is set)" if config.allow_download
                  else "downloads are disabled (ACESTEP_ALLOW_DOWNLOAD=false)")
        raise ModelNotFound(missing_model_message(name, path, config, reason))
    try:
        download_model(name, config.checkpoint_dir)
    except model_sources.DownloadFailed as exc:
        raise ModelNotFound(f"model {name!r} is not on disk and {exc}") from exc
    if is_complete(path):
        return path
    from engine.weights.converted_cache import ensure_converted  # an original-layout download: convert it once

    return ensure_converted(config.checkpoint_dir, name)


LAYOUTS = ("diffusers", "original")


def build_tiny_checkpoint(path: str | os.PathLike, seed: int = 0, model_name: Optional[str] = None,
                          size: str = "tiny", layout: str = "diffusers") -> Path:
    """Save a randomly initialised AceStepPipeline as model folder `path`, plus the demo marker.

    layout "diffusers": `save_pretrained` into `path`. layout "original": ACE-Step's original layout, the DiT in
    `path` and vae/ + Qwen3-Embedding-0.6B/ beside it (in `path`'s parent), exported from the same random pipeline
    through the inverse key mapping, so both layouts of one seed hold the same weights.
    `model_name` (default: the folder name) decides turbo vs base behaviour. Shared components depend only on
    `seed`, so variants built with the same seed share their VAE/text encoder/... byte for byte.
    """
    from engine.weights.random_pipeline import build_random_pipeline, is_turbo_name

    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r} (one of {', '.join(LAYOUTS)})")
    path = Path(path)
    name = model_name or path.name
    pipe = build_random_pipeline(name, size=size, seed=seed)
    if size == "full":
        import torch

        pipe.to(torch.bfloat16)  # ~6.3 GB instead of 12.6 on disk (3.2 B parameters), as published weights are stored
    marker = {
        "random_weights": True,
        "notice": DEMO_NOTICE,
        "size": size,
        "seed": seed,
        "model_name": name,
        "task_types": list(TURBO_TASK_TYPES if is_turbo_name(name) else ALL_TASK_TYPES),
        "built_by": "acestep-models make-tiny",
    }
    if layout == "original":
        from engine.weights.convert import export_original_layout

        return export_original_layout(pipe, path.parent, path.name, marker=marker)
    from engine.weights.atomic_dir import build_then_swap, exclusive_lock

    with exclusive_lock(path), build_then_swap(path) as tmp:  # never half a model, even with two builders
        pipe.save_pretrained(str(tmp))
        (tmp / DEMO_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return path


def ensure_demo_models(config: EngineConfig, names: Optional[list[str]] = None) -> list[str]:
    """For the launcher: a demo stand-in for each model (of `names`, default all configured) without real weights,
    built in .demo/<name> when missing (logged loudly). The real model's folder is never written.

    Returns the names that will be served with random weights; they are also added to config.demo_models.
    A model being downloaded, or an incomplete original-layout one, gets no demo from here when downloads are
    possible (Engine.load fetches it, or says what it lacks).
    """
    demo = []
    for name in (config.model_names if names is None else names):
        path = model_dir(config.checkpoint_dir, name)
        if local_layout(config.checkpoint_dir, name) is not None:
            if is_random(path):  # a demo in the real model's place (make-tiny): served as it is, labelled
                demo.append(name)
            continue
        if (path / original_layout.CONFIG_FILE).is_file() and not model_sources.is_downloading(path):
            continue  # an incomplete original-layout model: Engine.load says what it lacks
        stand_in = demo_model_dir(config.checkpoint_dir, name)
        if not is_complete(stand_in):
            from engine.weights.atomic_dir import exclusive_lock

            # two workers starting together build it once (build_tiny_checkpoint holds the folder's own lock)
            with exclusive_lock(stand_in.parent / f"{name}.demo"):
                if not is_complete(stand_in):
                    log.warning("=" * 72)
                    log.warning("NO WEIGHTS for model %s: building a TINY RANDOM-WEIGHT DEMO model at %s (its audio "
                                "is noise); real weights downloaded to %s replace it", name, stand_in, path)
                    log.warning("=" * 72)
                    build_tiny_checkpoint(stand_in, model_name=name)
        if name not in config.demo_models:
            config.demo_models.append(name)
        demo.append(name)
    return demo
