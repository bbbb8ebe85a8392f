"""What a LoRA/LoKr adapter file is and whether it fits a DiT, read without torch (the API validates uploads with it).

Layouts (see README's adapters section):
    <name>/adapter_config.json + adapter_model.safetensors   PEFT, as upstream's trainer saves it (also in <name>/final/)
    <name>.safetensors                                       one file: PEFT/diffusers LoRA keys (config, if any, in the
                                                             `lora_adapter_metadata` header entry, diffusers' convention)
                                                             or LyCORIS LoKr (upstream's lokr_weights.safetensors)
    <name>.zip                                               a zipped PEFT folder (what a client uploads)

Only the safetensors header (8-byte length + JSON) and adapter_config.json are read: no tensor data, so checking a
512 MB upload costs a few kilobytes of reading. Every key must name a module the DiT has and every tensor shape must
fit that module; anything else is AdapterInvalid with a reason a client can act on.
"""
from __future__ import annotations

import json
import os
import re
import struct
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, Iterable, Literal, Mapping, Optional

from engine import published_configs
from engine.types import GenerationError

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
LYCORIS_WEIGHTS = "lokr_weights.safetensors"  # the file name upstream's LoKr trainer writes
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
RANDOM_MARK = "random_weights"  # safetensors metadata entry of a random-weight test adapter ("true")
MAX_ADAPTER_BYTES = 512 * 1024 * 1024
MAX_HEADER_BYTES = 16 * 1024 * 1024
MAX_TENSORS = 20_000
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")

# The DiT's adapter-capable linears: original-layout name -> diffusers name (AceStepTransformer1DModel).
ATTENTION_PROJ = {"q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v", "o_proj": "to_out.0"}
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")
_DIFFUSERS_TO_ORIGINAL = {v: k for k, v in ATTENTION_PROJ.items()}

_PROJ = r"(?P<proj>q_proj|k_proj|v_proj|o_proj|to_q|to_k|to_v|to_out\.0|gate_proj|up_proj|down_proj)"
# PEFT / diffusers keys: [base_model.model.|transformer.]layers.N.(self_attn|cross_attn|mlp).PROJ.PARAM[.weight]
_DOTTED_KEY = re.compile(
    r"^(?:base_model\.model\.|transformer\.)?layers\.(?P<layer>\d+)\.(?P<block>self_attn|cross_attn|mlp)\."
    + _PROJ + r"\.(?P<param>lora_A|lora_B|lokr_w1|lokr_w1_a|lokr_w1_b|lokr_w2|lokr_w2_a|lokr_w2_b|lokr_t2)"
    r"(?:\.weight)?$")
# LyCORIS keys: lycoris_layers_N_(self_attn|cross_attn|mlp)_PROJ.PARAM (module path with '.' flattened to '_')
_LYCORIS_KEY = re.compile(
    r"^lycoris_layers_(?P<layer>\d+)_(?P<block>self_attn|cross_attn|mlp)_"
    r"(?P<proj>q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    r"\.(?P<param>lokr_w1|lokr_w1_a|lokr_w1_b|lokr_w2|lokr_w2_a|lokr_w2_b|lokr_t2|alpha)$")

# kohya-ss style single files (what ComfyUI and other front ends write): the module path with '.' flattened to
# '_' under lora_unet_ (or lora_transformer_), with lora_down/lora_up/alpha (LoRA) or LyCORIS' lokr_* params.
# ComfyUI names the DiT `decoder`, hence the optional model prefixes before layers_N.
KOHYA_PREFIXES = ("lora_unet_", "lora_transformer_", "lora_te_", "lora_te1_", "lora_te2_")
_KOHYA_KEY = re.compile(
    r"^lora_(?:unet|transformer)_(?:(?:diffusion_model|model|decoder|transformer)_)*layers_(?P<layer>\d+)_"
    r"(?P<block>self_attn|cross_attn|mlp)_"
    r"(?P<proj>q_proj|k_proj|v_proj|o_proj|to_q|to_k|to_v|to_out_0|gate_proj|up_proj|down_proj)"
    r"\.(?P<param>lora_down\.weight|lora_up\.weight|alpha|lokr_w1|lokr_w1_a|lokr_w1_b|lokr_w2|lokr_w2_a|lokr_w2_b|lokr_t2)$")
_KOHYA_PARAMS = {"lora_down.weight": "lora_A", "lora_up.weight": "lora_B"}

Kind = Literal["lora", "lokr"]
Format = Literal["peft_dir", "peft_file", "lycoris_file", "kohya_file"]
KeyStyle = Literal["peft", "lycoris", "kohya"]


def adapter_dirs(checkpoint_dir: str, lora_dir: str = "", cache_dir: str = "") -> tuple[str, str]:
    """(where named adapters live, where fetched uploads are kept): the settings when given, else
    <checkpoint_dir>/loras and <that>/.uploaded. The API and the engine read the same layout."""
    lora = lora_dir or os.path.join(checkpoint_dir, "loras")
    return lora, cache_dir or os.path.join(lora, ".uploaded")


class AdapterMissing(GenerationError):
    """A request names an adapter that is not where it should be (a folder under ACESTEP_LORA_DIR deleted after
    it was listed, a default naming one that is gone, an uploaded one gone from storage); str() names it."""

    def __init__(self, name: str, detail: str):
        super().__init__(detail)
        self.adapter = name


class AdapterInvalid(ValueError):
    """The adapter cannot be used (malformed, or made for another model); str() is the reason for the client."""


@dataclass(frozen=True)
class ModelShape:
    """The DiT geometry an adapter has to fit (from transformer/config.json or the published config)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "ModelShape":
        try:
            return cls(**{f: int(config[f]) for f in cls.__dataclass_fields__})
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a DiT transformer config: {exc}") from None

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def linear(self, block: str, proj: str) -> tuple[int, int]:
        """(out_features, in_features) of one adapter-capable linear."""
        proj = _DIFFUSERS_TO_ORIGINAL.get(proj, proj)
        q, kv, h = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim, self.hidden_size
        if block == "mlp":
            return {"gate_proj": (self.intermediate_size, h), "up_proj": (self.intermediate_size, h),
                    "down_proj": (h, self.intermediate_size)}[proj]
        return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q)}[proj]


def published_shape(model_name: str) -> Optional[ModelShape]:
    """The published 2B DiTs (turbo and its shifts, base, sft) share one geometry, the XL ones (xl-turbo, xl-base,
    xl-sft) another; None for any other name."""
    if re.fullmatch(r"acestep-v15-(turbo(-[a-z0-9]+)?|base|sft)", model_name):
        return ModelShape.from_config(published_configs.TRANSFORMER)
    if re.fullmatch(r"acestep-v15-xl-(turbo|base|sft)", model_name):
        return ModelShape.from_config(published_configs.XL_TRANSFORMER)
    return None


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    kind: Kind
    format: Format
    rank: int  # LoRA r (the largest over modules); LoKr: the decomposed rank, or the largest factor when full
    alpha: float
    target_modules: tuple[str, ...]  # original-layout projection names, e.g. ("k_proj", "q_proj", ...)
    num_layers: int  # highest layer index it touches + 1
    num_modules: int
    shape: Optional[ModelShape]  # what it was checked against; None: not checked
    size_bytes: int
    random_weights: bool = False  # built by `acestep-models make-tiny-adapter`: a test adapter, not a style

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["target_modules"] = list(self.target_modules)
        return out


@dataclass(frozen=True)
class Tensor:
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class AdapterFiles:
    """Where an adapter's weights and config are; `member`: the weights' path inside the zip `weights`."""

    format: Format
    weights: Path
    config_file: Optional[Path] = None
    zip_weights: Optional[str] = None
    zip_config: Optional[str] = None


# ------------------------------------------------------------------ locating

def locate(path: Path) -> AdapterFiles:
    """The adapter files of a folder (PEFT, also under final/; or a LyCORIS file), a .safetensors or a .zip."""
    path = Path(path)
    if path.is_dir():
        for root in (path, path / "final"):
            if (root / PEFT_WEIGHTS).is_file():
                config = root / PEFT_CONFIG
                return AdapterFiles("peft_dir", root / PEFT_WEIGHTS, config if config.is_file() else None)
        if (path / LYCORIS_WEIGHTS).is_file():
            return AdapterFiles("lycoris_file", path / LYCORIS_WEIGHTS)
        raise AdapterInvalid(f"{path.name}: a folder without {PEFT_WEIGHTS} (PEFT) or {LYCORIS_WEIGHTS} (LyCORIS)")
    if not path.is_file():
        raise AdapterInvalid(f"{path.name}: no such adapter file")
    if path.suffix == ".zip":
        try:
            with zipfile.ZipFile(path) as zf:
                names = [n for n in zf.namelist() if not n.endswith("/")]
        except (zipfile.BadZipFile, OSError) as exc:
            raise AdapterInvalid(f"not a readable zip file: {exc}") from None
        weights = _zip_member(names, PEFT_WEIGHTS)
        if weights is None:
            raise AdapterInvalid(f"the zip holds no {PEFT_WEIGHTS} (zip the folder upstream's trainer wrote)")
        config = _zip_member(names, PEFT_CONFIG, folder=weights.rpartition("/")[0])
        return AdapterFiles("peft_dir", path, zip_weights=weights, zip_config=config)
    if path.suffix == ".safetensors":
        return AdapterFiles("peft_file", path)  # LyCORIS or PEFT: decided from the keys
    raise AdapterInvalid(f"{path.name}: an adapter is a .safetensors file, a .zip of a PEFT folder, or a folder")


def _zip_member(names: list[str], filename: str, folder: Optional[str] = None) -> Optional[str]:
    found = [n for n in names if n.rpartition("/")[2] == filename and ".." not in n.split("/")
             and (folder is None or n.rpartition("/")[0] == folder)]
    return min(found, key=lambda n: n.count("/")) if found else None  # the shallowest (final/ over checkpoints/)


# ------------------------------------------------------------------ reading

def read_header(stream: IO[bytes], size: int) -> tuple[dict[str, Tensor], dict[str, str]]:
    """A safetensors file's tensors (dtype, shape) and `__metadata__`, from its header only."""
    head = stream.read(8)
    if len(head) < 8:
        raise AdapterInvalid("not a safetensors file (shorter than its header)")
    (length,) = struct.unpack("<Q", head)
    if length > min(MAX_HEADER_BYTES, size - 8):
        raise AdapterInvalid("not a safetensors file (header length out of range)")
    try:
        header = json.loads(stream.read(length))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):  # nested past the parser's depth: not a header
        raise AdapterInvalid("not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise AdapterInvalid("not a safetensors file (header is not an object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise AdapterInvalid("safetensors __metadata__ is not an object")
    if len(header) > MAX_TENSORS:
        raise AdapterInvalid(f"more than {MAX_TENSORS} tensors")
    tensors = {}
    for key, entry in header.items():
        try:
            dtype, shape = entry["dtype"], tuple(int(d) for d in entry["shape"])
        except (TypeError, KeyError, ValueError):
            raise AdapterInvalid(f"tensor {key!r}: malformed header entry") from None
        tensors[key] = Tensor(dtype, shape)
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def read_files(files: AdapterFiles, max_bytes: int = MAX_ADAPTER_BYTES
               ) -> tuple[dict[str, Tensor], dict[str, str], Optional[dict[str, Any]], int]:
    """(tensors, safetensors metadata, adapter config or None, size in bytes)."""
    if files.zip_weights is not None:
        with zipfile.ZipFile(files.weights) as zf:
            info = zf.getinfo(files.zip_weights)
            size = info.file_size
            _check_size(size, max_bytes)
            with zf.open(info) as stream:
                tensors, metadata = read_header(stream, size)
            config_text = None
            if files.zip_config is not None:
                cinfo = zf.getinfo(files.zip_config)
                if cinfo.file_size > 1024 * 1024:
                    raise AdapterInvalid(f"{PEFT_CONFIG} larger than 1 MB")
                config_text = zf.read(cinfo).decode("utf-8", "replace")
    else:
        size = files.weights.stat().st_size
        _check_size(size, max_bytes)
        with open(files.weights, "rb") as stream:
            tensors, metadata = read_header(stream, size)
        config_text = None
        if files.config_file is not None:
            if files.config_file.stat().st_size > 1024 * 1024:
                raise AdapterInvalid(f"{PEFT_CONFIG} larger than 1 MB")
            config_text = files.config_file.read_text("utf-8", "replace")
    if config_text is None and DIFFUSERS_METADATA_KEY in metadata:
        config_text = metadata[DIFFUSERS_METADATA_KEY]
    config = None
    if config_text is not None:
        try:
            config = json.loads(config_text)
        except (json.JSONDecodeError, RecursionError):
            raise AdapterInvalid(f"{PEFT_CONFIG} is not JSON") from None
        if not isinstance(config, dict):
            raise AdapterInvalid(f"{PEFT_CONFIG} is not a JSON object")
    return tensors, metadata, config, size


def _check_size(size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise AdapterInvalid(f"adapter weights are {size / 2**20:.0f} MB; the limit is {max_bytes / 2**20:.0f} MB")


# ------------------------------------------------------------------ checking

@dataclass
class _Module:
    layer: int
    block: str
    proj: str  # original-layout name (q_proj, ..., gate_proj)
    params: dict[str, Tensor]


def key_style(keys: Iterable[str]) -> KeyStyle:
    """How an adapter's tensors are named: PEFT/diffusers dotted paths, LyCORIS, or kohya-ss (lora_unet_...)."""
    keys = list(keys)
    if any(k.startswith(KOHYA_PREFIXES) for k in keys):
        return "kohya"
    return "lycoris" if any(k.startswith("lycoris_") for k in keys) else "peft"


def module_of(key: str, style: KeyStyle) -> Optional[tuple[int, str, str, str]]:
    """(layer, block, original-layout projection, canonical param) a key names, or None when it names none."""
    m = {"kohya": _KOHYA_KEY, "lycoris": _LYCORIS_KEY, "peft": _DOTTED_KEY}[style].match(key)
    if m is None:
        return None
    proj = m["proj"].replace("to_out_0", "to_out.0")
    param = _KOHYA_PARAMS.get(m["param"], m["param"]) if style == "kohya" else m["param"]
    return int(m["layer"]), m["block"], _DIFFUSERS_TO_ORIGINAL.get(proj, proj), param


def group_modules(tensors: Mapping[str, Tensor]) -> tuple[dict[str, _Module], bool]:
    """Tensors by DiT module ("layers.0.self_attn.q_proj"), and whether the keys were LyCORIS-style. Kohya-style
    keys are read as the modules they name (the first one that names none, in key order, is the error)."""
    if not tensors:
        raise AdapterInvalid("the adapter holds no tensors")
    style = key_style(tensors)
    modules: dict[str, _Module] = {}
    for key in sorted(tensors) if style == "kohya" else tensors:
        tensor = tensors[key]
        found = module_of(key, style)
        if found is None and style == "kohya":
            raise AdapterInvalid(f"tensor {key!r} (kohya-style) does not map to a module of the ACE-Step 1.5 DiT "
                                 f"(lora_unet_[decoder_]layers_N_{{self_attn|cross_attn|mlp}}_<projection>"
                                 f".{{lora_down.weight|lora_up.weight|alpha}})")
        if found is None:
            raise AdapterInvalid(f"tensor {key!r} does not name an adapter weight of an ACE-Step 1.5 DiT layer "
                                 f"(attention q/k/v/o or mlp gate/up/down projections)")
        layer, block, proj, param = found
        if tensor.dtype not in _FLOAT_DTYPES:
            raise AdapterInvalid(f"tensor {key!r} has dtype {tensor.dtype}; adapters are float16/bfloat16/float32")
        if (block == "mlp") != (proj in MLP_PROJ):
            raise AdapterInvalid(f"tensor {key!r}: {block} has no {proj}")
        name = f"layers.{layer}.{block}.{proj}"
        module = modules.setdefault(name, _Module(layer, block, proj, {}))
        module.params[param] = tensor
    return modules, style == "lycoris"


def kind_of(modules: Mapping[str, _Module]) -> Kind:
    kinds = {"lora" if any(p.startswith("lora_") for p in m.params) else "lokr" for m in modules.values()}
    if kinds == {"lora", "lokr"} or any(
            any(p.startswith("lora_") for p in m.params) and any(p.startswith("lokr_") for p in m.params)
            for m in modules.values()):
        raise AdapterInvalid("the adapter mixes LoRA and LoKr weights")
    return kinds.pop()


def lora_rank(name: str, module: _Module, shape: Optional[ModelShape]) -> int:
    a, b = module.params.get("lora_A"), module.params.get("lora_B")
    if a is None or b is None:
        raise AdapterInvalid(f"{name}: LoRA needs both lora_A and lora_B")
    if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1] or a.shape[0] < 1:
        raise AdapterInvalid(f"{name}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do not form a rank-r pair")
    if shape is not None:
        out_f, in_f = shape.linear(module.block, module.proj)
        if (b.shape[0], a.shape[1]) != (out_f, in_f):
            raise AdapterInvalid(f"{name}: the adapter is {b.shape[0]}x{a.shape[1]}, the model's layer is "
                                 f"{out_f}x{in_f} (an adapter for another model?)")
    return a.shape[0]


def _factor(module: _Module, one: str) -> Optional[tuple[int, int, Optional[int]]]:
    """(rows, cols, rank or None when full) of LoKr factor w1 or w2."""
    p = module.params
    full, fa, fb = p.get(f"lokr_{one}"), p.get(f"lokr_{one}_a"), p.get(f"lokr_{one}_b")
    if full is not None and fa is None and fb is None and len(full.shape) == 2:
        return full.shape[0], full.shape[1], None
    if full is None and fa is not None and fb is not None and len(fa.shape) == 2 and len(fb.shape) == 2 \
            and fa.shape[1] == fb.shape[0]:
        return fa.shape[0], fb.shape[1], fa.shape[1]
    return None


def lokr_factors(name: str, module: _Module, shape: Optional[ModelShape]
                 ) -> tuple[tuple[int, int, Optional[int]], tuple[int, int, Optional[int]]]:
    if "lokr_t2" in module.params:
        raise AdapterInvalid(f"{name}: LoKr with a CP-decomposed (convolution) factor does not fit a linear layer")
    w1, w2 = _factor(module, "w1"), _factor(module, "w2")
    if w1 is None or w2 is None:
        raise AdapterInvalid(f"{name}: LoKr needs lokr_w1 (or lokr_w1_a/b) and lokr_w2 (or lokr_w2_a/b), "
                             f"as matrices that multiply")
    if shape is not None:
        out_f, in_f = shape.linear(module.block, module.proj)
        if (w1[0] * w2[0], w1[1] * w2[1]) != (out_f, in_f):
            raise AdapterInvalid(f"{name}: the LoKr factors make a {w1[0] * w2[0]}x{w1[1] * w2[1]} weight, the "
                                 f"model's layer is {out_f}x{in_f} (an adapter for another model?)")
    return w1, w2


def check(modules: Mapping[str, _Module], kind: Kind, shape: Optional[ModelShape]) -> int:
    """Checks every module against `shape` (when given); returns the adapter's rank."""
    if shape is not None:
        deep = [n for n, m in modules.items() if m.layer >= shape.num_hidden_layers]
        if deep:
            raise AdapterInvalid(f"{deep[0]}: the model has {shape.num_hidden_layers} layers "
                                 f"(an adapter for another model?)")
    ranks = []
    for name, module in sorted(modules.items()):
        if kind == "lora":
            ranks.append(lora_rank(name, module, shape))
        else:
            w1, w2 = lokr_factors(name, module, shape)
            ranks.append(w2[2] or w1[2] or max(w2[0], w2[1]))
    return max(ranks)


def inspect_adapter(path: Path, *, name: Optional[str] = None, shape: Optional[ModelShape] = None,
                    max_bytes: int = MAX_ADAPTER_BYTES) -> AdapterInfo:
    """Reads and checks one adapter (folder, .safetensors or .zip); raises AdapterInvalid with the reason."""
    path = Path(path)
    files = locate(path)
    tensors, metadata, config, size = read_files(files, max_bytes)
    if config is not None and config.get("use_dora"):
        raise AdapterInvalid("DoRA adapters are not supported (LoRA and LoKr are)")
    modules, lycoris = group_modules(tensors)
    kind = kind_of(modules)
    fmt: Format = "lycoris_file" if lycoris else "kohya_file" if key_style(tensors) == "kohya" else files.format
    rank = check(modules, kind, shape)
    alpha = _alpha(config, metadata, rank)
    if config is not None and kind == "lora" and str(config.get("peft_type", "LORA")).upper() not in ("LORA", ""):
        raise AdapterInvalid(f"adapter_config.json says peft_type {config.get('peft_type')!r} but the weights are LoRA")
    stem = path.name[: -len(path.suffix)] if path.suffix in (".safetensors", ".zip") else path.name
    return AdapterInfo(
        name=name or stem, kind=kind, format=fmt, rank=rank, alpha=alpha,
        target_modules=tuple(sorted({m.proj for m in modules.values()})),
        num_layers=max(m.layer for m in modules.values()) + 1, num_modules=len(modules), shape=shape,
        size_bytes=size, random_weights=metadata.get(RANDOM_MARK) == "true")


def _alpha(config: Optional[Mapping[str, Any]], metadata: Mapping[str, str], rank: int) -> float:
    for source, key in ((config or {}, "lora_alpha"), (config or {}, "alpha"), (metadata, "linear_alpha"),
                        (metadata, "ss_network_alpha")):  # kohya-ss writes its network's alpha there
        value = source.get(key)
        if value is not None:
            try:
                return float(value)
            except (TypeError, ValueError):
                raise AdapterInvalid(f"{key} {value!r} is not a number") from None
    return float(rank)
