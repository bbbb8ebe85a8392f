"""Seed resolution: explicit seeds honoured in order, -1 random per item, gaps filled from the first."""
from engine import plan
from engine.plan import resolve_seeds
from engine.request import GenerationRequest


def test_explicit_seeds_fill_the_batch_from_the_first():
    assert resolve_seeds(GenerationRequest(batch_size=4, seeds=[10, 20])) == [10, 20, 12, 13]


def test_minus_one_is_random_for_that_item_only():
    seeds = resolve_seeds(GenerationRequest(batch_size=3, seeds=[7, -1, 9]))
    assert seeds[0] == 7 and seeds[2] == 9 and 0 <= seeds[1] < 2**32


def test_all_random_when_no_seed_is_fixed():
    assert GenerationRequest(batch_size=2, seeds=[-1, -1]).seeds is None
    seeds = resolve_seeds(GenerationRequest(batch_size=2))
    assert len(seeds) == 2 and all(0 <= s < 2**32 for s in seeds)


def test_random_first_seed_leaves_the_rest_random():
    seeds = resolve_seeds(GenerationRequest(batch_size=3, seeds=[-1, 5]))
    assert seeds[1] == 5 and len(seeds) == 3


def test_batch_key_groups_what_one_pipeline_call_can_take():
    def key(**fields):
        r = GenerationRequest(audio_duration=30, **fields)
        return plan.batch_key(r, r.model or "turbo")  # as the worker calls it: the default model filled in

    base = key()
    assert base == key(prompt="other", seeds=[3]) == key(model="turbo")
    assert key(inference_steps=20) != base
    assert key(bpm=90) != base  # one pipeline call takes one bpm
    assert key(task_type="cover", src_audio_key="k") is None
    assert key(audio_code_string="<|audio_code_5|>") is None


def test_a_request_without_duration_gets_upstreams_120_seconds_and_is_counted_so():
    """Upstream's default since its #961; the cost ceiling counts with generated_seconds, so it sees 120 s too.
    Audio codes still set the length; the LM, when it runs and may choose, is counted at its longest."""
    plain = GenerationRequest(prompt="p")
    assert plan.text2music_seconds(plain) == plan.generated_seconds(plain) == 120
    assert plan.generated_seconds(plain, lm=True) == 120  # a plain request runs no LM
    assert plan.text2music_seconds(plain, demo=True) == plan.DEMO_SECONDS == 30  # a random-weight model's length
    assert plan.text2music_seconds(GenerationRequest(audio_code_string="<|audio_code_5|>" * 50)) is None
    assert plan.generated_seconds(GenerationRequest(audio_duration=12)) == 12
    assert plan.generated_seconds(GenerationRequest(thinking=True), lm=True) == plan.MAX_OUTPUT_SECONDS
