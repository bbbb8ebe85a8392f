"""Adapter files for the API and client tests: tiny PEFT LoRA safetensors (headers + zero bytes) in the shapes
of the published ACE-Step 1.5 DiT (the default model, acestep-v15-turbo); the API reads only headers."""
from __future__ import annotations

import json
import struct

from engine.adapter_manifest import published_shape

SHAPE = published_shape("acestep-v15-turbo")


def lora_file(rank: int = 2, layers: int = 2, in_features: int | None = None) -> bytes:
    """A PEFT LoRA on q_proj/v_proj of the first `layers` self-attention blocks, as one .safetensors."""
    assert SHAPE is not None
    hidden = SHAPE.hidden_size
    q, kv = SHAPE.num_attention_heads * SHAPE.head_dim, SHAPE.num_key_value_heads * SHAPE.head_dim
    header: dict = {}
    offset = 0
    for layer in range(layers):
        for proj, out in (("q_proj", q), ("v_proj", kv)):
            base = f"base_model.model.layers.{layer}.self_attn.{proj}"
            for param, shape in (("lora_A", [rank, in_features or hidden]), ("lora_B", [out, rank])):
                size = shape[0] * shape[1] * 2
                header[f"{base}.{param}.weight"] = {"dtype": "F16", "shape": shape, "data_offsets": [offset, offset + size]}
                offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + bytes(offset)
