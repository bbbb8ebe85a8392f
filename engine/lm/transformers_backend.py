"""The 5 Hz LM on transformers (CPU or GPU): loading, and a batched decode loop with CFG and constraints.

One forward per step serves every item and, with CFG, its unconditional twin: rows [0, n) are the conditional
sequences, rows [n, 2n) the unconditional ones, left-padded to one length, with a KV cache. The chosen token of
item i is appended to both of its rows. `ConstraintLogitsProcessor` offers the same constraints to
`model.generate()` (it replays the tokens generate appended).
"""
from __future__ import annotations

import inspect
import logging
import os
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from engine.cpu_target import auto_cpu_dtype, cpu_flags
from engine.device_probe import auto_cuda_dtype
from engine.lm.constraints import Allowed, ConstraintTables, TokenConstraint
from engine import memory
from engine.lm.kv_budget import LM_MAX_CONTEXT, cache_rows, cache_tokens, kv_cache_bytes, new_tokens_room
from engine.lm.masking import MaskApplier
from engine.lm.output_head import OutputHead
from engine.lm.sampling import choose, filter_logits, guide, make_generators, repetition_penalty
from engine.lm.tiny import is_random_lm
from engine.quantize import quantize_module, tied_output_head
from engine.lm.types import DecodeResult, SamplingParams, StepCallback, checked_decode_args
from engine.lm.vocab import LMVocab, TokenizerText
from engine.memory import GB
from engine.types import GenerationError

log = logging.getLogger("engine.lm")


def default_dtype(device: torch.device) -> torch.dtype:
    """ACESTEP_DTYPE=auto, as for the DiT: bf16 on GPUs (emulated below compute capability 8.0; never fp16,
    engine/device_probe.auto_cuda_dtype); on CPU bf16 where the
    CPU computes it natively (AMX / AVX512-BF16 / Arm BF16, engine/cpu_target.py), else fp32 (upstream: always
    fp32 on cpu)."""
    if device.type == "cuda":
        return auto_cuda_dtype()  # the DiT's choice: bf16, emulated on a T4 rather than float16
    if device.type == "cpu":
        return torch.bfloat16 if auto_cpu_dtype(cpu_flags())[0] == "bfloat16" else torch.float32
    return torch.float32


KV_CACHES = ("auto", "static", "dynamic")


def kv_cache_choice(setting: str, device: torch.device) -> str:
    """ACESTEP_LM_KV_CACHE: "static" allocates each decode's KV cache once (prompt + max new tokens) and writes
    it in place; "dynamic" (transformers' default) grows it by concatenation, a new allocation and a copy of
    every layer's keys and values at every step. auto: static on CPU, where it was measured faster
    (bench/RESULTS.md, 5 Hz LM decode step), dynamic elsewhere. The fit check counts either at the full context
    (engine/lm/kv_budget.py): a static cache holds it from the first step, a dynamic one reaches it at the end."""
    value = (setting or "auto").strip().lower()
    if value not in KV_CACHES:
        raise ValueError(f"ACESTEP_LM_KV_CACHE must be one of {', '.join(KV_CACHES)} (got {setting!r})")
    if value == "auto":
        return "static" if torch.device(device).type == "cpu" else "dynamic"
    return value


FILLED_SDPA = "acestep_filled_sdpa"


def filled_sdpa(module, query, key, value, attention_mask, acestep_filled: Optional[int] = None, **kwargs):
    """transformers' SDPA over the part of a static cache written so far (`acestep_filled` keys; the decode
    loop passes it through the model's forward): the same keys, mask and shapes as a dynamic cache's, so the
    same logits to the bit, and no attention work on the empty slots."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if acestep_filled is not None and key.shape[-2] > acestep_filled:
        key, value = key[:, :, :acestep_filled], value[:, :, :acestep_filled]
        if attention_mask is not None and attention_mask.shape[-1] > acestep_filled:
            attention_mask = attention_mask[..., :acestep_filled]
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def use_filled_sdpa(model) -> bool:
    """Switch a model that runs transformers' SDPA to filled_sdpa (registered once); False when it runs
    another attention (eager, flash...) or this transformers has no attention registry: then a static cache's
    attention spans the whole cache, masked (the same tokens in float32, bf16 rounding apart)."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:
        return False
    current = getattr(model.config, "_attn_implementation", None)
    if current == FILLED_SDPA:
        return True
    if current != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return False
    AttentionInterface.register(FILLED_SDPA, filled_sdpa)
    AttentionMaskInterface.register(FILLED_SDPA, sdpa_mask)
    model.set_attn_implementation(FILLED_SDPA)
    return True


class TransformersLM(TokenizerText):
    """A loaded 5 Hz LM: model, tokenizer, vocabulary tables and the decode loop (an engine.lm.types.LMBackend)."""

    name = "pt"

    def __init__(self, model, tokenizer, *, model_name: str = "", random_weights: bool = False,
                 max_duration: int = 600, kv_cache: str = "auto", max_context: int = LM_MAX_CONTEXT):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.random_weights = random_weights
        self.device = next(model.parameters()).device
        self.dtype = str(next(model.parameters()).dtype).replace("torch.", "")
        logits_size = int(model.get_output_embeddings().weight.shape[0])
        start = time.perf_counter()
        self.vocab = LMVocab.from_tokenizer(tokenizer, logits_size=logits_size)
        self.tables = ConstraintTables(self.vocab, self.encode, max_duration=max_duration)
        self.tables_s = time.perf_counter() - start
        self.applier = MaskApplier(self.tables, self.device)
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._keep_kw = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)
        # The head computed here, block by block, so that a constrained step computes only the blocks its allowed
        # tokens lie in (engine/lm/output_head.py); None: the model's own forward computes the whole head.
        self.head = OutputHead.of(model)
        self.trim_head = True  # False: every block every step (same tokens, for comparison)
        self.kv_cache = kv_cache_choice(kv_cache, self.device)
        self.max_context = max_context  # tokens a decode's cache may span (the fit check counts this many)
        self.filled_attention = self.kv_cache == "static" and use_filled_sdpa(model)
        self._decoder = model.get_decoder() if self.head is not None else None
        if self._decoder is not None:
            dparams = inspect.signature(self._decoder.forward).parameters
            self._decoder_cache_kw = "cache" if "cache" in dparams else "past_key_values"

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str | torch.device = "cpu",
             dtype: Optional[torch.dtype] = None, max_duration: int = 600, quantize: str = "none",
             kv_cache: str = "auto") -> "TransformersLM":
        """Load a 5 Hz LM folder (published layout) with no hub access."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(path)
        device = torch.device(device)
        dtype = dtype or default_dtype(device)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype).to(device)
        # ACESTEP_QUANTIZE_LM (engine/quantize.py); the head tied to the embedding stays as it is, stored once
        quantize_module(model, quantize, skip=tied_output_head(model))
        lm = cls(model, tokenizer, model_name=path.name, random_weights=is_random_lm(path), max_duration=max_duration,
                 kv_cache=kv_cache)
        if lm.random_weights:
            log.warning("5 Hz LM %s has random weights: its metadata and audio codes are noise", path)
        return lm

    # --- decoding -----------------------------------------------------------------------------------------------
    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache, keep_last: bool,
                 span: Optional[tuple[int, int]] = None, filled: Optional[int] = None):
        """The last position's logits [rows, V]; with a span (and trim_head), -inf outside the head blocks
        that cover it. filled: the cache's keys after this step (a static cache's attention reads no more)."""
        extra = {"acestep_filled": filled} if filled is not None and self.filled_attention else {}
        if self.head is not None and self._decoder is not None:
            hidden = self._decoder(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                                   **{self._decoder_cache_kw: cache}, **extra).last_hidden_state[:, -1, :]
            return self.head.logits(hidden, span if self.trim_head else None)
        kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, self._cache_kw: cache,
                  "use_cache": True, **extra}
        if keep_last and self._keep_kw:
            kwargs[self._keep_kw] = 1
        return self.model(**kwargs).logits[:, -1, :]

    def _new_cache(self, max_len: int):
        from transformers import DynamicCache

        if self.kv_cache == "static":
            from transformers import StaticCache

            return StaticCache(config=self.model.config, max_cache_len=max_len)
        try:
            return DynamicCache(config=self.model.config)
        except TypeError:  # transformers 4.x
            return DynamicCache()

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]], *, seeds: Sequence[int], sampling: SamplingParams,
                 max_new_tokens: int, uncond_prompts: Optional[Sequence[Sequence[int]]] = None,
                 constraints: Optional[Sequence[Optional[TokenConstraint]]] = None,
                 stop_ids: Sequence[int] = (), on_step: Optional[StepCallback] = None,
                 logits_hook=None) -> DecodeResult:
        """Decode one continuation per prompt.

        seeds[i] drives item i's draws; uncond_prompts (one per item) are used when sampling.cfg; constraints[i]
        (or None) shapes item i; an item stops at any of stop_ids (not included in its tokens) or after
        max_new_tokens, cut to what the context leaves after the padded prompts (max_context). logits_hook(step,
        logits) sees each step's guided logits before the constraint (tests).
        Items whose KV caches do not fit together in the memory available now are decoded in groups, one after
        another (`_group_size`; the result's notes say so). Each item keeps its own seed's generator and the
        batch's padded width, but a group's smaller batch shape can round the logits differently (bf16 most), so
        its tokens may differ from a whole-batch decode, as with any change of the batch's composition.
        """
        n = len(prompts)
        uncond, constraints = checked_decode_args(n, seeds, sampling, uncond_prompts, constraints)
        cfg = uncond is not None
        # every group is padded to the whole batch's width (the same prompt positions as in the whole batch)
        width = max(len(p) for p in [*prompts, *(uncond or ())])
        # an upper limit: cut to what the context leaves (kv_budget.new_tokens_room; vLLM's backend does the same)
        max_new_tokens = new_tokens_room(width, max_new_tokens, self.max_context)
        size, note = self._group_size(n, cfg, cache_tokens(width, max_new_tokens, self.max_context))
        if size >= n:
            whole = self._decode(prompts, uncond, constraints, seeds, sampling, max_new_tokens, stop_ids, on_step,
                                 logits_hook, width)
            whole.notes.extend([note] if note else [])
            return whole
        parts: list[DecodeResult] = []
        groups = -(-n // size)
        for g, lo in enumerate(range(0, n, size)):
            hi = min(n, lo + size)
            # progress over the whole batch: group g's step s counts as (g x max_new_tokens + s) / groups
            scaled = (None if on_step is None else
                      (lambda step, g=g: on_step((g * max_new_tokens + step) // groups)))
            parts.append(self._decode(prompts[lo:hi], None if uncond is None else uncond[lo:hi], constraints[lo:hi],
                                      seeds[lo:hi], sampling, max_new_tokens, stop_ids, scaled, logits_hook, width))
        return DecodeResult(tokens=[t for p in parts for t in p.tokens], stopped=[s for p in parts for s in p.stopped],
                            prompt_tokens=[len(p) for p in prompts], steps=sum(p.steps for p in parts),
                            prefill_s=sum(p.prefill_s for p in parts), decode_s=sum(p.decode_s for p in parts),
                            constraint_s=sum(p.constraint_s for p in parts), rows=sum(p.rows for p in parts),
                            notes=[note])

    def _group_size(self, n: int, cfg: bool, tokens: int) -> tuple[int, str]:
        """How many of `n` songs one decode may take now, and the note that says why when fewer than n (or
        when even one song's cache is over what is usable): as many as their KV caches (engine/lm/kv_budget.py,
        at `tokens` per row) fit in DECODE_HEADROOM of the memory available on the LM's device (engine/memory.py;
        unknown: all); one when a song's cache fits what is available but not its headroom (the start-up fit
        check counted one song's cache beside the models); GenerationError with the numbers when it does not fit
        at all."""
        rows = cache_rows(1, cfg)
        # the cache holds the model's compute dtype (its first parameter: the embedding, never quantised)
        song = kv_cache_bytes(self.model.config.to_dict(), next(self.model.parameters()).element_size(),
                              rows=rows, tokens=tokens)
        available = memory.available_bytes(self.device)
        if available is None:
            return n, ""
        usable = int(available * memory.DECODE_HEADROOM)
        what = (f"the 5 Hz LM's KV cache takes {_gb(song)} a song ({rows} rows of {tokens} tokens"
                f"{' with CFG' if cfg else ''})")
        if song > available:  # a song at a time would be OOM-killed (CPU) or hit a CUDA out-of-memory error
            raise GenerationError(
                f"{what}, but {self.device} has {_gb(available)} available ({_gb(usable)} usable at "
                f"{memory.DECODE_HEADROOM:.0%}): retry when the machine is less loaded, ask for a shorter song, or "
                "serve a smaller or quantised LM (ACESTEP_QUANTIZE=int8)")
        if song > usable:
            # within the headroom only (a transient dip; the start-up fit check admitted one song): go on a song at
            # a time, and say so
            note = (f"lm decoded {n} song{'s' if n > 1 else ''} one at a time with less memory than one song's "
                    f"cache (memory: {what}; {_gb(available)} available on {self.device}, {_gb(usable)} usable at "
                    f"{memory.DECODE_HEADROOM:.0%}; the start-up fit check counted one song's)")
            log.warning("%s", note)
            return 1, note
        size = min(n, usable // song)
        if size == n:
            return n, ""
        groups = -(-n // size)
        return size, (f"lm decoded {n} songs in {groups} groups of {'at most ' if n % size else ''}{size} "
                      f"(memory: {what}; {_gb(available)} available on {self.device})")

    def _decode(self, prompts: Sequence[Sequence[int]], uncond: Optional[Sequence[Sequence[int]]],
                constraints: Sequence[Optional[TokenConstraint]], seeds: Sequence[int], sampling: SamplingParams,
                max_new_tokens: int, stop_ids: Sequence[int], on_step: Optional[StepCallback], logits_hook,
                width: int) -> DecodeResult:
        """One batched decode of every prompt given (and its unconditional twin), left-padded to `width`."""
        n = len(prompts)
        cfg = uncond is not None
        rows = [list(p) for p in prompts] + [list(p) for p in uncond or ()]
        device = self.device
        pad = self.vocab.pad_id
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        # every step's attention mask is a view of this one (the step's column set to 1 as it comes)
        full_mask = torch.zeros((len(rows), width + max_new_tokens), dtype=torch.long)
        for r, seq in enumerate(rows):
            ids[r, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            full_mask[r, width - len(seq):width] = 1
        ids, full_mask = ids.to(device), full_mask.to(device)
        # a static cache takes the whole mask every step (its keys span prompt + max new tokens; columns not yet
        # written are 0): one shape for the whole decode, which a compiled decoder needs
        static = self.kv_cache == "static"
        mask = full_mask if static else full_mask[:, :width]
        prompt_mask = full_mask[:, :width]
        pos = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
        next_pos = prompt_mask.sum(-1, keepdim=True)
        seen = None
        if sampling.repetition_penalty != 1.0:
            seen = torch.zeros((n, self.vocab.size), dtype=torch.bool, device=device)
            for r in range(n):
                seen[r, torch.tensor(rows[r], dtype=torch.long, device=device)] = True
        generators = make_generators(seeds, device)
        stops = set(int(s) for s in stop_ids)
        out: list[list[int]] = [[] for _ in range(n)]
        stopped = [False] * n
        constraint_s = 0.0
        self.applier.seconds = 0.0

        def next_allowed() -> list[Optional[Allowed]]:
            nonlocal constraint_s
            t0 = time.perf_counter()
            allowed = [c.allowed() if c is not None and not stopped[i] else None for i, c in enumerate(constraints)]
            constraint_s += time.perf_counter() - t0
            return allowed

        start = time.perf_counter()
        cache = self._new_cache(cache_tokens(width, max_new_tokens, self.max_context))
        allowed = next_allowed()
        logits = self._forward(ids, mask, pos, cache, keep_last=True, span=self._span(allowed, constraints, stopped),
                               filled=width)
        prefill_s = time.perf_counter() - start
        start = time.perf_counter()
        steps = 0
        for step in range(max_new_tokens):
            guided = guide(logits[:n], logits[n:], sampling.cfg_scale) if cfg else logits[:n].float()
            if logits_hook is not None:
                logits_hook(step, guided.clone())
            self.applier.apply(guided, allowed)
            if seen is not None:
                guided = repetition_penalty(guided, seen, sampling.repetition_penalty)
            guided = filter_logits(guided, sampling.temperature, sampling.top_k, sampling.top_p)
            chosen = choose(guided, sampling.temperature, generators).tolist()
            t0 = time.perf_counter()
            for i, tok in enumerate(chosen):
                if stopped[i]:
                    chosen[i] = pad
                    continue
                c = constraints[i]
                if c is not None:
                    c.advance(tok)
                if tok in stops:
                    stopped[i] = True
                else:
                    out[i].append(tok)
            constraint_s += time.perf_counter() - t0
            steps = step + 1
            if on_step is not None:
                on_step(steps)
            if all(stopped) or steps == max_new_tokens:
                break
            step_ids = torch.tensor(chosen * (2 if cfg else 1), dtype=torch.long, device=device)[:, None]
            if seen is not None:
                seen[torch.arange(n, device=device), step_ids[:n, 0]] = True
            full_mask[:, width + steps - 1] = 1
            mask = full_mask if static else full_mask[:, :width + steps]
            allowed = next_allowed()
            logits = self._forward(step_ids, mask, next_pos, cache, keep_last=False,
                                   span=self._span(allowed, constraints, stopped), filled=width + steps)
            next_pos = next_pos + 1
        decode_s = time.perf_counter() - start
        return DecodeResult(tokens=out, stopped=stopped, prompt_tokens=[len(p) for p in prompts], steps=steps,
                            prefill_s=prefill_s, decode_s=decode_s, constraint_s=constraint_s + self.applier.seconds,
                            rows=len(rows))

    def _span(self, allowed: Sequence[Optional[Allowed]], constraints: Sequence[Optional[TokenConstraint]],
              stopped: Sequence[bool]) -> Optional[tuple[int, int]]:
        """The id range the next step's head must cover: every active item's allowed tokens; None (the whole
        head) when an active item is unconstrained. A stopped item's token is discarded: it needs nothing."""
        lo, hi = self.vocab.size, 0
        for a, c, done in zip(allowed, constraints, stopped):
            if done:
                continue
            if a is None or c is None:
                return None
            a_lo, a_hi = self.tables.span(a)
            lo, hi = min(lo, a_lo), max(hi, a_hi)
        return (lo, hi) if hi > lo else None


def _gb(size: int) -> str:
    return f"{size / GB:.3g} GB"  # three figures: a tiny LM's cache is a few MB, a real one's about 1 GB


def constraint_logits_processor(constraints: Sequence[TokenConstraint], applier: MaskApplier, prompt_length: int):
    """The constraints as a transformers LogitsProcessor for `model.generate(logits_processor=[...])`.

    generate() passes the whole sequence each step; the processor feeds each row's new tokens to its constraint,
    then masks. Rows are generate's batch rows (one constraint per row); left padding is part of prompt_length.
    """
    from transformers import LogitsProcessor

    class ConstraintLogitsProcessor(LogitsProcessor):
        def __init__(self):
            self.constraints = list(constraints)
            self.fed = [0] * len(self.constraints)

        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            allowed = []
            for r, c in enumerate(self.constraints):
                new = input_ids[r, prompt_length + self.fed[r]:].tolist()
                self.fed[r] += len(new)
                for tok in new:
                    if not c.done:
                        c.advance(tok)
                allowed.append(None if c.done else c.allowed())
            return applier.apply(scores, allowed)

    return ConstraintLogitsProcessor()
