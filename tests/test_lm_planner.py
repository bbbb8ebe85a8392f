"""The 5 Hz LM planner on a tiny random Qwen3 (1,024 code tokens; built offline, loaded like a real LM folder):
both phases, constraints over many seeds, CFG against a hand computation, seeds, sampling knobs, the
generate() adapter, format/sample modes."""
from __future__ import annotations

import json

import pytest
import torch

from engine.weights.demo_marker import DEMO_MARKER
from engine.lm import prompts
from engine.lm.constraints import Allowed, CodesConstraint, MetadataConstraint
from engine.lm.metadata import metadata_problems, parse_lm_output
from engine.lm.folders import ensure_demo_lm, is_lm_folder, resolve_lm_folder
from engine.lm.output_head import OutputHead
from engine.lm.planner import PlanProgress, Planner, phase_reporter
from engine.lm.tiny import build_tiny_lm
from engine.lm.transformers_backend import TransformersLM, constraint_logits_processor
from engine.lm.types import SamplingParams
from engine.request import GenerationRequest, format_audio_codes, parse_audio_codes
from engine.types import GenerationCancelled

CAPTION, LYRICS = "soft piano ballad", "[Verse]\nla la la"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls are slower on two contended threads than on one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    return build_tiny_lm(tmp_path_factory.mktemp("lm") / "acestep-5Hz-lm-tiny", audio_codes=1024)


@pytest.fixture(scope="module")
def lm(lm_dir):
    # float32 whatever the CPU: the hand computations below compare logits to 1e-4 (auto is bf16 on AMX CPUs)
    return TransformersLM.load(lm_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def planner(lm):
    return Planner(lm, max_caption_tokens=16)


def request(**kw):
    kw.setdefault("prompt", CAPTION)
    kw.setdefault("lyrics", LYRICS)
    kw.setdefault("batch_size", 1)
    return GenerationRequest(**kw)


def test_tiny_lm_is_a_published_style_folder_marked_random(lm_dir, lm):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja"):
        assert (lm_dir / name).is_file(), name
    assert json.loads((lm_dir / DEMO_MARKER).read_text())["random_weights"] is True
    assert json.loads((lm_dir / "tokenizer_config.json").read_text())["tokenizer_class"] == "Qwen2Tokenizer"
    assert lm.random_weights and lm.model.config.vocab_size == len(lm.tokenizer)
    assert lm.vocab.eos_id == lm.tokenizer.convert_tokens_to_ids("<|im_end|>") != 151645
    # its chat template renders the prompts exactly as engine.lm.prompts does
    tok = lm.tokenizer
    system = {"role": "system", "content": prompts.system_content(prompts.INSTRUCTION_GENERATE)}
    user = {"role": "user", "content": prompts.caption_lyrics(CAPTION, LYRICS)}
    assert tok.apply_chat_template([system, user], tokenize=False, add_generation_prompt=True) == \
        prompts.cot_prompt(CAPTION, LYRICS)
    cot = "<think>\nbpm: 90\n</think>"
    for content in (cot, "<think>\n</think>"):
        assert tok.apply_chat_template([system, user, {"role": "assistant", "content": content}], tokenize=False,
                                       add_generation_prompt=False) == prompts.codes_prompt(CAPTION, LYRICS, content)


def test_two_phases_end_to_end(planner, lm):
    plan = planner.plan(request(thinking=True, audio_duration=10.4, batch_size=2, seeds=[11, 12]))
    assert [p.phase for p in plan.phases] == ["cot", "codes"]
    assert all(p.cfg and p.constrained for p in plan.phases)  # lm_cfg_scale 2.5 by default
    assert metadata_problems(plan.lm_metadata) == []
    assert {"bpm", "caption", "duration", "keyscale", "language", "timesignature"} <= set(plan.lm_metadata)
    assert plan.metadata["duration"] == 10.4 and plan.lm_metadata["duration"] == 10  # the user's, forced
    assert plan.caption == plan.lm_metadata["caption"]  # use_cot_caption: the DiT gets the CoT caption
    assert [len(c) for c in plan.codes] == [52, 52]  # int(10.4 * 5), exactly
    assert plan.codes[0] != plan.codes[1]  # one sequence per item, each from its own seed
    assert all(0 <= c < 1024 for c in plan.codes[0] + plan.codes[1])
    for codes, text in zip(plan.codes, plan.audio_code_strings):
        assert parse_audio_codes(text) == codes
        assert GenerationRequest(task_type="cover", audio_code_string=text).audio_code_string == text
    assert plan.cot_text.startswith("<think>\nbpm: ") and "duration: 10\n" in plan.cot_text
    info = plan.info()
    assert info["lm_random_weights"] and info["lm_codes_per_item"] == [52, 52]
    assert info["lm_phases"][1]["generated_tokens"] == [52, 52] and info["lm_total_s"] > 0
    assert any("random weights" in n for n in plan.notes)


def test_constraints_hold_over_many_seeds(planner, lm):
    forced_sets = [{}, {"bpm": 77}, {"keyscale": "G♭ minor", "timesignature": "6"}, {"duration": 42}]
    for seed in range(24):
        forced = forced_sets[seed % 4]
        md, text, _ = planner.cot(CAPTION, LYRICS, forced=forced, use_cot_caption=seed % 3 == 0, seed=seed,
                                  sampling=SamplingParams(temperature=1.0, cfg_scale=2.0))
        assert metadata_problems(md) == [], text
        assert set(md) >= {"bpm", "duration", "keyscale", "language", "timesignature"}, text
        assert ("caption" in md) == (seed % 3 == 0)
        assert "genres" not in md and "</think>" not in text
        for k, v in forced.items():
            assert md[k] == v, text
    for seed in range(6):
        codes, _, stats = planner.codes(CAPTION, LYRICS, {"bpm": 90, "duration": 10}, seeds=[seed, seed + 100],
                                        sampling=SamplingParams(temperature=1.0, cfg_scale=2.0), target=13)
        assert [len(c) for c in codes] == [13, 13] and stats.generated_tokens == [13, 13]


def test_codes_phase_emits_only_code_tokens(lm):
    """Straight from the decode loop: every generated id is a code token, the target count, then EOS."""
    prompt = lm.encode(prompts.codes_prompt(CAPTION, LYRICS, "<think>\nbpm: 90\n</think>"))
    cons = [CodesConstraint(lm.tables, target=20) for _ in range(3)]
    out = lm.generate([prompt] * 3, seeds=[1, 2, 3], sampling=SamplingParams(temperature=1.5), max_new_tokens=40,
                      constraints=cons, stop_ids=[lm.vocab.eos_id])
    assert all(out.stopped) and [len(t) for t in out.tokens] == [20, 20, 20]
    assert all(t in lm.vocab.id_to_code for row in out.tokens for t in row)
    free = lm.generate([prompt], seeds=[1], sampling=SamplingParams(temperature=1.5), max_new_tokens=40,
                       stop_ids=[lm.vocab.eos_id])
    assert any(t not in lm.vocab.id_to_code for t in free.tokens[0])  # without the constraint: not so


def test_all_four_metas_given_skips_phase1_and_forces_them(planner):
    plan = planner.plan(request(thinking=True, bpm=128, key_scale="D minor", time_signature="3", audio_duration=10,
                                seeds=[5]))
    assert [p.phase for p in plan.phases] == ["codes"]
    assert plan.cot_text == "<think>\nbpm: 128\nduration: 10\nkeyscale: D minor\ntimesignature: 3\n</think>"
    assert [len(c) for c in plan.codes] == [50]
    assert plan.caption == CAPTION and plan.metadata["bpm"] == 128


def test_a_user_value_off_the_list_is_still_forced_verbatim(planner):
    plan = planner.plan(request(thinking=True, key_scale="c Major", audio_duration=10, seeds=[6]))
    assert plan.phases[0].phase == "cot"
    assert plan.lm_metadata["keyscale"] == plan.metadata["keyscale"] == "c Major"
    assert "keyscale: c Major\n" in plan.cot_text and not any("ignored" in n for n in plan.notes)


def test_thinking_off_runs_phase1_only_and_lm_duration_sets_code_count(lm):
    short = TransformersLM(lm.model, lm.tokenizer, max_duration=12)  # durations 10-12: short phase 2
    planner = Planner(short, max_caption_tokens=8)
    plan = planner.plan(request(thinking=False, seeds=[3]))
    assert [p.phase for p in plan.phases] == ["cot"] and plan.codes == []
    plan = planner.plan(request(thinking=True, seeds=[3], use_cot_caption=False, use_cot_language=False))
    duration = plan.lm_metadata["duration"]
    assert 10 <= duration <= 12 and "caption" not in plan.lm_metadata and "language" not in plan.lm_metadata
    assert [len(c) for c in plan.codes] == [duration * 5]  # the LM's own duration, exactly


def _reference_logits(model, prompt, generated, device):
    ids = torch.tensor([prompt + generated], device=device)
    with torch.no_grad():
        return model(input_ids=ids).logits[0, -1].float()


def test_cfg_equals_uncond_plus_scale_times_difference_of_two_separate_forwards(lm):
    scale = 2.5
    cases = [  # (cond prompt, uncond prompt, constraint): phase 1 unconstrained, phase 2 constrained
        (prompts.cot_prompt(CAPTION, LYRICS), prompts.cot_unconditional_prompt(LYRICS, "NO USER INPUT"), None),
        (prompts.codes_prompt(CAPTION, LYRICS, "<think>\nbpm: 90\n</think>"),
         prompts.codes_unconditional_prompt(CAPTION, LYRICS, "NO USER INPUT"), CodesConstraint(lm.tables, 6)),
    ]
    for cond, uncond, constraint in cases:
        cond_ids, uncond_ids = lm.encode(cond), lm.encode(uncond)
        assert len(cond_ids) != len(uncond_ids)  # the batch needs left padding
        seen = []
        out = lm.generate([cond_ids], seeds=[0], sampling=SamplingParams(temperature=0.0, cfg_scale=scale),
                          max_new_tokens=6, uncond_prompts=[uncond_ids],
                          constraints=[constraint] if constraint else None,
                          logits_hook=lambda step, logits: seen.append(logits[0]))
        tokens = out.tokens[0]
        assert len(tokens) == 6 and out.rows == 2
        allowed = torch.tensor(sorted(lm.tables.mask_ids("codes")))
        for step, got in enumerate(seen):
            c = _reference_logits(lm.model, cond_ids, tokens[:step], lm.device)
            u = _reference_logits(lm.model, uncond_ids, tokens[:step], lm.device)
            ref = u + scale * (c - u)
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
            expected = int(allowed[torch.argmax(ref[allowed])]) if constraint else int(torch.argmax(ref))
            assert tokens[step] == expected


def test_cond_and_uncond_run_in_one_forward_per_step(lm):
    batches = []
    handle = lm.model.get_decoder().register_forward_hook(lambda m, args, kwargs, out: batches.append(kwargs["input_ids"].shape[0]),
                                            with_kwargs=True)
    try:
        prompt = lm.encode(prompts.cot_prompt(CAPTION, LYRICS))
        uncond = lm.encode(prompts.cot_unconditional_prompt(LYRICS, None))
        out = lm.generate([prompt] * 2, seeds=[1, 2], sampling=SamplingParams(cfg_scale=2.0), max_new_tokens=5,
                          uncond_prompts=[uncond] * 2)
        assert batches == [4] * 5 and out.steps == 5
        batches.clear()
        lm.generate([prompt], seeds=[1], sampling=SamplingParams(cfg_scale=1.0), max_new_tokens=3,
                    uncond_prompts=[uncond])
        assert batches == [1] * 3  # scale <= 1: no guidance, no unconditional rows
    finally:
        handle.remove()


def test_seeds_decide_the_tokens(planner):
    r = dict(thinking=True, audio_duration=10, batch_size=2)
    a = planner.plan(request(seeds=[21, 22], **r))
    b = planner.plan(request(seeds=[21, 22], **r))
    assert a.codes == b.codes and a.lm_metadata == b.lm_metadata and a.lm_text == b.lm_text
    c = planner.plan(request(seeds=[21, 99], **r))
    assert c.codes[0] == a.codes[0] and c.codes[1] != a.codes[1]  # item 0 depends only on its own seed
    d = planner.plan(request(seeds=[22, 21], **r))
    assert d.lm_metadata != a.lm_metadata or d.codes != a.codes


def test_sampling_knobs(lm, planner):
    prompt = lm.encode(prompts.codes_prompt(CAPTION, LYRICS, "<think>\nbpm: 90\n</think>"))

    def run(seed, **kw):
        return lm.generate([prompt], seeds=[seed], sampling=SamplingParams(**kw), max_new_tokens=12,
                           constraints=[CodesConstraint(lm.tables, 12)]).tokens[0]

    greedy = run(1, temperature=0.0)
    assert run(2, temperature=0.0) == greedy  # temperature 0: no sampling at all
    assert run(1, temperature=1.0) != run(2, temperature=1.0)
    assert run(3, temperature=1.0, top_k=1) == greedy  # top-k 1 = greedy
    assert run(4, temperature=1.0, top_p=1e-6) == greedy  # a tiny nucleus = greedy
    assert run(5, temperature=1.0, top_p=1.0) != greedy  # 1.0 switches top-p off
    # repetition penalty: over the prompt and what was generated, positive logits divided, negative multiplied
    text_prompt = lm.encode(prompts.cot_prompt(CAPTION, LYRICS))
    hooked = []
    penalised = lm.generate([text_prompt], seeds=[0], sampling=SamplingParams(temperature=0.0, repetition_penalty=2.0),
                            max_new_tokens=8, logits_hook=lambda step, logits: hooked.append(logits[0])).tokens[0]
    plain = lm.generate([text_prompt], seeds=[0], sampling=SamplingParams(temperature=0.0),
                        max_new_tokens=8).tokens[0]
    assert penalised != plain
    for step, logits in enumerate(hooked):
        index = torch.tensor(sorted(set(text_prompt + penalised[:step])))
        ref = logits.clone()
        ref[index] = torch.where(ref[index] < 0, ref[index] * 2.0, ref[index] / 2.0)
        assert penalised[step] == int(torch.argmax(ref))
    # the request's fields reach the sampler
    sp = SamplingParams.from_request(request(lm_temperature=0.3, lm_top_k=0, lm_top_p=1.0, lm_cfg_scale=1.5,
                                             lm_repetition_penalty=1.2))
    assert sp == SamplingParams(temperature=0.3, top_k=None, top_p=None, repetition_penalty=1.2, cfg_scale=1.5)


def test_constrained_decoding_can_be_switched_off(lm):
    planner = Planner(lm, max_cot_tokens=48, max_codes=80)
    plan = planner.plan(request(thinking=True, audio_duration=10, seeds=[4], constrained_decoding=False,
                                lm_cfg_scale=1.0))
    assert all(not p.constrained for p in plan.phases)
    assert plan.phases[0].steps <= 48  # the cap, not a well-formed block
    # the unconstrained random model neither keeps to codes nor to the count; upstream's cap: 5 x 10 s + 500
    codes = plan.phases[-1]
    assert codes.generated_tokens[0] != len(plan.codes[0]) or len(plan.codes[0]) != 50
    assert codes.steps <= 550


def test_generate_adapter_applies_the_same_constraints_inside_model_generate(lm):
    prompt = lm.encode(prompts.cot_prompt(CAPTION, LYRICS))
    ids = torch.tensor([prompt])
    c = MetadataConstraint(lm.tables, fields=("bpm", "duration", "keyscale", "language", "timesignature"),
                           forced={"bpm": 99})
    torch.manual_seed(0)
    out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=60,
                            logits_processor=[constraint_logits_processor([c], lm.applier, len(prompt))],
                            eos_token_id=lm.vocab.eos_id, pad_token_id=lm.vocab.pad_id)
    text = lm.decode_text(out[0, len(prompt):].tolist())
    md = parse_lm_output(text).metadata
    assert metadata_problems(md) == [] and md["bpm"] == 99 and text.endswith("\n<|im_end|>")
    assert list(md) == ["bpm", "duration", "keyscale", "language", "timesignature"]


def test_constrained_steps_compute_only_the_head_blocks_they_may_sample_from_with_the_same_tokens(lm):
    """The output-head trim: the codes phase (CFG, sampling, two items) and phase 1 give exactly the tokens of
    the whole head; the codes phase multiplies about half of the (small-block) head's rows."""
    eos = lm.vocab.eos_id
    codes_prompt = lm.encode(prompts.codes_prompt(CAPTION, LYRICS, "<think>\nbpm: 90\n</think>"))
    uncond = lm.encode(prompts.codes_unconditional_prompt(CAPTION, LYRICS, None))
    cot_prompt = lm.encode(prompts.cot_prompt(CAPTION, LYRICS))
    sampling = SamplingParams(temperature=1.0, top_p=0.9, cfg_scale=2.0)
    whole, head = lm.head, OutputHead(lm.head.weight, block_rows=128)
    assert whole.covered(lm.tables.span(Allowed(mask="codes_eos"))) == range(1)  # one 4096-row block here
    span = lm.tables.span(Allowed(mask="codes_eos"))
    assert span == (eos, max(lm.vocab.code_to_id.values()) + 1)
    runs = {}
    try:
        lm.head = head
        for trim in (False, True):
            lm.trim_head = trim
            head.rows_computed = 0
            codes = lm.generate([codes_prompt] * 2, seeds=[3, 4], sampling=sampling, max_new_tokens=30,
                                uncond_prompts=[uncond] * 2, stop_ids=[eos],
                                constraints=[CodesConstraint(lm.tables, 20), CodesConstraint(lm.tables, 25)])
            codes_rows = head.rows_computed
            meta = lm.generate([cot_prompt], seeds=[5], sampling=sampling, max_new_tokens=60, stop_ids=[eos],
                               uncond_prompts=[lm.encode(prompts.cot_unconditional_prompt(LYRICS, None))],
                               constraints=[MetadataConstraint(lm.tables, fields=("bpm", "duration", "keyscale"))])
            runs[trim] = (codes.tokens, meta.tokens, codes_rows, codes.steps)
    finally:
        lm.head, lm.trim_head = whole, True
    assert runs[True][:2] == runs[False][:2]
    assert [len(t) for t in runs[True][0]] == [20, 25] and all(t in lm.vocab.id_to_code for t in runs[True][0][0])
    assert parse_lm_output(lm.decode_text(runs[True][1][0])).metadata.keys() == {"bpm", "duration", "keyscale"}
    full_rows = runs[False][2]
    assert full_rows == lm.vocab.size * runs[False][3]  # the prefill and every step but the last: the whole head
    assert runs[True][2] < 0.6 * full_rows


def test_static_kv_cache_gives_the_dynamic_caches_tokens(lm, lm_dir):
    """The static KV cache (one allocation, written in place; the CPU default) against transformers' dynamic one:
    the same tokens, greedy and seeded, in float32 and bf16, in the codes phase (CFG, two items of different
    prompt lengths, so left padding) and phase 1 unconstrained. In bf16 that needs the attention over the
    filled part of the cache only (filled_sdpa): over the whole cache, masked, bf16 rounds differently."""
    from transformers import DynamicCache, StaticCache

    def decode(model):
        eos = model.vocab.eos_id
        codes_prompt = model.encode(prompts.codes_prompt("a", "b", "<think>\nbpm: 90\n</think>"))
        uncond = model.encode(prompts.codes_unconditional_prompt("a", "b", None))
        cot_prompt = model.encode(prompts.cot_prompt("a", "b"))
        out = []
        for temperature in (0.0, 1.0):
            sampling = SamplingParams(temperature=temperature, top_p=0.9, cfg_scale=2.0)
            out.append(model.generate([codes_prompt, codes_prompt[:-3]], seeds=[3, 4], sampling=sampling,
                                      max_new_tokens=40, uncond_prompts=[uncond] * 2, stop_ids=[eos],
                                      constraints=[CodesConstraint(model.tables, 30), CodesConstraint(model.tables, 35)]
                                      ).tokens)
            out.append(model.generate([cot_prompt], seeds=[5], sampling=sampling, max_new_tokens=60,
                                      stop_ids=[eos]).tokens)
        return out

    bf16 = TransformersLM.load(lm_dir, dtype=torch.bfloat16)
    for model in (lm, bf16):
        assert model.kv_cache == "static" and model.filled_attention  # ACESTEP_LM_KV_CACHE=auto on CPU
        try:
            model.kv_cache = "dynamic"
            assert isinstance(model._new_cache(8), DynamicCache)
            dynamic = decode(model)
        finally:
            model.kv_cache = "static"
        assert isinstance(model._new_cache(8), StaticCache)
        static = decode(model)
        assert static == dynamic, model.dtype
        assert [len(t) for t in static[0]] == [30, 35] and len(static[1][0]) > 0


def test_the_fit_checks_kv_cache_is_what_the_static_cache_allocates(lm, lm_dir, monkeypatch):
    """engine/lm/kv_budget.py: the bytes the engine's fit check counts for the transformers LM's KV cache equal
    the static cache's tensors once a decode at the full context has allocated them (one song with CFG: 2 rows;
    two songs: 4); a dynamic cache ends within them; a decode that may pass the context is cut to it."""
    from engine.lm import kv_budget
    from engine.types import GenerationError

    caches = []
    new_cache = lm._new_cache
    monkeypatch.setattr(lm, "_new_cache", lambda length: caches.append(new_cache(length)) or caches[-1])
    prompt = lm.encode(prompts.codes_prompt("a", "b", "<think>\nbpm: 90\n</think>"))
    uncond = lm.encode(prompts.codes_unconditional_prompt("a", "b", None))
    context = max(len(prompt), len(uncond)) + 6
    monkeypatch.setattr(lm, "max_context", context)
    config = kv_budget.read_config(lm_dir)
    sampling = SamplingParams(temperature=1.0, cfg_scale=2.0)

    def decode(items: int, max_new_tokens: int = 6) -> int:
        out = lm.generate([prompt] * items, seeds=list(range(items)), sampling=sampling,
                          max_new_tokens=max_new_tokens, uncond_prompts=[uncond] * items)
        assert out.steps <= 6
        return sum(t.nbytes for layer in caches[-1].layers for t in (layer.keys, layer.values))

    assert lm.kv_cache == "static" and lm.dtype == "float32"
    assert decode(1) == kv_budget.fit_cache_bytes(config, 4, tokens=context) == 2 * context * 2 * 2 * 64 * 4
    assert decode(2) == kv_budget.fit_cache_bytes(config, 4, items=2, tokens=context)
    monkeypatch.setattr(lm, "kv_cache", "dynamic")
    assert 0 < decode(1) <= kv_budget.fit_cache_bytes(config, 4, tokens=context)
    monkeypatch.setattr(lm, "kv_cache", "static")
    assert decode(1, max_new_tokens=3074) == kv_budget.fit_cache_bytes(config, 4, tokens=context)
    monkeypatch.setattr(lm, "max_context", context - 6)
    with pytest.raises(GenerationError, match=rf"context is at most {context - 6} tokens.* leaving no room"):
        decode(1)


def test_kv_cache_setting():
    from engine.lm.transformers_backend import kv_cache_choice
    from entrypoints.bootstrap import engine_config
    from service.config import ConfigError, load_settings

    assert kv_cache_choice("auto", torch.device("cpu")) == "static"
    assert kv_cache_choice("", torch.device("meta")) == "dynamic"  # not measured off the CPU yet
    assert kv_cache_choice(" Dynamic ", torch.device("cpu")) == "dynamic"
    with pytest.raises(ValueError, match="ACESTEP_LM_KV_CACHE"):
        kv_cache_choice("paged", torch.device("cpu"))
    env = {"ACESTEP_LM_KV_CACHE": "dynamic"}
    assert engine_config(load_settings(env=env, dotenv_path=None)).lm_kv_cache == "dynamic"
    with pytest.raises(ConfigError, match="ACESTEP_LM_KV_CACHE"):  # refused when settings are built
        load_settings(env={"ACESTEP_LM_KV_CACHE": "paged"}, dotenv_path=None)


def test_lm_dtype_follows_acestep_dtype_auto_on_cpu(lm_dir, lm, monkeypatch):
    from engine.lm import transformers_backend

    monkeypatch.setattr(transformers_backend, "cpu_flags", lambda: {"avx2", "amx_bf16"})
    assert transformers_backend.default_dtype(torch.device("cpu")) == torch.bfloat16
    monkeypatch.setattr(transformers_backend, "cpu_flags", lambda: {"avx2"})
    assert transformers_backend.default_dtype(torch.device("cpu")) == torch.float32
    monkeypatch.setattr(transformers_backend, "cpu_flags", lambda: {"avx2", "avx512_bf16"})
    bf16 = TransformersLM.load(lm_dir)
    assert bf16.dtype == "bfloat16" and bf16.model.dtype == torch.bfloat16 and lm.dtype == "float32"
    plan = Planner(bf16, max_caption_tokens=8).plan(request(thinking=True, audio_duration=10, seeds=[1]))
    assert len(plan.codes[0]) == 50 and plan.info()["lm_dtype"] == "bfloat16"


def test_format_and_sample_modes_rewrite_lyrics(lm):
    short = TransformersLM(lm.model, lm.tokenizer, max_duration=12)  # durations 10-12: short phase 2
    planner = Planner(short, max_caption_tokens=8, max_lyrics_tokens=12)
    plan = planner.plan(request(use_format=True, vocal_language="fr", bpm=140, seeds=[8]))
    assert plan.phases[0].phase == "format" and not plan.phases[0].cfg
    assert "</think>" in plan.lm_text and plan.lm_metadata["language"] == "fr" and plan.lm_metadata["bpm"] == 140
    assert "genres" in plan.lm_metadata and metadata_problems(plan.lm_metadata) == []
    assert plan.lyrics_rewritten and plan.lyrics == parse_lm_output(plan.lm_text).lyrics != LYRICS
    # what format wrote, before phase 1 rewrote the caption: the song's prompt and lyrics as upstream shows them
    assert plan.written_lyrics == plan.lyrics and plan.written_caption == plan.lm_metadata["caption"] != CAPTION
    assert plan.info()["lm_caption"] == plan.written_caption and plan.info()["lm_lyrics"] == plan.lyrics
    plan = planner.plan(request(sample_query="a piano solo", thinking=True, seeds=[9]))
    assert [p.phase for p in plan.phases] == ["sample", "codes"]  # the sample's metas skip phase 1
    assert plan.metadata["caption"] == plan.caption == plan.lm_metadata["caption"] == plan.written_caption
    assert plan.lyrics_rewritten and plan.lyrics == plan.written_lyrics  # generated, or "[Instrumental]" for "solo"
    assert "lm_caption" not in planner.plan(request(seeds=[9])).info()  # phase 1 alone writes no song text
    assert [len(c) for c in plan.codes] == [plan.lm_metadata["duration"] * 5]


def test_understand_mode_reads_codes_into_metadata_and_lyrics(lm):
    planner = Planner(lm, max_caption_tokens=8, max_lyrics_tokens=10)
    md, lyrics, text, stats = planner.understand(list(range(40)), seed=1)
    assert stats.phase == "understand" and not stats.cfg and stats.prompt_tokens > 40  # one token per code
    assert metadata_problems(md) == [] and list(md) == ["bpm", "caption", "duration", "genres", "keyscale",
                                                        "language", "timesignature"]
    assert "\n</think>" in text and lyrics == parse_lm_output(text).lyrics and "<|audio_code_" not in text


def test_a_step_writes_what_the_context_leaves_and_a_song_whose_codes_cannot_fit_is_refused(lm, monkeypatch):
    """max_new_tokens is an upper limit (understand allows 3,074 new tokens): a step whose prompt plus that limit
    pass the LM's context writes what the context leaves, as vLLM ends a sequence at max_model_len. Refused only
    when the prompt leaves no room, or a constrained song's codes and stop do not fit (cut, the song would be
    shorter than asked), each saying what the client can change for that step."""
    from engine.types import GenerationError

    planner = Planner(lm, max_caption_tokens=8)
    codes = [i % 1024 for i in range(240 * 5)]  # a 4-minute source: 1,257 prompt tokens + 3,074 > 4,096
    prompt = len(lm.encode(prompts.understand_prompt(format_audio_codes(codes))))
    assert prompt + planner.metadata_budget("understand") > lm.max_context == 4096
    monkeypatch.setattr(lm, "max_context", prompt + 24)  # the same overflow with a short room: a cheap decode
    md, lyrics, text, stats = planner.understand(codes, seed=1)
    assert stats.prompt_tokens == prompt and stats.steps == 24  # its answer cut at the context, and said so
    assert stats.notes == [f"lm understand stopped at the LM's {prompt + 24}-token context after 24 tokens (its "
                           f"prompt takes {prompt})"]
    monkeypatch.setattr(lm, "max_context", prompt)
    with pytest.raises(GenerationError, match=f"prompt takes {prompt}, leaving no room to write: send a shorter source"):
        planner.understand(codes, seed=1)

    cot = prompts.cot_text({"bpm": 90})
    width = len(lm.encode(prompts.codes_prompt(CAPTION, LYRICS, cot)))
    monkeypatch.setattr(lm, "max_context", width + 50)  # a 10 s song needs 50 codes and a stop: 51
    with pytest.raises(GenerationError, match=rf"a 10 s song takes 50 audio codes and a stop, but .* prompt takes "
                                              rf"{width} .* leaving 50: ask for at most 9 s \(audio_duration\), "
                                              "or shorten the caption or lyrics"):
        planner.codes(CAPTION, LYRICS, {"bpm": 90}, seeds=[1], sampling=SamplingParams(), target=50)
    monkeypatch.setattr(lm, "max_context", width + 51)
    got, _, stats = planner.codes(CAPTION, LYRICS, {"bpm": 90}, seeds=[1], sampling=SamplingParams(), target=50)
    assert [len(c) for c in got] == [50] and stats.prompt_tokens == width


def test_progress_reports_and_can_cancel(planner):
    seen = []
    planner.plan(request(thinking=True, audio_duration=10, seeds=[1]), progress=lambda f, s: seen.append((f, s)))
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and 0 < fractions[0] and fractions[-1] == 1.0  # over both phases
    cot = [s for _, s in seen if s.startswith("LM: caption and metadata: ")]
    codes = [s for _, s in seen if s.startswith("LM: audio codes: ")]
    assert cot and codes and seen.index((fractions[-1], codes[-1])) == len(seen) - 1  # phase 1, then phase 2
    assert all(s.endswith(f"/{planner.max_cot_tokens} tokens") for s in cot)  # tokens over the step's budget
    assert codes[-1] == "LM: audio codes: 51/51 tokens"  # 10 s: exactly 50 codes, then the stop
    assert all(f < 0.96 for f, s in seen if s in cot)  # phase 1's budget is most of the plan's (1,024 of 1,075)

    def cancel(fraction, stage):
        raise GenerationCancelled("stop")

    with pytest.raises(GenerationCancelled):
        planner.plan(request(thinking=True, audio_duration=10, seeds=[1]), progress=cancel)


def test_plan_progress_spans_the_steps_by_their_token_budgets():
    seen = []
    progress = PlanProgress(lambda f, s: seen.append((round(f, 3), s)), [("sample", 300), ("cot", 100),
                                                                         ("codes", 50), ("codes", 50)])
    report = progress.phase("sample", 300)
    report(0.5, "a")
    progress.skip("cot")  # sample mode: phase 1 does not run
    first = phase_reporter(progress.phase("codes", 201), "codes", 201, "LM: audio codes, item 1/2")
    for step in range(1, 202):  # the LM chose a longer song than estimated: the item's real budget is larger
        first(step)
    second = progress.phase("codes", 201)
    second(1.0, "b")
    fractions = [f for f, _ in seen]
    assert fractions[0] == 0.3 and fractions == sorted(fractions) and fractions[-1] == 1.0  # never backwards
    stages = [s for _, s in seen][1:-1]
    assert stages[0] == "LM: audio codes, item 1/2: 0/201 tokens" and stages[-1].endswith(": 201/201 tokens")
    assert len(stages) == 201 // 8 + 1 and len(set(stages)) <= 21  # a call per 8 steps; the text moves in 1/20ths


def test_lm_folders(lm_dir, tmp_path):
    assert is_lm_folder(lm_dir)
    assert resolve_lm_folder(lm_dir.parent, lm_dir.name) == lm_dir  # a name under the checkpoint dir
    assert resolve_lm_folder(tmp_path, str(lm_dir)) == lm_dir  # or a path
    assert resolve_lm_folder(tmp_path, "acestep-5Hz-lm-0.6B") is None
    assert ensure_demo_lm(lm_dir.parent, lm_dir.name) == lm_dir  # present: left alone
    built = ensure_demo_lm(tmp_path, "acestep-5Hz-lm-0.6B", audio_codes=16)
    assert built == tmp_path / "acestep-5Hz-lm-0.6B" and is_lm_folder(built)
    assert json.loads((built / DEMO_MARKER).read_text())["random_weights"] is True


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_in_bf16(lm_dir):
    gpu = TransformersLM.load(lm_dir, device="cuda")
    assert gpu.model.dtype in (torch.bfloat16, torch.float16)
    planner = Planner(gpu, max_caption_tokens=16)
    r = request(thinking=True, audio_duration=10, batch_size=2, seeds=[1, 2])
    a, b = planner.plan(r), planner.plan(r)
    assert [len(c) for c in a.codes] == [50, 50] and a.codes == b.codes and a.lm_metadata == b.lm_metadata
    assert metadata_problems(a.lm_metadata) == []


def test_a_batch_is_decoded_in_groups_that_fit_the_memory_available(lm, lm_dir, planner, tmp_path, monkeypatch):
    """A batch whose KV caches do not fit together in what is available at decode time (the system's
    MemAvailable, the boundary, pretended here) is decoded a song at a time, each song from its own seed and
    padded to the batch's width: a group decodes as that song alone would (same shapes, same seed). Its tokens
    are not asserted equal to the whole batch's: a smaller batch shape can round the logits differently (bf16:
    the tokens differ), as any change of batch composition can. The plan says so in its notes. Below one song's
    cache's headroom (a transient dip: the start-up fit check admitted one), it still decodes a song at a time,
    noted; below one song's cache itself it refuses with the numbers (a decode would be OOM-killed)."""
    from engine import memory
    from engine.lm import kv_budget
    from engine.types import GenerationError

    cond = lm.encode(prompts.codes_prompt(CAPTION, LYRICS, "<think>\nbpm: 90\n</think>"))
    uncond = lm.encode(prompts.codes_unconditional_prompt(CAPTION, LYRICS, None))
    batch = [cond, cond[:-3], cond]  # two lengths: the short prompt is padded as in the whole batch
    sampling = SamplingParams(temperature=1.0, cfg_scale=2.0)
    steps: list[int] = []

    def decode(songs=batch, seeds=(7, 8, 9)):
        steps.clear()
        return lm.generate(songs, seeds=list(seeds), sampling=sampling, max_new_tokens=12,
                           uncond_prompts=[uncond] * len(songs),
                           constraints=[CodesConstraint(lm.tables, 11) for _ in songs],
                           stop_ids=[lm.vocab.eos_id], on_step=steps.append)

    def valid(result, songs):  # 11 audio codes each and its stop, in order
        return ([len(t) for t in result.tokens] == [11] * songs and result.stopped == [True] * songs
                and all(tok in lm.vocab.id_to_code for t in result.tokens for tok in t))

    together = decode()
    assert together.notes == [] and together.rows == 6 and valid(together, 3)
    alone = [decode([cond], [seed]) for seed in (7, 9)]  # songs 0 and 2 alone: the batch's width, their seeds
    tokens = max(len(cond), len(uncond)) + 12
    song = kv_budget.kv_cache_bytes(kv_budget.read_config(lm_dir), 4, rows=2, tokens=tokens)
    meminfo, status = tmp_path / "meminfo", tmp_path / "status"
    status.write_text("RssFile:\t0 kB\n")
    monkeypatch.setattr(memory, "MEMINFO", str(meminfo))
    monkeypatch.setattr(memory, "PROCESS_STATUS", str(status))
    for name in ("PROCESS_CGROUP", "CGROUP_V2_ROOT", "CGROUP_V1_ROOT"):  # the host's figure, whatever cgroup runs this
        monkeypatch.setattr(memory, name, str(tmp_path / "no-cgroup"))
    available_kb = -(-int(song * 1.5 / memory.DECODE_HEADROOM) // 1024)  # one song's cache and a half, usable
    meminfo.write_text(f"MemAvailable:   {available_kb} kB\n")
    grouped = decode()
    assert valid(grouped, 3) and grouped.rows == 6 and grouped.steps == 3 * 12
    assert [grouped.tokens[0], grouped.tokens[2]] == [a.tokens[0] for a in alone]  # each song's own seed
    assert steps == sorted(steps) and steps[-1] == 12  # progress over the whole batch, never back
    gb = f"{song / 2**30:.3g} GB"
    assert grouped.notes == [f"lm decoded 3 songs in 3 groups of 1 (memory: the 5 Hz LM's KV cache takes {gb} a "
                             f"song (2 rows of {tokens} tokens with CFG); {available_kb * 1024 / 2**30:.3g} GB "
                             f"available on cpu)"]
    # through the planner: every song's codes, and the note in the plan's (generation_info's)
    r = request(thinking=True, bpm=90, key_scale="C major", time_signature="4", audio_duration=10, batch_size=3,
                seeds=[7, 8, 9])
    monkeypatch.setattr(memory, "MEMINFO", "/proc/meminfo")
    whole = planner.plan(r)
    width = max(len(lm.encode(prompts.codes_prompt(CAPTION, LYRICS, whole.cot_text))),
                len(lm.encode(prompts.codes_unconditional_prompt(CAPTION, LYRICS, r.lm_negative_prompt))))
    plan_song = kv_budget.kv_cache_bytes(kv_budget.read_config(lm_dir), 4, rows=2, tokens=width + 51)
    monkeypatch.setattr(memory, "MEMINFO", str(meminfo))
    meminfo.write_text(f"MemAvailable:   {-(-int(plan_song * 1.5 / memory.DECODE_HEADROOM) // 1024)} kB\n")
    plan = planner.plan(r)
    assert [len(c) for c in plan.codes] == [len(c) for c in whole.codes] == [50] * 3
    assert not any("groups" in n for n in whole.notes)
    assert [n for n in plan.notes if n.startswith("lm decoded 3 songs in 3 groups of 1 (memory")] == \
        plan.phases[-1].notes == plan.info()["lm_notes"][:1]

    available_kb = int(song / memory.DECODE_HEADROOM) // 1024 - 1  # under one song's cache
    meminfo.write_text(f"MemAvailable:   {available_kb} kB\n")
    for songs, seeds in ((batch, (7, 8, 9)), ([cond], [7])):
        low = decode(songs, seeds)
        assert valid(low, len(songs)) and low.steps == len(songs) * 12 and steps == sorted(steps)
        assert low.notes == [f"lm decoded {len(songs)} song{'s' if len(songs) > 1 else ''} one at a time with less "
                             f"memory than one song's cache (memory: the 5 Hz LM's KV cache takes {gb} a song (2 rows "
                             f"of {tokens} tokens with CFG); {available_kb * 1024 / 2**30:.3g} GB available on cpu, "
                             f"{int(available_kb * 1024 * memory.DECODE_HEADROOM) / 2**30:.3g} GB usable at 80%; the "
                             "start-up fit check counted one song's)"]
    assert low.tokens == alone[0].tokens
    available_kb = song // 1024 - 1  # not even one song's cache: refused with the numbers, not OOM-killed
    meminfo.write_text(f"MemAvailable:   {available_kb} kB\n")
    with pytest.raises(GenerationError, match=rf"the 5 Hz LM's KV cache takes {gb} a song \(2 rows of {tokens} "
                                              rf"tokens with CFG\), but cpu has {available_kb * 1024 / 2**30:.3g} GB "
                                              r"available \(.* usable at 80%\): retry when"):
        decode([cond], [7])
