"""vLLM's KV cache sized from what the engine's fit check leaves beside the DiT, never a share of the card
(engine/lm/vllm_backend.py): the pure sizing and the engine arguments that carry it. Runs in the main venv
(no vLLM import); tests/vllm checks that vLLM's own config takes the figure."""
from __future__ import annotations

import json

import pytest

from engine.lm.vllm_backend import (
    GiB,
    KV_ROWS,
    VLLM_RUNTIME_BYTES,
    VllmMemoryError,
    engine_kwargs,
    kv_bytes_per_token,
    kv_cache_bytes,
    kv_cache_for,
)

# the published 1.7B 5 Hz LM's attention (Qwen3-1.7B): 28 layers, 8 KV heads of 128
LM_17B = {"num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
          "hidden_size": 2048}


def test_the_kv_cache_takes_what_the_fit_check_leaves_after_the_lms_weights_and_runtime():
    per_token = kv_bytes_per_token(LM_17B, 2)
    assert per_token == 2 * 28 * 8 * 128 * 2 == 114688  # 112 KiB a token in bf16
    weights = int(3.4 * GiB)
    # a 24 GB card after a 2B DiT, text encoder and VAE working set: 10 GiB left -> 5.1 GiB of KV cache
    assert kv_cache_bytes(10 * GiB, weights, per_token, max_model_len=4096, max_num_seqs=KV_ROWS) == \
        10 * GiB - weights - VLLM_RUNTIME_BYTES
    # a large card: no more than KV_ROWS full-length sequences can use
    assert kv_cache_bytes(60 * GiB, weights, per_token, max_model_len=4096, max_num_seqs=KV_ROWS) == \
        KV_ROWS * 4096 * per_token
    # too little for one CFG pair of full-length sequences: refused with the numbers
    with pytest.raises(VllmMemoryError, match=r"vLLM needs 3.4 GiB for the LM's weights, 1.5 GiB of runtime and at "
                                              r"least 0.88 GiB of KV cache \(2 x 4096 tokens\), but the fit check "
                                              r"leaves 5.0 GiB beside the DiT"):
        kv_cache_bytes(5 * GiB, weights, per_token, max_model_len=4096, max_num_seqs=KV_ROWS)


def test_the_engine_arguments_carry_the_sized_cache(tmp_path):
    from safetensors.torch import save_file
    import torch

    config = {**LM_17B, "num_hidden_layers": 2, "torch_dtype": "bfloat16"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file({"lm_head.weight": torch.zeros(64, 32, dtype=torch.bfloat16)}, str(tmp_path / "model.safetensors"))
    kv = kv_cache_for(tmp_path, 8 * GiB, dtype="auto", max_model_len=2048, max_num_seqs=64)
    assert kv == KV_ROWS * 2048 * kv_bytes_per_token(config, 2)  # capped at the rows the planner runs at once
    assert kv_cache_for(tmp_path, 8 * GiB, dtype="float32", max_model_len=2048, max_num_seqs=64) == 2 * kv
    args = engine_kwargs(tmp_path, max_model_len=2048, max_num_seqs=64, max_batched_tokens=1024, dtype="auto",
                         enforce_eager=True, seed=0, kv_cache_bytes=kv)
    assert args["kv_cache_memory_bytes"] == kv and args["max_num_batched_tokens"] == 2048
    assert "gpu_memory_utilization" not in args
    assert "kv_cache_memory_bytes" not in engine_kwargs(tmp_path, max_model_len=2048, max_num_seqs=64,
                                                        max_batched_tokens=1024, dtype="auto", enforce_eager=True,
                                                        seed=0, kv_cache_bytes=None)
