"""ACE-Step 1.5's original checkpoint layout, and how it maps onto diffusers' AceStepPipeline components.

The official 2B models are published like this (hub repo ACE-Step/Ace-Step1.5; the other DiT variants are repos
holding just their DiT folder, sharing the main repo's vae/ and text encoder):

    <root>/<dit-name>/config.json            one flat dict describing DiT, condition encoder and audio (de)tokenizer
    <root>/<dit-name>/model.safetensors      one state dict ("decoder.*", "encoder.*", "tokenizer.*", ...);
                     (or model.safetensors.index.json + shards, as the XL DiTs ship)
    <root>/<dit-name>/silence_latent.pt      VAE latent of silence, [1, channels, frames]
    <root>/vae/                              diffusers AutoencoderOobleck (config.json + safetensors)
    <root>/Qwen3-Embedding-0.6B/             transformers text encoder + its tokenizer

The XL repos (ACE-Step/acestep-v15-xl-turbo, -xl-sft, -xl-base) bundle their own vae/ and Qwen3-Embedding-0.6B/
beside the DiT's files, so a snapshot of one into <root>/<dit-name>/ (as upstream's downloader puts it) holds them
inside the DiT folder: those are used when present, the shared <root>/ ones otherwise.

Torch-free: key names, file names and config fields only. engine/weights/convert.py does the tensor work.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from engine.types import GenerationError

VAE_DIR = "vae"
TEXT_ENCODER_DIR = "Qwen3-Embedding-0.6B"
CONFIG_FILE = "config.json"
SINGLE_WEIGHTS = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"
SILENCE_LATENT = "silence_latent.pt"

# The DiT folder's state dict splits into these four pipeline components, by key prefix.
PREFIX_TO_COMPONENT = {
    "decoder.": "transformer",
    "encoder.": "condition_encoder",
    "tokenizer.": "audio_tokenizer",
    "detokenizer.": "audio_token_detokenizer",
}
DIT_COMPONENTS = tuple(PREFIX_TO_COMPONENT.values())
# A top-level parameter of the original model that diffusers keeps in the condition encoder.
NULL_CONDITION = "null_condition_emb"
# The condition encoder's buffer that silence_latent.pt fills (transposed to [1, frames, channels]).
SILENCE_BUFFER = "silence_latent"

# Original attention module names -> diffusers' Attention names, in every component.
_ATTENTION_RENAMES = (
    (".q_proj.", ".to_q."),
    (".k_proj.", ".to_k."),
    (".v_proj.", ".to_v."),
    (".o_proj.", ".to_out.0."),
    (".q_norm.", ".norm_q."),
    (".k_norm.", ".norm_k."),
)
# The original DiT wraps its patch convolutions in nn.Sequential(reshape, conv, reshape); diffusers names the conv.
_TRANSFORMER_RENAMES = (
    ("proj_in.1.", "proj_in_conv."),
    ("proj_out.1.", "proj_out_conv."),
)


class ConversionError(GenerationError):
    """An original-layout checkpoint cannot be turned into the diffusers layout; the message names what is wrong."""


# ---------------------------------------------------------------- key mapping
def diffusers_key(original: str) -> Optional[tuple[str, str]]:
    """(component, key) that an original state-dict key becomes, or None when it belongs to no component."""
    if original == NULL_CONDITION:
        return "condition_encoder", NULL_CONDITION
    for prefix, component in PREFIX_TO_COMPONENT.items():
        if original.startswith(prefix):
            key = original[len(prefix):]
            if component == "transformer":
                key = _rename_start(key, _TRANSFORMER_RENAMES)
            for old, new in _ATTENTION_RENAMES:
                key = key.replace(old, new)
            return component, key
    return None


def original_key(component: str, key: str) -> str:
    """The inverse of `diffusers_key` (used to export the tiny model and to name the source of a missing key)."""
    if component == "condition_encoder" and key == NULL_CONDITION:
        return NULL_CONDITION
    for old, new in _ATTENTION_RENAMES:
        key = key.replace(new, old)
    if component == "transformer":
        key = _rename_start(key, [(new, old) for old, new in _TRANSFORMER_RENAMES])
    prefix = next(p for p, c in PREFIX_TO_COMPONENT.items() if c == component)
    return prefix + key


def _rename_start(key: str, renames) -> str:
    for old, new in renames:
        if key.startswith(old):
            return new + key[len(old):]
    return key


# ---------------------------------------------------------------- files
def dit_dir(root: str | Path, name: str) -> Path:
    return Path(root) / name


def looks_like_dit(path: Path) -> bool:
    """A DiT folder of the original layout: a config.json with the DiT's latent fields, and weights.

    The check on config fields keeps other folders with a config.json (the 5 Hz LM, the text encoder) out.
    """
    config = path / CONFIG_FILE
    if not config.is_file() or not ((path / SINGLE_WEIGHTS).is_file() or (path / SHARD_INDEX).is_file()):
        return False
    try:
        fields = json.loads(config.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(fields, dict) and "audio_acoustic_hidden_dim" in fields and "in_channels" in fields


def shared_dir(root: str | Path, name: str, folder: str) -> Path:
    """Where DiT `name` takes its `folder` (VAE_DIR or TEXT_ENCODER_DIR) from: the DiT folder's own copy (an XL
    repo's bundle) when it has one, else the one shared beside the DiT folders."""
    bundled = dit_dir(root, name) / folder
    return bundled if (bundled / CONFIG_FILE).is_file() else Path(root) / folder


def missing_parts(root: str | Path, name: str) -> list[str]:
    """What an original-layout model `name` under `root` lacks (empty: complete)."""
    root = Path(root)
    dit = dit_dir(root, name)
    missing = []
    if not (dit / CONFIG_FILE).is_file():
        missing.append(str(dit / CONFIG_FILE))
    if not ((dit / SINGLE_WEIGHTS).is_file() or (dit / SHARD_INDEX).is_file()):
        missing.append(f"{dit / SINGLE_WEIGHTS} (or {SHARD_INDEX} + shards)")
    if not (dit / SILENCE_LATENT).is_file():
        missing.append(str(dit / SILENCE_LATENT))
    for folder in (VAE_DIR, TEXT_ENCODER_DIR):
        if not (shared_dir(root, name, folder) / CONFIG_FILE).is_file():
            missing.append(f"{root / folder}/ (or {dit / folder}/)")
    return missing


def weight_files(dit: Path) -> list[Path]:
    """The safetensors file(s) holding the DiT folder's state dict: the single file, or every shard of the index."""
    if (dit / SINGLE_WEIGHTS).is_file():
        return [dit / SINGLE_WEIGHTS]
    index = dit / SHARD_INDEX
    if not index.is_file():
        raise ConversionError(f"no weights in {dit}: expected {SINGLE_WEIGHTS} or {SHARD_INDEX} + shards")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ConversionError(f"{index} is not a safetensors shard index ({exc})") from exc
    shards = [dit / shard for shard in sorted(set(weight_map.values()))]
    absent = [str(s) for s in shards if not s.is_file()]
    if absent:
        raise ConversionError(f"{index} lists shards that are missing: {', '.join(absent)}")
    return shards


def source_files(root: str | Path, name: str, dit_extras: tuple[str, ...] = ()) -> list[Path]:
    """Every file a conversion of `name` reads: from the DiT folder its config, weights, silence latent and the
    `dit_extras` present (other files there, e.g. a README or download records, are not read); all of vae/ and
    the text encoder folder, hidden files excluded."""
    root = Path(root)
    dit = dit_dir(root, name)
    files = [dit / CONFIG_FILE, dit / SILENCE_LATENT, *weight_files(dit)]
    if (dit / SHARD_INDEX).is_file() and not (dit / SINGLE_WEIGHTS).is_file():
        files.append(dit / SHARD_INDEX)
    files += [dit / extra for extra in dit_extras if (dit / extra).is_file()]
    for folder in (shared_dir(root, name, VAE_DIR), shared_dir(root, name, TEXT_ENCODER_DIR)):
        files += sorted(p for p in folder.rglob("*")
                        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    return files


def read_config(dit: Path) -> dict:
    try:
        config = json.loads((dit / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConversionError(f"cannot read {dit / CONFIG_FILE}: {exc}") from exc
    if not isinstance(config, dict):
        raise ConversionError(f"{dit / CONFIG_FILE} is not a JSON object")
    return config


# ---------------------------------------------------------------- configs
# Fields shared by every attention stack of the model.
_ATTENTION_FIELDS = ("head_dim", "rope_theta", "attention_bias", "attention_dropout", "rms_norm_eps", "sliding_window")
# Values taken when config.json omits a field (the defaults of upstream's config class / diffusers' converter).
_DEFAULTS: dict[str, Any] = dict(rope_theta=1000000.0, attention_bias=False, attention_dropout=0.0, rms_norm_eps=1e-6,
                                 sliding_window=128, pool_window_size=5, fsq_input_levels=[8, 8, 8, 5, 5, 5],
                                 fsq_input_num_quantizers=1, num_attention_pooler_hidden_layers=2, is_turbo=False,
                                 model_version=None)
# XL checkpoints give the condition encoder (and audio (de)tokenizer) its own, narrower widths.
_ENCODER_WIDTHS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")


def default_layer_types(num_layers: int) -> list[str]:
    """Upstream's pattern when config.json has no layer_types: sliding-window attention on even layers."""
    return ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(num_layers)]


def component_configs(flat: dict, source: str = CONFIG_FILE) -> dict[str, dict]:
    """The init kwargs of the four DiT-side pipeline components, derived from the flat original config.json."""
    def get(key: str) -> Any:
        if key in flat:
            return flat[key]
        if key in _DEFAULTS:
            return _DEFAULTS[key]
        raise ConversionError(f"{source} lacks the field {key!r}")

    attention = {k: get(k) for k in _ATTENTION_FIELDS}
    encoder = {k: flat.get(f"encoder_{k}", get(k)) for k in _ENCODER_WIDTHS}
    layer_types = list(flat.get("layer_types") or default_layer_types(get("num_hidden_layers")))
    pooler_layers = get("num_attention_pooler_hidden_layers")
    pooler = dict(encoder, **attention, audio_acoustic_hidden_dim=get("audio_acoustic_hidden_dim"),
                  pool_window_size=get("pool_window_size"), num_attention_pooler_hidden_layers=pooler_layers,
                  layer_types=layer_types[:pooler_layers])
    return {
        "transformer": dict(
            {k: get(k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                 "num_key_value_heads", "in_channels", "audio_acoustic_hidden_dim", "patch_size")},
            **attention, layer_types=layer_types, encoder_hidden_size=encoder["hidden_size"],
            is_turbo=bool(get("is_turbo")), model_version=get("model_version")),
        "condition_encoder": dict(
            encoder, **attention,
            **{k: get(k) for k in ("text_hidden_dim", "timbre_hidden_dim", "num_lyric_encoder_hidden_layers",
                                   "num_timbre_encoder_hidden_layers")}),
        "audio_tokenizer": dict(pooler, fsq_dim=flat.get("fsq_dim", encoder["hidden_size"]),
                                fsq_input_levels=list(get("fsq_input_levels")),
                                fsq_input_num_quantizers=get("fsq_input_num_quantizers")),
        "audio_token_detokenizer": pooler,
    }


def flat_config(configs: dict[str, dict]) -> dict:
    """The flat original config.json for the given component configs (the inverse of `component_configs`).

    Raises ValueError when the components cannot come from one flat config (e.g. a tokenizer wider than the
    condition encoder).
    """
    dit, cond = configs["transformer"], configs["condition_encoder"]
    tok, detok = configs["audio_tokenizer"], configs["audio_token_detokenizer"]
    flat = {k: dit[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                "num_key_value_heads", "in_channels", "audio_acoustic_hidden_dim", "patch_size",
                                "is_turbo", "model_version", *_ATTENTION_FIELDS)}
    flat["layer_types"] = list(dit["layer_types"] or default_layer_types(dit["num_hidden_layers"]))
    flat.update({f"encoder_{k}": cond[k] for k in _ENCODER_WIDTHS if cond[k] != dit[k]})
    flat.update({k: cond[k] for k in ("text_hidden_dim", "timbre_hidden_dim", "num_lyric_encoder_hidden_layers",
                                      "num_timbre_encoder_hidden_layers")})
    flat.update({k: tok[k] for k in ("pool_window_size", "fsq_dim", "fsq_input_levels", "fsq_input_num_quantizers",
                                     "num_attention_pooler_hidden_layers")})
    derived = component_configs(flat)
    for component, given in configs.items():
        for key, value in given.items():
            if key.startswith("_"):
                continue  # config metadata
            if key == "layer_types" and value is None:  # the classes' default pattern for their layer count
                value = default_layer_types(given.get("num_attention_pooler_hidden_layers")
                                            or given.get("num_hidden_layers") or 0)
            if key == "encoder_hidden_size" and value is None:
                value = dit["hidden_size"]
            if derived[component].get(key, value) != value:
                raise ValueError(f"{component}.{key}={value!r} cannot be expressed in one flat config "
                                 f"(it would be {derived[component][key]!r})")
    if detok["pool_window_size"] != tok["pool_window_size"]:
        raise ValueError("the audio tokenizer and detokenizer disagree on pool_window_size")
    return flat
