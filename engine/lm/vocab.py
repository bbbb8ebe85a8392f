"""What the 5 Hz LM may write, and where its special tokens sit in a given tokenizer (torch-free).

Value sets (upstream acestep/constants.py): bpm 30-300, duration 10-600 s, time signature 2/3/4/6, 70 key/scale
names (7 notes x {"", #, b, ♯, ♭} x {major, minor}), 51 language codes, audio codes 0-63999 (FSQ levels
[8,8,8,5,5,5] = 64,000 codes; the published vocabulary holds 65,535 code tokens, the last 1,535 unused).

Every token id is looked up through the tokenizer, never hard-coded: the tiny test LM and the real
217,204-token vocabulary place the same tokens at different ids.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Protocol, Sequence

BPM_RANGE = (30, 300)
DURATION_RANGE = (10, 600)
TIME_SIGNATURES = ("2", "3", "4", "6")
KEYSCALE_NOTES = ("A", "B", "C", "D", "E", "F", "G")
KEYSCALE_ACCIDENTALS = ("", "#", "b", "♯", "♭")
KEYSCALE_MODES = ("major", "minor")
KEYSCALES = tuple(f"{n}{a} {m}" for n in KEYSCALE_NOTES for a in KEYSCALE_ACCIDENTALS for m in KEYSCALE_MODES)
LANGUAGES = (
    "ar", "az", "bg", "bn", "ca", "cs", "da", "de", "el", "en",
    "es", "fa", "fi", "fr", "he", "hi", "hr", "ht", "hu", "id",
    "is", "it", "ja", "ko", "la", "lt", "ms", "ne", "nl", "no",
    "pa", "pl", "pt", "ro", "ru", "sa", "sk", "sr", "sv", "sw",
    "ta", "te", "th", "tl", "tr", "uk", "ur", "vi", "yue", "zh",
    "unknown",
)
CODES_PER_SECOND = 5
MAX_AUDIO_CODE = 63999  # codebook size 64,000

# Field order of the metadata block (upstream's FSM order; the parser accepts any order).
FIELDS = ("bpm", "caption", "duration", "genres", "keyscale", "language", "timesignature")

EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
IM_START_TOKEN = "<|im_start|>"
THINK_TOKEN = "<think>"
THINK_END_TOKEN = "</think>"
AUDIO_CODE_TOKEN_RE = re.compile(r"^<\|audio_code_(\d+)\|>$")


def audio_code_token(code: int) -> str:
    return f"<|audio_code_{code}|>"


class TokenizerLike(Protocol):
    """The part of a Hugging Face tokenizer this package uses (transformers' fast tokenizers qualify)."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = ...) -> list[str]: ...

    def get_vocab(self) -> dict[str, int]: ...

    def convert_tokens_to_ids(self, tokens: Any) -> Any: ...

    def __len__(self) -> int: ...


class VocabularyError(ValueError):
    """The tokenizer lacks a token the 5 Hz LM format needs."""


@dataclass
class LMVocab:
    """Ids of the format's tokens in one tokenizer, and the token classes the constraints need.

    `size` is the width of the model's logits (it may exceed the tokenizer's length; ids past the tokenizer
    are never allowed by a constraint).
    """

    size: int
    eos_id: int
    pad_id: int
    im_start_id: int
    think_id: int
    think_end_id: int
    newline_id: int
    code_to_id: dict[int, int]  # valid codes 0-63999 only
    id_to_code: dict[int, int]  # every audio-code token, including the unused ones past 63999
    special_ids: frozenset[int]  # added/special tokens (chat markup, think tags, audio codes, ...)
    token_text: list[str] = field(repr=False)  # decoded text of each tokenizer id ("" past the tokenizer)

    @classmethod
    def from_tokenizer(cls, tokenizer: TokenizerLike, logits_size: Optional[int] = None) -> "LMVocab":
        vocab = tokenizer.get_vocab()
        n_tok = len(tokenizer)
        size = max(logits_size or 0, n_tok)

        def need(token: str) -> int:
            tid = vocab.get(token)
            if tid is None:
                raise VocabularyError(f"the LM tokenizer has no {token!r} token: not an ACE-Step 5 Hz LM tokenizer")
            return tid

        newline = tokenizer.encode("\n", add_special_tokens=False)
        if len(newline) != 1:
            raise VocabularyError(f"'\\n' is not a single token in this tokenizer ({newline})")
        id_to_code: dict[int, int] = {}
        for tok, tid in vocab.items():
            m = AUDIO_CODE_TOKEN_RE.match(tok)
            if m:
                id_to_code[tid] = int(m.group(1))
        code_to_id = {c: i for i, c in id_to_code.items() if c <= MAX_AUDIO_CODE}
        if not code_to_id:
            raise VocabularyError("the LM tokenizer has no <|audio_code_N|> tokens")
        specials = added_token_ids(tokenizer, vocab) | set(id_to_code)
        texts = token_texts(tokenizer, n_tok) + [""] * (size - n_tok)
        return cls(size=size, eos_id=need(EOS_TOKEN), pad_id=need(PAD_TOKEN), im_start_id=need(IM_START_TOKEN),
                   think_id=need(THINK_TOKEN), think_end_id=need(THINK_END_TOKEN), newline_id=newline[0],
                   code_to_id=code_to_id, id_to_code=id_to_code, special_ids=frozenset(specials),
                   token_text=texts)

    def codes_from_ids(self, ids: Iterable[int]) -> list[int]:
        """The audio codes among generated ids, in order (other tokens and unused codes dropped)."""
        out = []
        for i in ids:
            c = self.id_to_code.get(i)
            if c is not None and c <= MAX_AUDIO_CODE:
                out.append(c)
        return out


def _byte_level_decoder(tokenizer: Any) -> Optional[dict[str, int]]:
    """char -> byte of a byte-level BPE (GPT-2/Qwen) tokenizer, None for any other kind."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or type(backend.decoder).__name__ != "ByteLevel":
        return None
    # GPT-2's byte <-> printable-character table
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def token_texts(tokenizer: TokenizerLike, n: int) -> list[str]:
    """The decoded text of each id below n, as `decode([id])` gives it (partial UTF-8 sequences become U+FFFD).

    Byte-level BPE vocabularies are decoded from their token strings directly (217k tokens in well under a second,
    instead of seconds through the tokenizer); other tokenizers go through batch_decode.
    """
    byte_of = _byte_level_decoder(tokenizer)
    convert = getattr(tokenizer, "convert_ids_to_tokens", None)
    if byte_of is None or convert is None:
        return tokenizer.batch_decode([[i] for i in range(n)], skip_special_tokens=False)
    added = added_token_ids(tokenizer, tokenizer.get_vocab())
    texts = []
    for i, tok in enumerate(convert(list(range(n)))):
        if i in added or tok is None:  # added tokens are stored as their literal text
            texts.append(tok or "")
            continue
        try:
            texts.append(bytes(byte_of[c] for c in tok).decode("utf-8", errors="replace"))
        except KeyError:  # not a byte-level string after all
            texts.append(tokenizer.batch_decode([[i]], skip_special_tokens=False)[0])
    return texts


def added_token_ids(tokenizer: Any, vocab: dict[str, int]) -> set[int]:
    """Ids of the tokens added on top of the BPE vocabulary (chat markup, think tags, audio codes ...)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # the Rust tokenizer knows its base vocabulary: fast even with 65k added tokens
        base = set(backend.get_vocab(with_added_tokens=False).values())
        return {i for i in vocab.values() if i not in base}
    added = getattr(tokenizer, "get_added_vocab", None)
    return set(added().values()) if callable(added) else set()


class TokenizerText:
    """Text <-> ids as the planner's prompts need them, for every LM backend: the chat template already holds
    the special tokens (none added on encode), and decoded text keeps them (the parser reads `<think>`)."""

    tokenizer: Any

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode_text(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)
