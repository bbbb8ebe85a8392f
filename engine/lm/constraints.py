"""Constrained decoding for the 5 Hz LM, framework-neutral (torch-free).

A constraint is a small per-sequence state machine with two calls, so any runtime can drive it:

    allowed() -> Allowed      what the next token may be (a named token class and/or explicit ids)
    advance(token_id)         the token that was chosen

`engine.lm.masking` turns `Allowed` into logits masks for torch (transformers here; a vLLM logits processor
can call the same two methods per request and the same mask code).

Two constraints:

* `MetadataConstraint`, phase 1 and the understand modes: `<think>\\n`, then one `name: value\\n` line per active
  field in the fixed order bpm, caption, duration, genres, keyscale, language, timesignature, then EOS (phase 1:
  EOS replaces `</think>`, as upstream) or `</think>` and free text up to EOS (understand/format/sample). Finite
  fields follow a token trie of every allowed line, tokenized as a whole (`"bpm: 120\\n"` ...): bpm 30-300,
  duration 10-600, the 70 key/scales, time signature 2/3/4/6, the 51 languages (the first language token is the
  most likely allowed one, not sampled, as upstream). A value the user gave is forced token by token, verbatim.
  The caption is free text (no audio codes, special tokens or backticks) that may wrap onto indented lines; after
  a newline the next token is either an indented continuation or the start of the next field's line; at
  `max_caption_tokens` a newline is forced.
* `CodesConstraint`, phase 2: audio codes 0-63999 only; with a target count, EOS is blocked until exactly that
  many codes and then forced; without one, EOS is allowed anywhere and forced at `max_codes`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Literal, Mapping, Optional, Protocol, Sequence

from engine.lm.vocab import (BPM_RANGE, DURATION_RANGE, FIELDS, KEYSCALES, LANGUAGES, TIME_SIGNATURES, LMVocab)

TRIE_FIELDS = ("bpm", "duration", "keyscale", "language", "timesignature")
FREE_FIELDS = ("caption", "genres")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # control characters other than tab and newline
MASK_NAMES = ("codes", "codes_eos", "text", "text_no_nl", "continuation", "lyrics")


@dataclass(frozen=True)
class Allowed:
    """The next token's options: the ids of token class `mask` (see ConstraintTables.mask_ids) plus `ids`.

    greedy: take the most likely of them instead of sampling.
    """

    mask: Optional[str] = None
    ids: tuple[int, ...] = ()
    greedy: bool = False


class TokenConstraint(Protocol):
    @property
    def done(self) -> bool: ...

    def allowed(self) -> Allowed: ...

    def advance(self, token_id: int) -> None: ...


class ConstraintViolation(ValueError):
    """A token outside what the constraint allowed was fed to it (a bug in the caller)."""


Trie = dict  # token id -> Trie; a leaf ({}) ends a line


def build_trie(sequences: Sequence[Sequence[int]]) -> Trie:
    root: Trie = {}
    for seq in sequences:
        node = root
        for tok in seq:
            node = node.setdefault(tok, {})
    return root


def field_values(field: str, max_duration: int = DURATION_RANGE[1]) -> list[str]:
    if field == "bpm":
        return [str(v) for v in range(BPM_RANGE[0], BPM_RANGE[1] + 1)]
    if field == "duration":
        return [str(v) for v in range(DURATION_RANGE[0], max_duration + 1)]
    if field == "keyscale":
        return list(KEYSCALES)
    if field == "language":
        return list(LANGUAGES)
    if field == "timesignature":
        return list(TIME_SIGNATURES)
    raise KeyError(field)


def field_line(field: str, value: object) -> str:
    """One metadata line as the model writes it. Newlines in a given value would end the line: made spaces."""
    text = " ".join(str(value).split("\n")).strip()
    return f"{field}: {text}\n"


class ConstraintTables:
    """Everything the constraints need from one tokenizer, built once per loaded LM (0.1-1 s)."""

    def __init__(self, vocab: LMVocab, encode: Callable[[str], list[int]], max_duration: int = DURATION_RANGE[1]):
        self.vocab = vocab
        self.encode = encode
        self.max_duration = max_duration
        texts = vocab.token_text
        self.has_newline = frozenset(i for i, t in enumerate(texts) if "\n" in t)
        n_tok = len(texts)
        plain = [i for i in range(n_tok)
                 if i not in vocab.special_ids and texts[i] != "" and not _CONTROL.search(texts[i])]
        text = [i for i in plain if "`" not in texts[i]]
        self._masks: dict[str, list[int]] = {
            "codes": sorted(vocab.code_to_id.values()),
            "codes_eos": sorted([*vocab.code_to_id.values(), vocab.eos_id]),
            "text": text,
            "text_no_nl": [i for i in text if i not in self.has_newline],
            "continuation": [i for i in text if texts[i][:1] in (" ", "\t") and i not in self.has_newline],
            "lyrics": sorted([*plain, vocab.eos_id]),
        }
        self._spans: dict[str, tuple[int, int]] = {}
        self.tries: dict[str, Trie] = {}
        for name in TRIE_FIELDS:
            lines = [self.encode(field_line(name, v)) for v in field_values(name, max_duration)]
            self.tries[name] = build_trie(lines)
        self.name_ids = {name: self.encode(f"{name}:") for name in FREE_FIELDS}
        self.think_open = [vocab.think_id, vocab.newline_id]

    def mask_ids(self, name: str) -> list[int]:
        """Sorted ids of token class `name` (one of MASK_NAMES)."""
        return self._masks[name]

    def span(self, allowed: Allowed) -> tuple[int, int]:
        """[lo, hi): the narrowest id range holding every id `allowed` stands for. An output head computed over
        it loses nothing the constraint would keep (engine.lm.output_head)."""
        lo, hi = self.vocab.size, 0
        if allowed.mask is not None:
            span = self._spans.get(allowed.mask)
            if span is None:
                ids = self._masks[allowed.mask]
                span = self._spans[allowed.mask] = (ids[0], ids[-1] + 1) if ids else (self.vocab.size, 0)
            lo, hi = span
        if allowed.ids:
            lo, hi = min(lo, min(allowed.ids)), max(hi, max(allowed.ids) + 1)
        return lo, hi

    def allowed_ids(self, allowed: Allowed) -> set[int]:
        """The id set an Allowed stands for (greedy aside): for tests and non-tensor runtimes."""
        ids = set(allowed.ids)
        if allowed.mask is not None:
            ids.update(self._masks[allowed.mask])
        return ids


# --- segments of the metadata block ---------------------------------------------------------------------------
_STAY, _DONE, _HANDOFF = 0, 1, 2  # token consumed and segment goes on / consumed and segment ends / not consumed


class _Forced:
    def __init__(self, ids: Sequence[int]):
        if not ids:
            raise ValueError("empty forced segment")
        self.ids = list(ids)
        self.pos = 0

    def first_ids(self) -> tuple[int, ...]:
        return (self.ids[0],)

    def allowed(self) -> Allowed:
        return Allowed(ids=(self.ids[self.pos],))

    def advance(self, tok: int) -> int:
        if tok != self.ids[self.pos]:
            raise ConstraintViolation(f"expected token {self.ids[self.pos]}, got {tok}")
        self.pos += 1
        return _DONE if self.pos == len(self.ids) else _STAY


class _TrieLine:
    def __init__(self, trie: Trie, greedy_first_choice: bool):
        self.node = trie
        self.root = trie
        self.greedy = greedy_first_choice
        self.branched = False

    def first_ids(self) -> tuple[int, ...]:
        return tuple(sorted(self.root))

    def allowed(self) -> Allowed:
        greedy = self.greedy and not self.branched and len(self.node) > 1
        return Allowed(ids=tuple(sorted(self.node)), greedy=greedy)

    def advance(self, tok: int) -> int:
        if tok not in self.node:
            raise ConstraintViolation(f"token {tok} is not a continuation of this metadata line")
        if len(self.node) > 1:
            self.branched = True
        self.node = self.node[tok]
        return _STAY if self.node else _DONE


class _FreeText:
    """caption (may wrap), genres (one line) or lyrics (until EOS)."""

    def __init__(self, kind: Literal["caption", "genres", "lyrics"], tables: ConstraintTables, cap: Optional[int]):
        self.kind = kind
        self.tables = tables
        self.cap = cap
        self.count = 0
        self.after_newline = False
        self.next_first: tuple[int, ...] = ()

    def first_ids(self) -> tuple[int, ...]:
        raise NotImplementedError("free text never follows free text")

    def allowed(self) -> Allowed:
        if self.kind == "lyrics":
            if self.cap is not None and self.count >= self.cap:
                return Allowed(ids=(self.tables.vocab.eos_id,))
            return Allowed(mask="lyrics")
        capped = self.cap is not None and self.count >= self.cap
        if self.count == 0:
            return Allowed(mask="text_no_nl")
        if self.after_newline:  # caption only: an indented continuation, or the next field's line
            return Allowed(ids=self.next_first) if capped else Allowed(mask="continuation", ids=self.next_first)
        if capped:
            return Allowed(ids=(self.tables.vocab.newline_id,))
        return Allowed(mask="text")

    def advance(self, tok: int) -> int:
        if self.kind == "lyrics":
            self.count += 1
            return _DONE if tok == self.tables.vocab.eos_id else _STAY
        if self.after_newline and tok in self.next_first:
            return _HANDOFF
        self.count += 1
        newline = tok in self.tables.has_newline
        if self.kind == "genres" and newline:
            return _DONE
        self.after_newline = newline
        return _STAY


class MetadataConstraint:
    """The metadata block (see the module docstring).

    fields: the fields to write (order is always FIELDS'); forced: field -> value written verbatim (a forced
    field is written even if absent from `fields`); mode "cot": EOS right after the last line; "understand":
    `</think>` then free text up to EOS.
    """

    def __init__(self, tables: ConstraintTables, *, fields: Sequence[str] = FIELDS,
                 forced: Optional[Mapping[str, object]] = None, mode: Literal["cot", "understand"] = "cot",
                 max_caption_tokens: int = 512, max_genres_tokens: int = 64,
                 max_lyrics_tokens: Optional[int] = None):
        forced = {k: v for k, v in (forced or {}).items() if v is not None and str(v).strip() != ""}
        unknown = set(fields) - set(FIELDS) | set(forced) - set(FIELDS)
        if unknown:
            raise ValueError(f"unknown metadata fields: {sorted(unknown)}")
        self.tables = tables
        self.vocab = tables.vocab
        segs: list = [_Forced(tables.think_open)]
        for name in FIELDS:
            if name in forced:
                segs.append(_Forced(tables.encode(field_line(name, forced[name]))))
            elif name not in fields:
                continue
            elif name in TRIE_FIELDS:
                segs.append(_TrieLine(tables.tries[name], greedy_first_choice=name == "language"))
            else:
                segs.append(_Forced(tables.name_ids[name]))
                cap = max_caption_tokens if name == "caption" else max_genres_tokens
                segs.append(_FreeText(name, tables, cap))  # type: ignore[arg-type]
        if mode == "cot":
            segs.append(_Forced([self.vocab.eos_id]))
        else:
            segs.append(_Forced([self.vocab.think_end_id]))
            segs.append(_FreeText("lyrics", tables, max_lyrics_tokens))
        for seg, nxt in zip(segs, segs[1:]):
            if isinstance(seg, _FreeText):
                seg.next_first = nxt.first_ids()
        self._segs = segs
        self._i = 0

    @property
    def done(self) -> bool:
        return self._i >= len(self._segs)

    def allowed(self) -> Allowed:
        if self.done:
            return Allowed(ids=(self.vocab.eos_id,))
        return self._segs[self._i].allowed()

    def advance(self, token_id: int) -> None:
        while not self.done:
            status = self._segs[self._i].advance(token_id)
            if status == _STAY:
                return
            self._i += 1
            if status == _DONE:
                return
            # _HANDOFF: the token starts the next segment


class CodesConstraint:
    """Phase 2: audio codes only; exactly `target` of them then EOS, or EOS anywhere up to `max_codes`."""

    def __init__(self, tables: ConstraintTables, target: Optional[int] = None, max_codes: int = 3000):
        if target is not None and target < 1:
            raise ValueError("target must be at least 1 code")
        self.vocab = tables.vocab
        self.target = target
        self.max_codes = max_codes if target is None else target
        self.count = 0
        self._done = False

    @property
    def done(self) -> bool:
        return self._done

    def allowed(self) -> Allowed:
        if self.count >= self.max_codes or self._done:
            return Allowed(ids=(self.vocab.eos_id,))
        return Allowed(mask="codes" if self.target is not None else "codes_eos")

    def advance(self, token_id: int) -> None:
        if token_id == self.vocab.eos_id:
            self._done = True
        elif token_id in self.vocab.id_to_code:
            self.count += 1
        else:
            raise ConstraintViolation(f"token {token_id} is neither an audio code nor EOS")
