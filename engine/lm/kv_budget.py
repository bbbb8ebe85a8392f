"""The 5 Hz LM's KV cache in bytes, from the LM's config.json (torch-free).

One formula for three readers: the transformers backend sizes each decode's cache with `cache_tokens` (its static
cache is allocated whole at that length, its dynamic one peaks there), the engine's fit check counts
`fit_cache_bytes` before loading anything, and vLLM's cache is sized in `kv_bytes_per_token`s.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from engine.types import GenerationError

# The most tokens one decoded sequence spans (prompt + new tokens), on both backends: vLLM's max_model_len, and
# the length the fit check counts the transformers LM's cache at. The longest song's codes (600 s x 5 + 1) leave
# room for a 1,095-token prompt.
LM_MAX_CONTEXT = 4096
# The generation the start-up fit check counts: one song, with CFG (its unconditional twin is a second row),
# as the DiT's working memory counts one song decoded in tiles. A batch's items each add such a pair when the LM
# decodes them together (allow_lm_batch); allow_lm_batch=false decodes them one pair at a time, and the
# transformers backend splits a batch into groups whose caches fit what is available when it decodes.
FIT_ITEMS = 1
FIT_TERMS = f"one song with CFG, 2 rows of {LM_MAX_CONTEXT} tokens"  # what a refusal says the count holds


def read_config(folder: Path) -> dict[str, Any]:
    return dict(json.loads((Path(folder) / "config.json").read_text()))


def kv_bytes_per_token(config: Mapping[str, Any], dtype_bytes: int) -> int:
    """KV cache bytes one token of one row takes in every layer (keys and values)."""
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
    kv_heads = int(config.get("num_key_value_heads") or heads)
    return 2 * int(config["num_hidden_layers"]) * kv_heads * head_dim * dtype_bytes


def cache_rows(items: int, cfg: bool) -> int:
    """Rows of one decode: an item's conditional sequence, and with CFG its unconditional twin."""
    return items * (2 if cfg else 1)


def kv_cache_bytes(config: Mapping[str, Any], dtype_bytes: int, *, rows: int, tokens: int) -> int:
    """What a cache of `rows` sequences of `tokens` takes: a static cache's allocation (transformers'
    StaticCache: keys and values [rows, kv_heads, tokens, head_dim] per layer), a dynamic one's at its end."""
    return rows * tokens * kv_bytes_per_token(config, dtype_bytes)


def new_tokens_room(prompt_tokens: int, max_new_tokens: int, max_context: int = LM_MAX_CONTEXT) -> int:
    """The new tokens a decode may write: `max_new_tokens` (an upper limit, not a length: a decode stops at its stop
    token) cut to what the context leaves after the (padded) prompt. A sequence ends at the context then, as vLLM v1
    ends one at max_model_len (FINISHED_LENGTH_CAPPED); upstream's own cap, max_model_len - 64, is looser than this
    for any prompt over 64 tokens. Refused only when the prompt leaves no room at all (the planner refuses first,
    saying what to change for its step)."""
    room = max_context - prompt_tokens
    if room < 1:
        raise GenerationError(
            f"the 5 Hz LM's context is at most {max_context} tokens, but this step's prompt takes {prompt_tokens}, "
            "leaving no room to write: shorten its input")
    return min(max_new_tokens, room)


def cache_tokens(prompt_tokens: int, max_new_tokens: int, max_context: int = LM_MAX_CONTEXT) -> int:
    """The length a decode's cache is allocated at (static) or may grow to (dynamic): the (padded) prompt plus
    every token it may add (new_tokens_room), so at most `max_context`."""
    return prompt_tokens + new_tokens_room(prompt_tokens, max_new_tokens, max_context)


def fit_cache_bytes(config: Mapping[str, Any], dtype_bytes: int, *, items: int = FIT_ITEMS,
                    tokens: int = LM_MAX_CONTEXT) -> int:
    """The KV cache the fit check counts for the transformers LM: `items` songs with CFG at the full context."""
    return kv_cache_bytes(config, dtype_bytes, rows=cache_rows(items, cfg=True), tokens=tokens)
