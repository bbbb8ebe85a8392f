"""The LM's output head computed over part of the vocabulary when the constraint allows no more.

In the codes phase only the audio-code tokens and EOS may come out: about 64k of the 5 Hz LM's 217k logits.
The head (hidden @ W.T, W the [vocab, hidden] weight tied to the embeddings) is then computed over the rows of W
that range touches only, and every other logit is -inf, as the constraint would have set it (the 1.7B LM's
head reads 0.9 GB of bf16 weights per decode step; the trimmed one 0.27 GB).

Exactly the same tokens as the whole head: W is cut once into fixed blocks of rows (views, no copy), and
every step, trimmed or not, computes the head block by block. A trimmed step skips blocks; each block it
computes has the same shape, data and kernel as in an untrimmed step, so its logits are bit-identical. (A plain
`W[lo:hi]` is not: MKL splits a GEMV's reduction across threads by its width, and float32 results then differ
in the last bits from the same columns of the whole product.)
"""
from __future__ import annotations

from typing import Optional

import torch

DEFAULT_BLOCK_ROWS = 4096  # 54 blocks for 217,204 tokens; a trimmed codes phase computes 65,652 rows for 64,001


class OutputHead:
    """logits = hidden @ weight.T over the blocks that cover `span` (all when span is None); -inf elsewhere."""

    def __init__(self, weight: torch.Tensor, block_rows: int = DEFAULT_BLOCK_ROWS):
        if block_rows < 1:
            raise ValueError("block_rows must be positive")
        self.weight = weight
        self.size = int(weight.shape[0])
        self.block_rows = block_rows
        self.blocks = [weight[lo:lo + block_rows] for lo in range(0, self.size, block_rows)]
        self.rows_computed = 0  # weight rows multiplied so far (bench and tests read the trim's share)

    @classmethod
    def of(cls, model, block_rows: int = DEFAULT_BLOCK_ROWS) -> Optional["OutputHead"]:
        """The head of a transformers causal LM whose output layer is a plain bias-free Linear over an ordinary
        tensor; None otherwise (a quantised or scaled head stays inside the model's own forward)."""
        head = model.get_output_embeddings()
        if type(head) is not torch.nn.Linear or head.bias is not None:
            return None
        if type(head.weight.data) is not torch.Tensor:  # a tensor subclass (torchao and the like)
            return None
        return cls(head.weight.data, block_rows)

    def covered(self, span: Optional[tuple[int, int]]) -> range:
        """The block indices a step computes for an allowed id range [lo, hi) (all for None)."""
        if span is None:
            return range(len(self.blocks))
        lo, hi = max(0, span[0]), min(self.size, span[1])
        if hi <= lo:
            return range(len(self.blocks))  # nothing in range: leave the choice to the full head and the mask
        return range(lo // self.block_rows, (hi - 1) // self.block_rows + 1)

    def logits(self, hidden: torch.Tensor, span: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """hidden [rows, H] -> logits [rows, size] in the weight's dtype."""
        blocks = self.covered(span)
        if len(blocks) == len(self.blocks):
            out = torch.empty((hidden.shape[0], self.size), dtype=self.weight.dtype, device=hidden.device)
        else:
            out = torch.full((hidden.shape[0], self.size), float("-inf"), dtype=self.weight.dtype,
                             device=hidden.device)
        hidden = hidden.to(self.weight.dtype)
        for b in blocks:
            lo = b * self.block_rows
            w = self.blocks[b]
            out[:, lo:lo + w.shape[0]] = torch.nn.functional.linear(hidden, w)
            self.rows_computed += int(w.shape[0])
        return out
