"""A tiny random 5 Hz LM for tests and demos: built offline in seconds, loaded like the real one.

The folder looks like a published `acestep-5Hz-lm-*` folder (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json, chat_template.jinja, generation_config.json) and its tokenizer has the real special-token
layout, in the real order: a byte-level BPE base vocabulary, Qwen3's 26 added tokens (`<|endoftext|>`,
`<|im_start|>`, `<|im_end|>` ... `<think>`, `</think>`), then `<|audio_code_0|>` ... `<|audio_code_{n-1}|>`
(65,535 by default, as published: codes 64000+ exist but are never valid). Only the base vocabulary is small
(about 1,000 tokens instead of 151,643), so every special id differs from the real one: code that hard-codes an id
fails on this model. The weights are random (a `acestep_demo.json` marker says so): its output is noise, but it is
well-formed noise once constrained.

Its pre-tokenizer is Qwen2/3's (single digits, letters with one leading space or punctuation), so numbers and
metadata lines split into tokens the way they do in the real vocabulary.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Optional

from engine.weights.demo_marker import DEMO_MARKER
from engine.lm.vocab import KEYSCALES, LANGUAGES, audio_code_token

LM_DEMO_NOTICE = "random weights: the 5 Hz LM's metadata and audio codes are noise"
DEFAULT_TINY_LM_NAME = "acestep-5Hz-lm-tiny"
PUBLISHED_AUDIO_CODE_TOKENS = 65535

# Qwen2/3's pre-tokenizer split pattern.
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
              r"\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen3's added tokens in id order; the first 14 are special, the rest (tool/fim/think tags) are not.
QWEN3_ADDED_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>",
)
N_SPECIAL_QWEN3 = 14

# A ChatML template written for this fixture. For the messages this package renders (a system and a user turn,
# optionally a last assistant turn holding a `<think>` block) it renders what Qwen3's stock template renders:
# an assistant turn becomes `<think>\n{reasoning}\n</think>\n\n{rest}`. The real checkpoint ships Qwen3's own.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}"
    "{%- set content = message.content %}{%- set reasoning = '' %}"
    "{%- if '</think>' in content %}"
    "{%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content"
    " + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_WORDS = ("a calm piano ballad with soft strings and warm vocals energetic rock song driving drums electric "
          "guitar riffs dreamy synth pop with airy female vocal lush pads slow tempo melancholic folk acoustic "
          "upbeat dance track punchy bass bright lead jazz trio brushed snare walking bass cinematic orchestral "
          "piece rising brass epic choir the track opens builds into chorus verse bridge outro love night city "
          "heart rain light fire dream sky home road we you i my your and of in on to with under over").split()


def _corpus(rng: random.Random) -> list[str]:
    """Synthetic text shaped like the LM's prompts and outputs (BPE training material)."""
    lines = []
    for _ in range(400):
        caption = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 14)))
        lines.append(f"# Instruction\nGenerate audio semantic tokens based on the given conditions:\n\n"
                     f"# Caption\n{caption}\n\n# Lyric\n[Verse]\n"
                     + "\n".join(" ".join(rng.choice(_WORDS) for _ in range(6)) for _ in range(4)) + "\n")
        lines.append(f"bpm: {rng.randint(30, 300)}\ncaption: {caption}\nduration: {rng.randint(10, 600)}\n"
                     f"genres: {rng.choice(_WORDS)} {rng.choice(_WORDS)}\nkeyscale: {rng.choice(KEYSCALES)}\n"
                     f"language: {rng.choice(LANGUAGES)}\ntimesignature: {rng.choice('2346')}\n")
    lines += [f"keyscale: {k}\n" for k in KEYSCALES] + [f"language: {lang}\n" for lang in LANGUAGES]
    lines.append("[Chorus] [Bridge] [Outro] [Instrumental] NO USER INPUT instrumental: true false `code`")
    return lines


def build_tokenizer(audio_codes: int = PUBLISHED_AUDIO_CODE_TOKENS, base_vocab: int = 1024, seed: int = 0):
    """A transformers fast tokenizer with the 5 Hz LM's token layout (see the module docstring)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=base_vocab, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(random.Random(seed)), trainer=trainer)
    tok.add_tokens([AddedToken(t, special=i < N_SPECIAL_QWEN3, normalized=False)
                    for i, t in enumerate(QWEN3_ADDED_TOKENS)])
    tok.add_tokens([AddedToken(audio_code_token(n), special=True, normalized=False) for n in range(audio_codes)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   model_input_names=["input_ids", "attention_mask"])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_lm(path: str | os.PathLike, *, seed: int = 0, audio_codes: int = PUBLISHED_AUDIO_CODE_TOKENS,
                  hidden_size: int = 128, layers: int = 2, heads: int = 2, kv_heads: int = 1, head_dim: int = 64,
                  intermediate_size: int = 256, notice: Optional[str] = None) -> Path:
    """Save a random Qwen3ForCausalLM + tokenizer as a 5 Hz LM folder at `path` (see the module docstring).

    Deterministic for a seed. head_dim 64 by default because vLLM's CPU attention rejects smaller heads.
    """
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(audio_codes=audio_codes, seed=seed)
    ids = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=ids[0], pad_token_id=ids[0],
        eos_token_id=ids[1], dtype="float32",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    # transformers 5 records its internal backend class; the published folders name Qwen2Tokenizer.
    cfg_file = path / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["tokenizer_class"] = "Qwen2Tokenizer"
    cfg_file.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    marker = {"random_weights": True, "notice": notice or LM_DEMO_NOTICE, "kind": "5hz-lm",
              "audio_code_tokens": audio_codes, "seed": seed}
    (path / DEMO_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return path


def is_random_lm(path: str | os.PathLike) -> bool:
    """True for a folder built here (its marker says random weights)."""
    marker = Path(path) / DEMO_MARKER
    if not marker.is_file():
        return False
    try:
        return bool(json.loads(marker.read_text()).get("random_weights", True))
    except (OSError, json.JSONDecodeError):
        return True  # a damaged marker still means "not real weights"
