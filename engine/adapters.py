"""LoRA/LoKr adapters on the DiT: found on disk, loaded through diffusers/PEFT, switched per batch without a reload.

A LoRA loads through diffusers' AceStepLoraLoaderMixin (`lora_state_dict` converts upstream's original-layout PEFT keys,
`load_lora_into_transformer` injects PEFT LoRA layers); a LoKr through PEFT's LoKrConfig (a LyCORIS file, as
upstream's trainer writes, is mapped onto PEFT's LoKr parameters, which use the same factorisation). Each adapter is
loaded once per model and kept while it fits `budget_bytes` (least recently used first out); a batch then only sets
which adapters act and at what scale (PEFT `set_adapters`), or disables them all, which runs the base layers alone:
a request without adapters (or with scale 0) gets the DiT's output bit for bit.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
import warnings
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from diffusers import AceStepPipeline
from safetensors.torch import load_file, save_file

from engine import adapter_manifest as manifest
from engine.adapter_manifest import ATTENTION_PROJ, AdapterInfo, AdapterInvalid, AdapterMissing, ModelShape
from engine.request import AdapterRef
from engine.types import GenerationError

log = logging.getLogger("engine.adapters")

UPLOAD_EXTENSIONS = ("safetensors", "zip")




@dataclass
class _Loaded:
    peft_name: str  # the adapter's name inside the transformer (PEFT wants a module-safe name)
    pipe: AceStepPipeline
    info: AdapterInfo
    nbytes: int
    load_s: float


def _diffusers_module(name: str) -> str:
    """layers.0.self_attn.q_proj -> layers.0.self_attn.to_q (mlp projections keep their names)."""
    head, _, proj = name.rpartition(".")
    return f"{head}.{ATTENTION_PROJ.get(proj, proj)}"


def model_shape(pipe: AceStepPipeline) -> ModelShape:
    return ModelShape.from_config(dict(pipe.transformer.config))


class AdapterLibrary:
    """The adapters of one worker: where they are, which are loaded into which model, which act now."""

    def __init__(self, lora_dir: Path, cache_dir: Path, budget_bytes: int):
        self.lora_dir = Path(lora_dir)
        self.cache_dir = Path(cache_dir)
        self.budget_bytes = budget_bytes
        self._loaded: OrderedDict[tuple, _Loaded] = OrderedDict()  # (model, identity) -> loaded, oldest first
        self._active: dict[str, tuple] = {}  # model -> the (peft names, scales) acting now
        self._lock = threading.Lock()
        self._listing: Optional[tuple[tuple, list[dict[str, Any]]]] = None  # list_local's last answer and its key
        self.switches = 0

    # ------------------------------------------------------------ finding
    def path_for(self, ref: AdapterRef) -> Path:
        """The local file or folder of an adapter (an uploaded one must have been fetched into cache_dir)."""
        if ref.sha256:
            for ext in UPLOAD_EXTENSIONS:
                path = self.cache_dir / f"{ref.sha256}.{ext}"
                if path.is_file():
                    return path
            raise AdapterMissing(ref.name, f"adapter {ref.name!r} (uploaded, sha256 {ref.sha256[:12]}...) is not in this "
                                  f"worker's cache; it is fetched from the blob store before the task runs")
        for path in (self.lora_dir / ref.name, self.lora_dir / f"{ref.name}.safetensors"):
            if path.exists():
                return path
        raise AdapterMissing(ref.name, f"no adapter named {ref.name!r} under {self.lora_dir} (a folder or "
                              f"{ref.name}.safetensors); known: {', '.join(self.local_names()) or 'none'}")

    def local_names(self) -> list[str]:
        if not self.lora_dir.is_dir():
            return []
        names = []
        for entry in sorted(self.lora_dir.iterdir()):
            if entry.name.startswith("."):
                continue
            if entry.is_dir() or entry.suffix == ".safetensors":
                names.append(entry.name.removesuffix(".safetensors"))
        return names

    def list_local(self, shapes: dict[str, ModelShape]) -> list[dict[str, Any]]:
        """Every adapter under lora_dir, with the models (of `shapes`) it fits: AdapterInfo.as_dict() plus
        `models` and, when it fits none, `error`. Re-read only when a file changed (heartbeats ask often)."""
        names = self.local_names()
        stamp = []
        for name in names:
            try:
                weights = manifest.locate(self.path_for(AdapterRef(name=name))).weights
                stamp.append((name, weights.stat().st_mtime_ns, weights.stat().st_size))
            except (AdapterInvalid, GenerationError, OSError):
                stamp.append((name, 0, 0))
        key = (tuple(stamp), tuple(sorted((m, tuple(s.as_dict().values())) for m, s in shapes.items())))
        if self._listing is not None and self._listing[0] == key:
            return self._listing[1]
        out = []
        for name in names:
            path = self.path_for(AdapterRef(name=name))
            try:
                entry = manifest.inspect_adapter(path, name=name).as_dict()
            except AdapterInvalid as exc:
                out.append({"name": name, "models": [], "error": str(exc)})
                continue
            fits, why = [], ""
            for model, shape in shapes.items():
                try:
                    manifest.inspect_adapter(path, name=name, shape=shape)
                    fits.append(model)
                except AdapterInvalid as exc:
                    why = str(exc)
            out.append(entry | {"models": fits, **({} if fits else {"error": why})})
        self._listing = (key, out)
        return out

    # ------------------------------------------------------------ applying
    def activate(self, model_name: str, pipe: AceStepPipeline, refs: list[AdapterRef]) -> list[dict[str, Any]]:
        """Makes exactly `refs` act on `pipe`'s DiT (loading what is missing); returns what acts, for the
        generation info. Adapters at scale 0 are left out: they change nothing."""
        acting = [r for r in refs if r.scale != 0.0]
        with self._lock:
            try:
                loaded = [self._ensure(model_name, pipe, r) for r in acting]
            except AdapterInvalid as exc:  # on disk since the API checked it, or changed since
                raise GenerationError(f"adapter not usable: {exc}") from None
            wanted = (tuple(l.peft_name for l in loaded), tuple(r.scale for r in acting))
            if self._active.get(model_name, ((), ())) != wanted:
                self.switches += 1
                if acting:
                    pipe.transformer.enable_adapters()
                    pipe.transformer.set_adapters(list(wanted[0]), list(wanted[1]))
                elif _has_peft(pipe):
                    pipe.transformer.disable_adapters()  # base layers only: bit-identical to no adapter
                self._active[model_name] = wanted
            self._evict(keep={(model_name, self._identity(r)) for r in acting})
        return [{"name": r.name, "scale": r.scale, "kind": l.info.kind, "rank": l.info.rank,
                 **({"sha256": r.sha256} if r.sha256 else {}),
                 **({"random_weights": True} if l.info.random_weights else {})} for r, l in zip(acting, loaded)]

    def loaded(self) -> list[dict[str, Any]]:
        """For heartbeats and describe(): every adapter held in memory, most recently used last."""
        with self._lock:
            return [{"model": key[0], "name": l.info.name, "kind": l.info.kind, "bytes": l.nbytes}
                    for key, l in self._loaded.items()]

    def loaded_bytes(self) -> int:
        return sum(l.nbytes for l in self._loaded.values())

    def _identity(self, ref: AdapterRef) -> tuple:
        if ref.sha256:
            return ("upload", ref.sha256)
        path = self.path_for(ref)
        files = manifest.locate(path)
        stat = files.weights.stat()  # a retrained adapter under the same name is loaded afresh
        return ("local", ref.name, str(files.weights), stat.st_mtime_ns, stat.st_size)

    def _ensure(self, model_name: str, pipe: AceStepPipeline, ref: AdapterRef) -> _Loaded:
        key = (model_name, self._identity(ref))
        if key in self._loaded:
            self._loaded.move_to_end(key)
            return self._loaded[key]
        stale = [k for k in self._loaded if k[0] == model_name and k[1][:2] == key[1][:2] and k != key]
        for k in stale:  # the same local adapter, changed on disk since it was loaded
            self._unload(pipe, k)
        peft_name = "a_" + hashlib.sha1(repr(key).encode()).hexdigest()[:16]
        t0 = time.perf_counter()
        info, nbytes = load_into(pipe, self.path_for(ref), ref.name, peft_name, self.cache_dir)
        loaded = _Loaded(peft_name, pipe, info, nbytes, time.perf_counter() - t0)
        self._loaded[key] = loaded
        log.info("adapter %s (%s, rank %d) loaded into %s in %.2fs, %.1f MB", ref.name, info.kind, info.rank,
                 model_name, loaded.load_s, nbytes / 2**20)
        return loaded

    def _evict(self, keep: set) -> None:
        while self.loaded_bytes() > self.budget_bytes:
            victim = next((k for k in self._loaded if k not in keep), None)
            if victim is None:
                return  # everything left is in use by this batch
            self._unload(self._loaded[victim].pipe, victim)

    def _unload(self, pipe: AceStepPipeline, key: tuple) -> None:
        loaded = self._loaded.pop(key)
        pipe.transformer.delete_adapters(loaded.peft_name)
        names, scales = self._active.get(key[0], ((), ()))
        if loaded.peft_name in names:
            self._active.pop(key[0], None)
        log.info("adapter %s unloaded from %s (least recently used)", loaded.info.name, key[0])


def _has_peft(pipe: AceStepPipeline) -> bool:
    return bool(getattr(pipe.transformer, "_hf_peft_config_loaded", False))


# ---------------------------------------------------------------- loading one adapter

def load_into(pipe: AceStepPipeline, path: Path, name: str, peft_name: str, scratch: Path) -> tuple[AdapterInfo, int]:
    """Loads one adapter into `pipe`'s DiT under `peft_name`; returns its description and its bytes in memory."""
    shape = model_shape(pipe)
    info = manifest.inspect_adapter(path, name=name, shape=shape)  # the same check the API ran on upload
    loading = info  # what the loader reads: the file itself, or its conversion
    if info.format == "kohya_file":  # converted once to upstream's layouts, then loaded as any PEFT/LyCORIS one
        path = kohya_converted(path, scratch)
        loading = manifest.inspect_adapter(path, name=name, shape=shape)
    files = manifest.locate(path)
    weights = _weights_file(files, path, scratch)
    _, _, config, _ = manifest.read_files(files)
    state = load_file(str(weights))
    modules, lycoris = manifest.group_modules({k: manifest.Tensor("F32", tuple(v.shape)) for k, v in state.items()})
    transformer = pipe.transformer
    before = _adapter_bytes(transformer)
    try:
        with warnings.catch_warnings():  # PEFT warns on every second adapter of a model: that is the point here
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            if loading.kind == "lora":
                _load_lora(pipe, state, modules, config or {}, loading, peft_name)
            else:
                _load_lokr(pipe, state, modules, config or {}, lycoris, peft_name)
    except AdapterInvalid:
        _forget(transformer, peft_name)
        raise
    except (RuntimeError, ValueError) as exc:  # PEFT/diffusers refusing the weights
        _forget(transformer, peft_name)
        raise AdapterInvalid(f"adapter {name!r} does not load into this model: {exc}") from None
    got = sum(1 for _, m in transformer.named_modules() if peft_name in getattr(m, "_available_adapters", ()) or
              peft_name in getattr(m, "lora_A", {}) or peft_name in getattr(m, "lokr_w1", {}) or
              peft_name in getattr(m, "lokr_w1_a", {}))
    if got != len(modules):
        _forget(transformer, peft_name)
        raise AdapterInvalid(f"adapter {name!r}: {got} of its {len(modules)} modules loaded into the model")
    return info, _adapter_bytes(transformer) - before


def kohya_converted(path: Path, scratch: Path) -> Path:
    """A kohya-ss file (lora_unet_..., lora_down/lora_up/alpha) as upstream's layouts, written once under
    `scratch`/converted/ (keyed by the file's size and mtime, like the checkpoints' converted cache):
    LoRA -> a PEFT folder, each module's alpha/rank baked into lora_B so PEFT's own scaling is 1 per module
    (kohya's alphas may differ by module, a LoraConfig's do not); LoKr -> a LyCORIS lokr_weights.safetensors."""
    stat = path.stat()
    out = Path(scratch) / "converted" / f"{path.stem}-{stat.st_size}-{stat.st_mtime_ns}"
    if out.is_dir():
        return out
    state = load_file(str(path))
    style = manifest.key_style(state)
    modules: dict[tuple[int, str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        found = manifest.module_of(key, style)
        if found is None:
            raise AdapterInvalid(f"tensor {key!r} (kohya-style) does not map to a module of the ACE-Step 1.5 DiT")
        layer, block, proj, param = found
        modules.setdefault((layer, block, proj), {})[param] = tensor
    tensors: dict[str, torch.Tensor] = {}
    lora = any("lora_A" in params for params in modules.values())
    ranks: dict[str, int] = {}
    for (layer, block, proj), params in modules.items():
        if lora:
            down, up = params["lora_A"], params["lora_B"]
            rank = int(down.shape[0])
            alpha = float(params["alpha"]) if "alpha" in params else float(rank)
            base = f"base_model.model.layers.{layer}.{block}.{proj}"
            tensors[f"{base}.lora_A.weight"] = down.contiguous()
            tensors[f"{base}.lora_B.weight"] = (up.float() * (alpha / rank)).to(up.dtype).contiguous()
            ranks[f"layers.{layer}.{block}.{proj}"] = rank
        else:
            for param, tensor in params.items():
                tensors[f"lycoris_layers_{layer}_{block}_{proj}.{param}"] = tensor.contiguous()
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if lora:
        r = max(ranks.values())
        config = {"peft_type": "LORA", "r": r, "lora_alpha": r, "lora_dropout": 0.0, "bias": "none",
                  "target_modules": sorted({k.rpartition(".")[2] for k in ranks}),
                  "alpha_pattern": {k: v for k, v in ranks.items() if v != r}, "converted_from": "kohya"}
        save_file(tensors, str(tmp / manifest.PEFT_WEIGHTS), metadata={"format": "pt"})
        (tmp / manifest.PEFT_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    else:
        save_file(tensors, str(tmp / manifest.LYCORIS_WEIGHTS), metadata={"algo": "lokr", "format": "lycoris"})
    try:
        tmp.replace(out)  # whole or absent; another worker converting the same file may have won
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _weights_file(files: manifest.AdapterFiles, path: Path, scratch: Path) -> Path:
    if files.zip_weights is None:
        return files.weights
    out = scratch / f"{path.stem}.unzipped"
    target = out / manifest.PEFT_WEIGHTS
    if not target.is_file():  # the size was checked by inspect_adapter; extract just the weights
        out.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(path) as zf, zf.open(files.zip_weights) as src, open(f"{target}.tmp", "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        Path(f"{target}.tmp").replace(target)
    return target


def _load_lora(pipe: AceStepPipeline, state: dict, modules: dict, config: dict, info: AdapterInfo,
               peft_name: str) -> None:
    # Upstream's keys (base_model.model.layers.N...q_proj) are what the mixin converts; other spellings are brought
    # to them first, so one conversion serves every LoRA layout.
    original = {}
    for key, tensor in state.items():
        m = manifest._DOTTED_KEY.match(key)
        assert m is not None  # group_modules accepted every key
        proj = manifest._DIFFUSERS_TO_ORIGINAL.get(m["proj"], m["proj"])
        original[f"base_model.model.layers.{int(m['layer'])}.{m['block']}.{proj}.{m['param']}.weight"] = tensor
    converted = AceStepPipeline.lora_state_dict(original)
    converted = {k if k.startswith("transformer.") else "transformer." + k.removeprefix("base_model.model."): v
                 for k, v in converted.items()}
    ranks = {_diffusers_module(n): manifest.lora_rank(n, m, None) for n, m in modules.items()}
    r = max(ranks.values())
    alpha = info.alpha
    alpha_pattern = {_pattern_key(k): float(v) for k, v in (config.get("alpha_pattern") or {}).items()}
    metadata = {  # LoraConfig keywords, under the component's prefix as the loader expects
        "transformer.r": r, "transformer.lora_alpha": alpha, "transformer.target_modules": sorted(ranks),
        "transformer.rank_pattern": {k: v for k, v in ranks.items() if v != r},
        "transformer.alpha_pattern": alpha_pattern,
        "transformer.lora_dropout": 0.0, "transformer.bias": "none",
    }
    AceStepPipeline.load_lora_into_transformer(_as_model(converted, pipe), transformer=pipe.transformer,
                                               adapter_name=peft_name, metadata=metadata, _pipeline=pipe,
                                               low_cpu_mem_usage=True)


def _pattern_key(key: str) -> str:
    """A PEFT rank/alpha pattern written against upstream's module names, in diffusers' names."""
    for old, new in ATTENTION_PROJ.items():
        key = re.sub(rf"(^|\.){old}($|\.)", rf"\g<1>{new}\g<2>", key)
    return key


def _load_lokr(pipe: AceStepPipeline, state: dict, modules: dict, config: dict, lycoris: bool,
               peft_name: str) -> None:
    """LoKr through the same diffusers loader: it builds PEFT's LoKrConfig from the factors' shapes (same
    factorisation as LyCORIS) with scale 1, so each module's scale is baked into its first factor here:
    LyCORIS' alpha / rank (1 when both factors are full), or PEFT's alpha / r from adapter_config.json."""
    shape = model_shape(pipe)
    out: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        w1, w2 = manifest.lokr_factors(name, module, shape)
        low = w2[2] or w1[2]
        if lycoris:
            prefix = "lycoris_" + name.replace(".", "_")
            alpha_t = state.get(f"{prefix}.alpha")
            scale = 1.0 if low is None or alpha_t is None else float(alpha_t) / low
        else:
            prefix = next(k for k in state if _peft_module(k) == name).rpartition(".lokr_")[0]
            r, alpha = _pattern_value(config, "rank_pattern", "r", name), _pattern_value(config, "alpha_pattern",
                                                                                          "alpha", name)
            scale = float(alpha) / float(r) if r else 1.0
        target = "transformer." + _diffusers_module(name)
        for param in module.params:
            tensor = state[f"{prefix}.{param}"]
            if param in ("lokr_w1", "lokr_w1_a"):
                tensor = tensor * scale
            out[f"{target}.{param}"] = tensor
    AceStepPipeline.load_lora_into_transformer(_as_model(out, pipe), transformer=pipe.transformer,
                                               adapter_name=peft_name, _pipeline=pipe, low_cpu_mem_usage=True)


def _as_model(state: dict[str, torch.Tensor], pipe: AceStepPipeline) -> dict[str, torch.Tensor]:
    """The weights in the DiT's dtype and on its device, so PEFT takes them as they are (low_cpu_mem_usage:
    no random initialisation of layers about to be overwritten, no second copy)."""
    param = next(pipe.transformer.parameters())
    return {k: v.to(device=param.device, dtype=param.dtype) for k, v in state.items()}


def _peft_module(key: str) -> Optional[str]:
    m = manifest._DOTTED_KEY.match(key)
    if m is None:
        return None
    return f"layers.{int(m['layer'])}.{m['block']}.{manifest._DIFFUSERS_TO_ORIGINAL.get(m['proj'], m['proj'])}"


def _pattern_value(config: dict, pattern: str, default_key: str, module: str) -> Any:
    """A PEFT per-module value: the longest rank/alpha pattern key the module name ends with, else the default."""
    names = (module, _diffusers_module(module))
    best = None
    for key, value in (config.get(pattern) or {}).items():
        if any(n == key or n.endswith("." + key) for n in names) and (best is None or len(key) > len(best[0])):
            best = (key, value)
    if best is not None:
        return best[1]
    return config.get(default_key, 1.0)


def _forget(transformer, peft_name: str) -> None:
    config = getattr(transformer, "peft_config", None) or {}
    if peft_name in config:
        try:
            transformer.delete_adapters(peft_name)
        except Exception:  # noqa: BLE001 - best effort after a failed load; the error being raised says why
            log.exception("could not remove the half-loaded adapter %s", peft_name)


def _adapter_bytes(transformer) -> int:
    return sum(p.numel() * p.element_size() for n, p in transformer.named_parameters()
               if "lora_" in n or "lokr_" in n)


def local_adapter_bytes(lora_dir: str | Path) -> int:
    """The weights' bytes of every adapter under `lora_dir` (what loading them all would hold, about)."""
    root = Path(lora_dir)
    if not root.is_dir():
        return 0
    total = 0
    for entry in root.iterdir():
        if entry.name.startswith("."):
            continue
        try:
            total += manifest.locate(entry).weights.stat().st_size
        except (AdapterInvalid, OSError):
            continue
    return total
