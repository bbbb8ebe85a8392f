"""Next-token choice for the 5 Hz LM (torch): guidance, repetition penalty, temperature, top-k, top-p, sampling.

Order per step (the same for both phases):
    CFG  guided = uncond + s * (cond - uncond), on fp32 logits (upstream's formula; only when s > 1)
    the constraint (engine.lm.masking), on the guided logits only
    repetition penalty over the sequence so far (prompt and generated), HF/upstream semantics
    temperature (0 = greedy), then top-k (0/None = off), then top-p (None, 0 or >= 1 = off)
    one draw per row from that row's own torch.Generator (its item's seed)
Temperature before top-k/top-p is what HF generate, vLLM and upstream's production (nano-vllm) backend do.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def guide(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """A logit -inf in both rows (one a trimmed output head did not compute) stays -inf, not NaN."""
    cond = cond.float()
    uncond = uncond.float()
    guided = uncond + scale * (cond - uncond)
    return guided.masked_fill_(torch.isnan(guided), float("-inf"))


def repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """seen: bool [rows, V], the tokens of each row so far. Negative scores are multiplied, positive divided."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def filter_logits(logits: torch.Tensor, temperature: float, top_k: Optional[int],
                  top_p: Optional[float]) -> torch.Tensor:
    """Temperature, top-k, top-p (in that order). temperature <= 0 returns the logits as they are (greedy)."""
    if temperature <= 0:
        return logits
    logits = logits / temperature
    neg_inf = float("-inf")
    if top_k and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, neg_inf)
    if top_p is not None and 0.0 < top_p < 1.0:
        logits = logits.masked_fill(_outside_nucleus(logits, top_p), neg_inf)
    return logits


_NUCLEUS_PROBE = 256


def _outside_nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """True for the tokens outside the smallest most-likely set whose mass reaches top_p (HF's rule; the top token
    is always kept). The nucleus is looked for among the top 256 first: a full sort of a 217k vocabulary costs
    ~20 ms a row on a CPU, and a trained model's nucleus is nearly always that small."""
    probs = torch.softmax(logits, dim=-1)
    k = min(_NUCLEUS_PROBE, logits.shape[-1])
    top_probs, order = torch.topk(probs, k, dim=-1)
    if k == logits.shape[-1] or bool((top_probs.sum(dim=-1) >= top_p).all()):
        before = torch.cumsum(top_probs, dim=-1) - top_probs  # mass ranked above each token
        outside = torch.ones_like(probs, dtype=torch.bool)
        return outside.scatter(-1, order, before >= top_p)
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    return torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, before >= top_p)


def choose(logits: torch.Tensor, temperature: float, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """One token per row: argmax when temperature <= 0, else a draw from softmax(logits) with row r's generator."""
    if temperature <= 0:
        return torch.argmax(logits, dim=-1)
    probs = torch.softmax(logits.float(), dim=-1)
    out = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    for row, gen in enumerate(generators):
        out[row] = torch.multinomial(probs[row], 1, generator=gen)[0]
    return out


def make_generators(seeds: Sequence[int], device: torch.device | str) -> list[torch.Generator]:
    return [torch.Generator(device=torch.device(device)).manual_seed(int(s)) for s in seeds]
