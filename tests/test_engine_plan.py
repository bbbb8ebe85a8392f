"""Seed resolution: explicit seeds honoured in order, -1 random per item, gaps filled from the first."""
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
