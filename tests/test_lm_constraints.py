"""Constrained decoding at the token level, on the tiny LM's tokenizer with the published layout (65,535 code
tokens, codes 64000+ unused): every path the constraints allow is a well-formed, in-range metadata block or a
run of valid codes. No model: the choices are random draws among the allowed tokens."""
from __future__ import annotations

import random

import pytest
import torch

from engine.lm.constraints import (Allowed, CodesConstraint, ConstraintTables, ConstraintViolation,
                                   MetadataConstraint, field_values)
from engine.lm.masking import MaskApplier
from engine.lm.metadata import metadata_problems, parse_lm_output
from engine.lm.tiny import PUBLISHED_AUDIO_CODE_TOKENS, build_tokenizer
from engine.lm.vocab import FIELDS, KEYSCALES, LANGUAGES, MAX_AUDIO_CODE, LMVocab

REAL_IDS = {"<|im_end|>": 151645, "<think>": 151667, "</think>": 151668, "<|audio_code_0|>": 151669}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(audio_codes=PUBLISHED_AUDIO_CODE_TOKENS)


@pytest.fixture(scope="module")
def tables(tokenizer):
    vocab = LMVocab.from_tokenizer(tokenizer)
    return ConstraintTables(vocab, lambda s: tokenizer.encode(s, add_special_tokens=False))


def walk(constraint, tables, rng, limit=3000):
    ids = []
    while not constraint.done and len(ids) < limit:
        tok = rng.choice(sorted(tables.allowed_ids(constraint.allowed())))
        constraint.advance(tok)
        ids.append(tok)
    assert constraint.done, "the constraint never finished"
    return ids


def test_special_tokens_are_looked_up_not_hard_coded(tokenizer, tables):
    v = tables.vocab
    for token, real in REAL_IDS.items():
        assert tokenizer.convert_tokens_to_ids(token) != real  # the fixture's ids differ from the real ones
    assert v.eos_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert v.think_end_id == tokenizer.convert_tokens_to_ids("</think>")
    assert v.code_to_id[0] == tokenizer.convert_tokens_to_ids("<|audio_code_0|>")
    assert v.code_to_id[MAX_AUDIO_CODE] == tokenizer.convert_tokens_to_ids("<|audio_code_63999|>")
    assert len(v.code_to_id) == 64000 and len(v.id_to_code) == PUBLISHED_AUDIO_CODE_TOKENS


def test_token_classes(tables):
    v = tables.vocab
    codes = set(tables.mask_ids("codes"))
    assert codes == {v.code_to_id[c] for c in range(64000)}
    assert not codes & {i for i, c in v.id_to_code.items() if c > MAX_AUDIO_CODE}
    assert set(tables.mask_ids("codes_eos")) == codes | {v.eos_id}
    text = set(tables.mask_ids("text"))
    assert text and not text & v.special_ids and v.eos_id not in text
    assert all("`" not in v.token_text[i] for i in text)
    assert all("\n" not in v.token_text[i] for i in tables.mask_ids("text_no_nl"))
    assert all(v.token_text[i][0] in " \t" for i in tables.mask_ids("continuation"))
    lyrics = set(tables.mask_ids("lyrics"))
    assert v.eos_id in lyrics and not lyrics & set(v.id_to_code) and v.think_id not in lyrics


def _lines(trie, tokenizer, prefix=()):
    if not trie:
        yield tokenizer.decode(list(prefix))
    for tok, child in trie.items():
        yield from _lines(child, tokenizer, prefix + (tok,))


@pytest.mark.parametrize("field", ["bpm", "duration", "keyscale", "language", "timesignature"])
def test_each_value_trie_spells_exactly_the_allowed_lines(field, tables, tokenizer):
    assert sorted(_lines(tables.tries[field], tokenizer)) == sorted(f"{field}: {v}\n"
                                                                   for v in field_values(field))


def test_random_walks_are_well_formed_and_in_range(tables, tokenizer):
    rng = random.Random(0)
    optional = ["caption", "genres", "language"]
    for i in range(200):
        fields = [f for f in FIELDS if f not in optional or rng.random() < 0.5]
        forced = {}
        if rng.random() < 0.5:
            forced["bpm"] = rng.randint(30, 300)
        if rng.random() < 0.3:
            forced["keyscale"] = rng.choice(KEYSCALES)
        if rng.random() < 0.3:
            forced["language"] = rng.choice(LANGUAGES)
        mode = "cot" if i % 4 else "understand"
        c = MetadataConstraint(tables, fields=fields, forced=forced, mode=mode, max_caption_tokens=12,
                               max_genres_tokens=6, max_lyrics_tokens=8)
        ids = walk(c, tables, rng)
        text = tokenizer.decode(ids)
        parsed = parse_lm_output(text)
        assert metadata_problems(parsed.metadata) == [], text
        written = [f for f in FIELDS if f in fields or f in forced]
        assert list(parsed.metadata) == written, text  # every field once, in order
        for k, v in forced.items():
            assert parsed.metadata[k] == v
        assert text.startswith("<think>\n")
        if mode == "cot":
            assert ids[-1] == tables.vocab.eos_id and "</think>" not in text
        else:
            assert "\n</think>" in text and ids[-1] == tables.vocab.eos_id
            assert not set(ids) & set(tables.vocab.id_to_code)


def test_forced_values_are_written_verbatim_even_off_the_list(tables, tokenizer):
    rng = random.Random(1)
    forced = {"bpm": 123, "keyscale": "c Major", "timesignature": "4", "duration": 37, "language": "pt"}
    c = MetadataConstraint(tables, fields=("bpm", "duration", "keyscale", "timesignature"), forced=forced)
    text = tokenizer.decode(walk(c, tables, rng))
    assert text == ("<think>\nbpm: 123\nduration: 37\nkeyscale: c Major\nlanguage: pt\ntimesignature: 4\n"
                    "<|im_end|>")


def test_caption_wraps_onto_indented_lines_then_hands_over_to_the_next_field(tables, tokenizer):
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    c = MetadataConstraint(tables, fields=("caption", "duration"), forced={"bpm": 90})
    for tok in enc("<think>\nbpm: 90\ncaption: warm jazz\n"):
        assert tok in tables.allowed_ids(c.allowed())
        c.advance(tok)
    after_newline = tables.allowed_ids(c.allowed())
    duration_start = enc("duration")[0]
    assert duration_start in after_newline  # the next field ...
    assert enc(" trio")[0] in after_newline  # ... or an indented continuation
    assert enc("trio")[0] not in after_newline  # but not an unindented word
    for tok in enc("  trio\nduration: 30\n"):
        assert tok in tables.allowed_ids(c.allowed())
        c.advance(tok)
    assert c.allowed() == Allowed(ids=(tables.vocab.eos_id,))
    c.advance(tables.vocab.eos_id)
    assert c.done


def test_caption_cap_forces_a_newline(tables):
    rng = random.Random(2)
    c = MetadataConstraint(tables, fields=("caption",), max_caption_tokens=3)
    for _ in range(2 + len(tables.name_ids["caption"]) + 3):  # <think>\n caption: and three caption tokens
        a = c.allowed()
        tok = rng.choice(sorted(tables.allowed_ids(a) - tables.has_newline)) if a.mask else a.ids[0]
        c.advance(tok)
    assert c.allowed() == Allowed(ids=(tables.vocab.newline_id,))
    c.advance(tables.vocab.newline_id)
    assert c.allowed() == Allowed(ids=(tables.vocab.eos_id,))  # capped: no continuation, the block ends


def test_language_first_token_is_greedy(tables, tokenizer):
    c = MetadataConstraint(tables, fields=("language",))
    for tok in tokenizer.encode("<think>\nlanguage:", add_special_tokens=False):
        c.advance(tok)
    assert c.allowed().greedy and len(c.allowed().ids) > 1


def test_codes_constraint_exact_count(tables):
    v = tables.vocab
    codes = set(tables.mask_ids("codes"))
    c = CodesConstraint(tables, target=7)
    rng = random.Random(3)
    for _ in range(7):
        assert tables.allowed_ids(c.allowed()) == codes  # no EOS, no unused codes
        c.advance(rng.choice(sorted(codes)))
    assert c.allowed() == Allowed(ids=(v.eos_id,))
    c.advance(v.eos_id)
    assert c.done
    free = CodesConstraint(tables, target=None, max_codes=2)
    assert tables.allowed_ids(free.allowed()) == codes | {v.eos_id}
    free.advance(v.code_to_id[1])
    free.advance(v.code_to_id[2])
    assert free.allowed() == Allowed(ids=(v.eos_id,))
    with pytest.raises(ConstraintViolation):
        CodesConstraint(tables, target=3).advance(v.think_id)
    with pytest.raises(ConstraintViolation):
        MetadataConstraint(tables).advance(v.eos_id)  # must start with <think>


def test_mask_applier_keeps_exactly_the_allowed_tokens(tables):
    v = tables.vocab
    applier = MaskApplier(tables, "cpu")
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, v.size, generator=gen)
    original = logits.clone()
    allowed = [Allowed(mask="codes"), Allowed(ids=(5, 9, 11), greedy=True), None]
    applier.apply(logits, allowed)
    finite0 = set(torch.isfinite(logits[0]).nonzero().flatten().tolist())
    assert finite0 == set(tables.mask_ids("codes"))
    assert torch.equal(logits[0][list(finite0)], original[0][list(finite0)])
    best = max((5, 9, 11), key=lambda i: original[1, i].item())
    assert torch.isfinite(logits[1]).nonzero().flatten().tolist() == [best]
    assert torch.equal(logits[2], original[2])


def test_token_texts_equal_the_tokenizers_own_decoding(tokenizer, tables):
    n = len(tokenizer)
    assert tables.vocab.token_text[:n] == tokenizer.batch_decode([[i] for i in range(n)], skip_special_tokens=False)
