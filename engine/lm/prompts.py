"""The 5 Hz LM's prompts, rendered as text (torch-free; shared by every backend).

The strings are what upstream gets from `tokenizer.apply_chat_template` with the checkpoint's stock Qwen3 chat
template, rendered here directly so that no backend depends on a template engine and a vLLM backend can send the
same text (or its token ids). For the message shapes used here Qwen3's template gives:

    <|im_start|>system\\n# Instruction\\n{instruction}\\n\\n<|im_end|>\\n
    <|im_start|>user\\n{user}<|im_end|>\\n
    <|im_start|>assistant\\n                                               <- generation prompt (phase 1, understand)
    <|im_start|>assistant\\n<think>\\n{reasoning}\\n</think>\\n\\n<|im_end|>\\n   <- prefilled assistant turn (phase 2)

Phase 2's codes are generated after that prefilled turn's `<|im_end|>\\n`: that is how upstream renders it, and
the model was trained on it.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

INSTRUCTION_GENERATE = "Generate audio semantic tokens based on the given conditions:"
INSTRUCTION_UNDERSTAND = "Understand the given musical conditions and describe the audio semantics accordingly:"
INSTRUCTION_INSPIRE = "Expand the user's input into a more detailed and specific musical description:"
INSTRUCTION_FORMAT = "Format the user's input into a more detailed and specific musical description:"
NO_USER_INPUT = "NO USER INPUT"
INSTRUMENTAL_LYRICS = "[Instrumental]"
# The metadata the phase-2 prompt carries (upstream never re-injects genres).
COT_FIELDS = ("bpm", "caption", "duration", "keyscale", "language", "timesignature")


def render_chat(messages: Sequence[tuple[str, str]], add_generation_prompt: bool) -> str:
    """ChatML as Qwen3's template renders (role, content) turns; a (last) assistant turn gets its think block
    split out and re-rendered as `<think>\\n{reasoning}\\n</think>\\n\\n{rest}`."""
    out = []
    for role, content in messages:
        if role == "assistant":
            reasoning = ""
            if "</think>" in content:
                reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
                content = content.split("</think>")[-1].lstrip("\n")
            out.append(f"<|im_start|>assistant\n<think>\n{reasoning.strip(chr(10))}\n</think>\n\n{content}"
                       "<|im_end|>\n")
        else:
            out.append(f"<|im_start|>{role}\n{content}<|im_end|>\n")
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)


def system_content(instruction: str) -> str:
    return f"# Instruction\n{instruction}\n\n"


def caption_lyrics(caption: str, lyrics: str) -> str:
    return f"# Caption\n{caption}\n\n# Lyric\n{lyrics}\n"


def has_negative_prompt(negative_prompt: Optional[str]) -> bool:
    """Upstream: an empty negative prompt or "NO USER INPUT" means none."""
    text = (negative_prompt or "").strip()
    return bool(text) and text != NO_USER_INPUT


def cot_prompt(caption: str, lyrics: str) -> str:
    """Phase 1 (metadata), conditional."""
    return render_chat([("system", system_content(INSTRUCTION_GENERATE)), ("user", caption_lyrics(caption, lyrics))],
                       add_generation_prompt=True)


def cot_unconditional_prompt(lyrics: str, negative_prompt: Optional[str]) -> str:
    """Phase 1, unconditional (CFG): the negative prompt replaces the caption, or the caption is dropped."""
    if has_negative_prompt(negative_prompt):
        user = caption_lyrics((negative_prompt or "").strip(), lyrics)
    else:
        user = f"# Lyric\n{lyrics}\n"
    return render_chat([("system", system_content(INSTRUCTION_GENERATE)), ("user", user)], add_generation_prompt=True)


def codes_prompt(caption: str, lyrics: str, cot_text: str) -> str:
    """Phase 2 (audio codes), conditional: the metadata block as a prefilled assistant turn."""
    text = render_chat([("system", system_content(INSTRUCTION_GENERATE)), ("user", caption_lyrics(caption, lyrics)),
                        ("assistant", cot_text)], add_generation_prompt=False)
    return text if text.endswith("\n") else text + "\n"


def codes_unconditional_prompt(caption: str, lyrics: str, negative_prompt: Optional[str]) -> str:
    """Phase 2, unconditional (CFG): an empty think block; the negative prompt replaces the caption if given."""
    if has_negative_prompt(negative_prompt):
        caption = (negative_prompt or "").strip()
    return codes_prompt(caption, lyrics, "<think>\n</think>")


def format_prompt(caption: str, lyrics: str) -> str:
    """`use_format` / `/format_input`: rewrite caption and lyrics (no trailing newline after the lyrics)."""
    user = f"# Caption\n{caption or NO_USER_INPUT}\n\n# Lyric\n{lyrics or INSTRUMENTAL_LYRICS}"
    return render_chat([("system", system_content(INSTRUCTION_FORMAT)), ("user", user)], add_generation_prompt=True)


def sample_prompt(query: str, instrumental: bool) -> str:
    """`sample_mode` / `sample_query`: a whole song (caption, lyrics, metadata) from a description."""
    user = f"{query.strip() or NO_USER_INPUT}\n\ninstrumental: {'true' if instrumental else 'false'}"
    return render_chat([("system", system_content(INSTRUCTION_INSPIRE)), ("user", user)], add_generation_prompt=True)


def understand_prompt(code_string: str) -> str:
    """Audio codes -> metadata and lyrics."""
    return render_chat([("system", system_content(INSTRUCTION_UNDERSTAND)), ("user", code_string)],
                       add_generation_prompt=True)


def cot_items(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The metadata phase 2 sees: the COT_FIELDS present; digit strings become ints, "3/4" becomes 3."""
    items: dict[str, Any] = {}
    for key in COT_FIELDS:
        value = metadata.get(key)
        if value is None or value == "":
            continue
        if key == "timesignature" and isinstance(value, str) and value.endswith("/4"):
            value = value[:-2]
        if isinstance(value, str) and value.isdigit():
            value = int(value)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        items[key] = value
    return items


def cot_text(metadata: Mapping[str, Any]) -> str:
    """`<think>\\n{yaml}\\n</think>` as upstream writes it: yaml.dump(sort_keys=True, allow_unicode=True), so long
    captions wrap at 80 columns with indented continuation lines, as in training."""
    import yaml

    items = cot_items(metadata)
    body = yaml.dump(items, allow_unicode=True, sort_keys=True).strip() if items else ""
    return f"<think>\n{body}\n</think>"
