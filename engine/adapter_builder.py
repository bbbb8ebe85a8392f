"""Random-weight LoRA and LoKr adapters in the layouts upstream's trainer writes, for tests and benchmarks.

    lora: <out>/adapter_config.json + <out>/adapter_model.safetensors  (PEFT save_pretrained of the DiT decoder:
          keys base_model.model.layers.N.{self_attn,cross_attn}.{q,k,v,o}_proj.lora_{A,B}.weight)
    lokr: <out>/lokr_weights.safetensors  (LyCORIS: keys lycoris_layers_N_..._q_proj.{lokr_w1,lokr_w2_a,lokr_w2_b,alpha},
          metadata algo=lokr, format=lycoris)

Both carry `random_weights: true` in their safetensors metadata and are listed as such: they change the audio
(their B factors are not zero, unlike a freshly initialised trainer's) but they are noise, not a style.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from engine.adapter_manifest import DIFFUSERS_METADATA_KEY, LYCORIS_WEIGHTS, PEFT_CONFIG, PEFT_WEIGHTS, RANDOM_MARK, ModelShape

UPSTREAM_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")  # upstream's trainer default, both attentions
BLOCKS = ("self_attn", "cross_attn")
NOTICE = "random weights: a test adapter, not a style"


def model_shape_at(model_dir: Path) -> ModelShape:
    """The DiT geometry of a diffusers-layout model folder."""
    return ModelShape.from_config(json.loads((Path(model_dir) / "transformer" / "config.json").read_text()))


def build_tiny_adapter(out: Path, shape: ModelShape, kind: Literal["lora", "lokr"] = "lora", rank: int = 4,
                       alpha: float | None = None, seed: int = 0, std: float = 0.05, single_file: bool = False,
                       kohya: bool = False) -> Path:
    """Writes folder `out` (upstream's layouts above); with `single_file`, a LoRA as one `out`.safetensors whose
    header carries its config (diffusers' lora_adapter_metadata), the form other front ends pass around; with
    `kohya`, a LoRA as one `out`.safetensors in kohya-ss naming (lora_unet_decoder_layers_N_..., lora_down/lora_up
    and a per-module alpha), as ComfyUI-style tools write it. The same seed gives the same weights in each form."""
    import torch
    from safetensors.torch import save_file

    out = Path(out)
    if not (single_file or kohya) or kind == "lokr":
        out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    alpha = float(2 * rank if alpha is None else alpha)  # upstream's default alpha is twice the rank
    meta = {RANDOM_MARK: "true", "notice": NOTICE}
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(shape.num_hidden_layers):
        for block in BLOCKS:
            for proj in UPSTREAM_TARGETS:
                out_f, in_f = shape.linear(block, proj)
                if kind == "lora":
                    key = f"base_model.model.layers.{layer}.{block}.{proj}"
                    tensors[f"{key}.lora_A.weight"] = torch.randn(rank, in_f, generator=gen) / in_f ** 0.5
                    tensors[f"{key}.lora_B.weight"] = torch.randn(out_f, rank, generator=gen) * std
                else:
                    tensors.update(_lokr_module(f"lycoris_layers_{layer}_{block}_{proj}", out_f, in_f, rank,
                                                alpha, gen, std))
    if kind == "lora" and kohya:
        renamed: dict[str, torch.Tensor] = {}
        for key, tensor in tensors.items():
            module = "lora_unet_decoder_" + key.removeprefix("base_model.model.").rsplit(".", 2)[0].replace(".", "_")
            param = "lora_down" if ".lora_A." in key else "lora_up"
            renamed[f"{module}.{param}.weight"] = tensor
            renamed[f"{module}.alpha"] = torch.tensor(alpha)
        out.parent.mkdir(parents=True, exist_ok=True)
        path = out.with_name(out.name + ".safetensors")
        save_file(renamed, str(path), metadata=meta | {"ss_network_module": "networks.lora", "ss_network_dim": str(rank),
                                                        "ss_network_alpha": str(alpha)})
        return path
    if kind == "lora":
        config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "lora_dropout": 0.1, "bias": "none",
                  "target_modules": list(UPSTREAM_TARGETS), "task_type": None, "inference_mode": True,
                  "base_model_name_or_path": None, "use_dora": False}
        if single_file:
            out.parent.mkdir(parents=True, exist_ok=True)
            path = out.with_name(out.name + ".safetensors")
            save_file(tensors, str(path), metadata=meta | {DIFFUSERS_METADATA_KEY: json.dumps(config)})
            return path
        save_file(tensors, str(out / PEFT_WEIGHTS), metadata=meta)
        (out / PEFT_CONFIG).write_text(json.dumps(config | {RANDOM_MARK: True, "notice": NOTICE}, indent=2) + "\n")
    else:
        lokr_config = {"linear_dim": rank, "linear_alpha": alpha, "factor": -1, "decompose_both": False,
                       "target_modules": list(UPSTREAM_TARGETS)}
        save_file(tensors, str(out / LYCORIS_WEIGHTS),
                  metadata=meta | {"algo": "lokr", "format": "lycoris", "lokr_config": json.dumps(lokr_config)})
    return out


def _lokr_module(prefix: str, out_f: int, in_f: int, rank: int, alpha: float, gen, std: float) -> dict:
    import torch
    from peft.tuners.lokr.layer import factorization  # LyCORIS' factorisation, as PEFT carries it

    out_l, out_k = factorization(out_f, -1)
    in_m, in_n = factorization(in_f, -1)
    w = {f"{prefix}.lokr_w1": torch.randn(out_l, in_m, generator=gen) * std ** 0.5,
         f"{prefix}.alpha": torch.tensor(alpha)}
    if rank < max(out_k, in_n) / 2:  # LyCORIS keeps w2 low-rank only where that is smaller
        w[f"{prefix}.lokr_w2_a"] = torch.randn(out_k, rank, generator=gen) * std ** 0.5
        w[f"{prefix}.lokr_w2_b"] = torch.randn(rank, in_n, generator=gen) / in_n ** 0.5
    else:
        w[f"{prefix}.lokr_w2"] = torch.randn(out_k, in_n, generator=gen) * std ** 0.5 / in_n ** 0.5
    return w
