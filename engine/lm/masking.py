"""Applying constraints to logits in torch (shared by the transformers backend and a future vLLM processor).

`MaskApplier.apply(logits, allowed)` sets every disallowed logit of each row to -inf, in place. Token classes
become boolean masks on the logits' device once; explicit id lists become cached index tensors. Rows with the
same `Allowed` (every row of phase 2) are masked in one operation.
"""
from __future__ import annotations

import time
from typing import Optional, Sequence

import torch

from engine.lm.constraints import Allowed, ConstraintTables

_CACHE_LIMIT = 4096


class MaskApplier:
    def __init__(self, tables: ConstraintTables, device: torch.device | str):
        self.tables = tables
        self.device = torch.device(device)
        self.size = tables.vocab.size
        self._blocked: dict[tuple, torch.Tensor] = {}  # (mask, ids) -> bool [V], True = disallowed
        self._index: dict[tuple[int, ...], torch.Tensor] = {}
        self.seconds = 0.0  # time spent in apply(), for the constraint's share of decode time

    def _blocked_mask(self, allowed: Allowed) -> torch.Tensor:
        key = (allowed.mask, allowed.ids)
        mask = self._blocked.get(key)
        if mask is None:
            mask = torch.ones(self.size, dtype=torch.bool)
            if allowed.mask is not None:
                mask[torch.tensor(self.tables.mask_ids(allowed.mask), dtype=torch.long)] = False
            if allowed.ids:
                mask[torch.tensor(allowed.ids, dtype=torch.long)] = False
            mask = mask.to(self.device)
            if len(self._blocked) >= _CACHE_LIMIT:
                self._blocked.clear()
            self._blocked[key] = mask
        return mask

    def _ids(self, ids: tuple[int, ...]) -> torch.Tensor:
        t = self._index.get(ids)
        if t is None:
            t = torch.tensor(ids, dtype=torch.long, device=self.device)
            if len(self._index) >= _CACHE_LIMIT:
                self._index.clear()
            self._index[ids] = t
        return t

    def apply(self, logits: torch.Tensor, allowed: Sequence[Optional[Allowed]]) -> torch.Tensor:
        """logits [rows, V]; allowed[r] None leaves row r as it is."""
        start = time.perf_counter()
        groups: dict[Allowed, list[int]] = {}
        for row, a in enumerate(allowed):
            if a is not None:
                groups.setdefault(a, []).append(row)
        neg_inf = float("-inf")
        for a, rows in groups.items():
            if a.mask is None and len(a.ids) <= 64:  # a few ids: keep them, fill the rest
                index = self._ids(a.ids)
                for row in rows:
                    kept = logits[row, index]
                    logits[row].fill_(neg_inf)
                    logits[row, index] = kept
            else:
                blocked = self._blocked_mask(a)
                if len(rows) == logits.shape[0]:
                    logits.masked_fill_(blocked, neg_inf)
                else:
                    for row in rows:
                        logits[row].masked_fill_(blocked, neg_inf)
            if a.greedy:
                for row in rows:
                    best = int(torch.argmax(logits[row]))
                    value = logits[row, best].clone()
                    logits[row].fill_(neg_inf)
                    logits[row, best] = value
        self.seconds += time.perf_counter() - start
        return logits
