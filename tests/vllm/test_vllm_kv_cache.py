"""vLLM's own engine config takes the KV cache the fit check sized (engine/lm/vllm_backend.kv_cache_for), on the
CPU build too: built from the engine arguments without starting a second engine."""
from __future__ import annotations


def test_vllms_config_holds_the_kv_cache_sized_from_the_fit_check(lm_dir, monkeypatch):
    from vllm.engine.arg_utils import EngineArgs

    from engine.lm.vllm_backend import GiB, KV_ROWS, engine_kwargs, kv_cache_for

    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)  # vLLM's older CPU setting wins when set
    kv = kv_cache_for(lm_dir, 8 * GiB, dtype="float32", max_model_len=2048, max_num_seqs=32)
    assert 0 < kv < GiB and kv % (KV_ROWS * 2048) == 0  # the tiny LM: 16 rows of 2,048 tokens
    config = EngineArgs(**engine_kwargs(lm_dir, max_model_len=2048, max_num_seqs=32, max_batched_tokens=2048,
                                        dtype="float32", enforce_eager=True, seed=0,
                                        kv_cache_bytes=kv)).create_engine_config()
    assert config.cache_config.kv_cache_memory_bytes == kv
