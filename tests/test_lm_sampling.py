"""The sampler's pieces against plain reference computations (torch only, no model)."""
from __future__ import annotations

import pytest
import torch

from engine.lm.sampling import choose, filter_logits, guide, make_generators, repetition_penalty


def _nucleus_by_full_sort(logits, p):
    """Reference top-p: sort everything, keep the smallest prefix whose mass reaches p."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    drop = (torch.cumsum(probs, dim=-1) - probs) >= p
    return logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))


@pytest.mark.parametrize("scale", [0.05, 3.0, 12.0])  # flat (full-sort path) to peaked (top-256 path)
@pytest.mark.parametrize("top_p", [0.2, 0.9, 0.99])
def test_top_p_matches_a_full_sort(scale, top_p):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 3000, generator=g) * scale
    logits[:, :50] = float("-inf")  # masked tokens stay masked
    assert torch.equal(filter_logits(logits, 1.0, None, top_p), _nucleus_by_full_sort(logits, top_p))


def test_temperature_then_top_k_then_top_p():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    out = filter_logits(logits, 2.0, 3, None)
    assert torch.equal(out, torch.tensor([[2.0, 1.5, 1.0, float("-inf"), float("-inf")]]))
    # at temperature 2 the top two hold < 0.75 of the mass, at temperature 0.5 the first alone holds > 0.75
    assert torch.isfinite(filter_logits(logits, 2.0, None, 0.75)).sum() == 3
    assert torch.isfinite(filter_logits(logits, 0.5, None, 0.75)).sum() == 1
    assert torch.equal(filter_logits(logits, 1.0, 0, 1.0), logits)  # 0 / 1.0 switch them off
    assert torch.equal(filter_logits(logits, 0.0, 1, 0.1), logits)  # greedy: untouched


def test_guidance_and_repetition_penalty_formulas():
    cond, uncond = torch.tensor([[1.0, -2.0, 0.5]]), torch.tensor([[0.5, 1.0, 0.5]])
    assert torch.equal(guide(cond, uncond, 3.0), torch.tensor([[2.0, -8.0, 0.5]]))
    seen = torch.tensor([[True, True, False]])
    assert torch.equal(repetition_penalty(torch.tensor([[2.0, -2.0, 2.0]]), seen, 2.0),
                       torch.tensor([[1.0, -4.0, 2.0]]))


def test_choose_is_seeded_per_row():
    logits = torch.zeros(2, 1000)
    a = choose(logits, 1.0, make_generators([5, 6], "cpu"))
    b = choose(logits, 1.0, make_generators([5, 6], "cpu"))
    c = choose(logits, 1.0, make_generators([6, 5], "cpu"))
    assert torch.equal(a, b) and a[0] == c[1] and a[1] == c[0] and a[0] != a[1]
    assert choose(torch.tensor([[0.0, 3.0, 1.0]]), 0.0, []).tolist() == [1]
