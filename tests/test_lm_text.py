"""5 Hz LM text: prompts byte for byte, the phase-2 metadata block, and the output parser (torch-free, no model)."""
from __future__ import annotations

from engine.lm import prompts
from engine.lm.metadata import metadata_problems, parse_lm_output, parse_metadata
from engine.lm.planner import description_is_instrumental, has_all_metas, lm_steps, target_codes, user_metadata
from engine.request import GenerationRequest

SYSTEM = ("<|im_start|>system\n# Instruction\nGenerate audio semantic tokens based on the given conditions:\n\n"
          "<|im_end|>\n")


def test_phase1_prompt_is_upstreams_chat_rendering():
    assert prompts.cot_prompt("calm piano", "[Verse]\nhello") == (
        SYSTEM + "<|im_start|>user\n# Caption\ncalm piano\n\n# Lyric\n[Verse]\nhello\n<|im_end|>\n"
        "<|im_start|>assistant\n")


def test_phase1_unconditional_prompt_drops_or_replaces_the_caption():
    assert prompts.cot_unconditional_prompt("la", "NO USER INPUT") == (
        SYSTEM + "<|im_start|>user\n# Lyric\nla\n<|im_end|>\n<|im_start|>assistant\n")
    assert prompts.cot_unconditional_prompt("la", "  ") == prompts.cot_unconditional_prompt("la", "NO USER INPUT")
    assert prompts.cot_unconditional_prompt("la", "noisy lo-fi") == (
        SYSTEM + "<|im_start|>user\n# Caption\nnoisy lo-fi\n\n# Lyric\nla\n<|im_end|>\n<|im_start|>assistant\n")


def test_phase2_prompts_prefill_the_metadata_as_an_assistant_turn():
    cot = prompts.cot_text({"bpm": 120, "caption": "calm piano", "duration": 30, "keyscale": "C major",
                            "language": "en", "timesignature": "4", "genres": "pop"})
    assert cot == ("<think>\nbpm: 120\ncaption: calm piano\nduration: 30\nkeyscale: C major\nlanguage: en\n"
                   "timesignature: 4\n</think>")  # sorted keys, ints, no genres
    user = "<|im_start|>user\n# Caption\ncalm piano\n\n# Lyric\nla\n<|im_end|>\n"
    assert prompts.codes_prompt("calm piano", "la", cot) == (
        SYSTEM + user + "<|im_start|>assistant\n<think>\nbpm: 120\ncaption: calm piano\nduration: 30\n"
        "keyscale: C major\nlanguage: en\ntimesignature: 4\n</think>\n\n<|im_end|>\n")
    assert prompts.codes_unconditional_prompt("calm piano", "la", "NO USER INPUT") == (
        SYSTEM + user + "<|im_start|>assistant\n<think>\n\n</think>\n\n<|im_end|>\n")
    assert "# Caption\nharsh\n" in prompts.codes_unconditional_prompt("calm piano", "la", "harsh")


def test_cot_text_wraps_long_captions_like_yaml_and_normalises_values():
    caption = "a very long caption " * 8
    cot = prompts.cot_text({"caption": caption.strip(), "timesignature": "3/4", "duration": 30.0})
    lines = cot.split("\n")
    assert lines[1].startswith("caption: a very long") and lines[2].startswith("  ")  # continuation indented
    assert "timesignature: 3" in lines and "duration: 30" in lines
    assert parse_metadata(cot)["caption"] == caption.strip()  # the parser joins it back


def test_other_mode_prompts():
    assert prompts.format_prompt("", "").endswith(
        "<|im_start|>user\n# Caption\nNO USER INPUT\n\n# Lyric\n[Instrumental]<|im_end|>\n<|im_start|>assistant\n")
    assert "<|im_start|>user\nlofi beats\n\ninstrumental: true<|im_end|>" in prompts.sample_prompt("lofi beats", True)
    assert "describe the audio semantics accordingly:" in prompts.understand_prompt("<|audio_code_1|>")


def test_parser_reads_phase1_output_without_closing_tag():
    # What phase 1 produces: the constraint ends it with EOS where </think> would be.
    text = ("<think>\nbpm: 96\ncaption: warm\n  jazz trio\nduration: 45\nkeyscale: F# minor\nlanguage: yue\n"
            "timesignature: 3\n")
    parsed = parse_lm_output(text)
    assert parsed.metadata == {"bpm": 96, "caption": "warm jazz trio", "duration": 45, "keyscale": "F# minor",
                               "language": "yue", "timesignature": "3"}
    assert parsed.codes == [] and parsed.lyrics == ""
    assert metadata_problems(parsed.metadata) == []


def test_parser_with_closing_tag_codes_and_lyrics():
    text = ("<think>\nbpm: 200\ngenres: city pop\n</think>\n\n# Lyric\n[Verse]\nhello<|im_end|>")
    parsed = parse_lm_output(text)
    assert parsed.metadata == {"bpm": 200, "genres": "city pop"}
    assert parsed.lyrics == "[Verse]\nhello"
    codes = parse_lm_output("<think>\nbpm: 90\n</think>\n<|audio_code_5|><|audio_code_63999|><|audio_code_64000|>")
    assert codes.codes == [5, 63999] and codes.metadata == {"bpm": 90}
    # no think tags at all: metadata before the first code
    assert parse_lm_output("bpm: 70\nkeyscale: A minor\n<|audio_code_1|>").metadata == {"bpm": 70,
                                                                                        "keyscale": "A minor"}


def test_metadata_problems_flags_out_of_range_values():
    assert len(metadata_problems({"bpm": 301, "duration": 9, "keyscale": "H major", "timesignature": "5",
                                  "language": "xx"})) == 5
    assert metadata_problems({"bpm": 30, "duration": 600, "keyscale": "B♭ minor", "timesignature": "6",
                              "language": "unknown"}) == []


def test_request_decisions():
    r = GenerationRequest(thinking=True, bpm=100, key_scale="C major", time_signature="3/4", audio_duration=12.5)
    assert user_metadata(r) == {"bpm": 100, "keyscale": "C major", "timesignature": "3", "duration": 12}
    assert has_all_metas(user_metadata(r))
    assert lm_steps(r).codes and lm_steps(r).cot
    assert not lm_steps(GenerationRequest(thinking=False)).codes
    assert lm_steps(GenerationRequest(thinking=False)).cot  # phase 1 still fills missing metadata
    assert not lm_steps(GenerationRequest(thinking=True, audio_code_string="<|audio_code_1|>")).codes
    assert not lm_steps(GenerationRequest(thinking=True, task_type="cover", src_audio_key="k")).any
    assert lm_steps(GenerationRequest(sample_query="lofi")).sample
    assert target_codes(12.5) == 62 and target_codes(None) is None
    assert description_is_instrumental("Piano solo") and not description_is_instrumental("pop song")
