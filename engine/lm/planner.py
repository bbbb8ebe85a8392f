"""The 5 Hz LM planner: a GenerationRequest in, metadata, (rewritten) lyrics and audio codes out (torch-free).

Steps, as upstream runs them (api_server + inference.generate_music + llm_inference):

1. sample   (`sample_mode` / `sample_query`): a whole song from a description: caption, lyrics, bpm, key, time
             signature, duration replace the request's. No CFG.
2. format   (`use_format`, with a caption or lyrics): caption and lyrics rewritten, the user's metadata forced; a
             duration it writes skips phase 1. No CFG.
3. phase 1  (metadata, "CoT"): runs unless the user (or steps 1-2) gave bpm, key, time signature and duration all
             four, for every task but cover/repaint. Caption and language are written when use_cot_caption /
             use_cot_language; genres never. User values are forced verbatim. Ends with EOS where `</think>` would be.
4. phase 2  (audio codes, `thinking`, no user codes, not cover/repaint): 5 codes per second, exactly duration x 5
             when a duration is known (the user's, else the one phase 1 wrote), conditioned on the metadata as a
             prefilled assistant turn. batch_size items share steps 1-3; item i draws its codes from seeds[i].

CFG (`lm_cfg_scale` > 1) runs in phases 1 and 2 with upstream's unconditional prompts; `constrained_decoding`
switches the constraints of every step. The runtime is an LMBackend (engine.lm.types): transformers or vLLM.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional, Sequence

from engine.lm import prompts
from engine.lm.constraints import CodesConstraint, MetadataConstraint, TokenConstraint
from engine.lm.kv_budget import new_tokens_room
from engine.lm.metadata import metadata_problems, parse_lm_output
from engine.lm.types import DecodeResult, LMBackend, LMPlan, PhaseStats, SamplingParams
from engine.lm.vocab import CODES_PER_SECOND, DURATION_RANGE, FIELDS
# Which steps run, and their caps, are decided in the torch-free contract: the API's cost ceiling counts them.
from engine.plan import (DEFAULT_TEXT2MUSIC_SECONDS, LM_MAX_COT_TOKENS, LM_MAX_LYRICS_TOKENS,
                         LM_UNCONSTRAINED_EXTRA_CODES, USER_FIELDS, LMSteps, has_all_metas, lm_steps,
                         resolve_seeds, target_codes, user_metadata)
from engine.request import GenerationRequest, format_audio_codes
from engine.types import GenerationError

GENERATION_FIELDS = ("bpm", "caption", "duration", "keyscale", "language", "timesignature")  # phase 1: no genres
ProgressFn = Callable[[float, str], None]

# What each step is doing, as progress stages show it (with its tokens so far over its token budget).
PHASE_LABELS = {"sample": "LM: caption, lyrics and metadata from the description",
                "format": "LM: formatting caption and lyrics", "cot": "LM: caption and metadata",
                "codes": "LM: audio codes", "understand": "LM: reading the source's audio codes"}
# What a client can change when a step's prompt leaves no room in the LM's context (max_context).
SHORTEN = {"sample": "shorten the description (sample_query)", "format": "shorten the caption or lyrics",
           "cot": "shorten the caption or lyrics", "codes": "shorten the caption or lyrics",
           "understand": "send a shorter source audio (its codes take a token each, 5 per second)"}
REPORT_EVERY = 8  # decode steps between progress calls (each is a cancellation point and feeds the stall timer)
STAGE_UPDATES = 20  # the token count in the stage text moves in 1/20ths of the budget (a store write each)


def phase_reporter(progress: ProgressFn, phase: str, budget: int, label: str = "") -> Callable[[int], None]:
    """The per-step callback of one decode: `progress(steps / budget, "<label>: <n>/<budget> tokens")` every
    REPORT_EVERY steps. The shown count moves in 1/STAGE_UPDATES steps of the budget, so the stage text (whose
    every change is a store write) changes a bounded number of times however long the decode."""
    label = label or PHASE_LABELS.get(phase, f"LM: {phase}")
    quantum = max(REPORT_EVERY, -(-budget // STAGE_UPDATES))

    def on_step(step: int) -> None:
        if step % REPORT_EVERY == 0 or step >= budget:
            shown = budget if step >= budget else step - step % quantum
            progress(min(1.0, step / budget), f"{label}: {shown}/{budget} tokens")
    return on_step


class PlanProgress:
    """A whole plan's progress: decode steps over the budgets (max new tokens) of the steps still to run.

    Steps are announced up front with estimated budgets (a later step's budget may depend on what an earlier
    one wrote, e.g. the codes on phase 1's duration); `phase()` takes the real budget as the step starts. A
    finished step counts whole (a real LM stops early at its stop token); reported fractions never go back."""

    def __init__(self, report: ProgressFn, planned: list[tuple[str, int]]):
        self.report, self.ahead = report, list(planned)
        self.done = 0
        self.shown = 0.0

    def skip(self, phase: str) -> None:
        self.ahead = [(p, b) for p, b in self.ahead if p != phase]

    def phase(self, phase: str, budget: int) -> ProgressFn:
        """The ProgressFn of the step `phase` starting now, with `budget` tokens."""
        names = [p for p, _ in self.ahead]
        if phase in names:
            del self.ahead[names.index(phase)]
        before = self.done
        total = before + budget + sum(b for _, b in self.ahead)
        self.done += budget

        def progress(fraction: float, stage: str) -> None:
            self.shown = max(self.shown, min(1.0, (before + fraction * budget) / total))
            self.report(self.shown, stage)
        return progress


def description_is_instrumental(query: str) -> bool:
    """Upstream's rule for sample mode's `instrumental:` flag."""
    q = query.lower().strip()
    return "instrumental" in q or "pure music" in q or "pure instrument" in q or q.endswith(" solo") or q == "solo"


class Planner:
    def __init__(self, backend: LMBackend, *, max_caption_tokens: int = 512, max_cot_tokens: int = LM_MAX_COT_TOKENS,
                 max_lyrics_tokens: int = LM_MAX_LYRICS_TOKENS, max_codes: int = DURATION_RANGE[1] * CODES_PER_SECOND,
                 enforce_lm_duration: bool = True, demo_seconds: Optional[float] = None):
        self.backend = backend
        # A random-weight LM's duration is noise (anything up to 600 s): with demo_seconds set, a request with
        # no duration of its own is rendered at that length instead, and the result says so.
        self.demo_seconds = demo_seconds
        self.max_caption_tokens = max_caption_tokens
        self.max_cot_tokens = max_cot_tokens
        self.max_lyrics_tokens = max_lyrics_tokens
        self.max_codes = max_codes
        self.enforce_lm_duration = enforce_lm_duration

    # --- single steps -------------------------------------------------------------------------------------------
    def _run(self, phase: str, prompt: str, *, seeds: Sequence[int], sampling: SamplingParams, max_new_tokens: int,
             uncond: Optional[str] = None, constraints: Optional[Sequence[Optional[TokenConstraint]]] = None,
             stop_ids: Sequence[int] = (), progress: Optional[ProgressFn] = None,
             label: str = "", required: Optional[int] = None) -> tuple[DecodeResult, PhaseStats]:
        """One decode of `phase`. max_new_tokens is an upper limit, cut to what the LM's context leaves after the
        prompt (both backends cut it so); `required`: new tokens the step must have room for (a constrained song's
        codes and stop), else refused rather than cut short."""
        b = self.backend
        n = len(seeds)
        ids = b.encode(prompt)
        uncond_ids = b.encode(uncond) if (uncond is not None and sampling.cfg) else None
        width = max(len(ids), len(uncond_ids or ()))
        asked, max_new_tokens = max_new_tokens, self._room(phase, width, max_new_tokens, required)
        on_step = phase_reporter(progress, phase, max(1, max_new_tokens), label) if progress is not None else None
        start = time.perf_counter()
        result = b.generate([ids] * n, seeds=seeds, sampling=sampling, max_new_tokens=max_new_tokens,
                            uncond_prompts=[uncond_ids] * n if uncond_ids is not None else None,
                            constraints=constraints, stop_ids=stop_ids, on_step=on_step)
        stats = PhaseStats(phase=phase, items=n, cfg=uncond_ids is not None, constrained=constraints is not None,
                           prompt_tokens=len(ids), generated_tokens=[len(t) for t in result.tokens],
                           steps=result.steps, seconds=time.perf_counter() - start, prefill_s=result.prefill_s,
                           decode_s=result.decode_s, constraint_s=result.constraint_s, notes=list(result.notes))
        if max_new_tokens < asked and not all(result.stopped):
            stats.notes.append(f"lm {phase} stopped at the LM's {b.max_context}-token context after "
                               f"{max_new_tokens} tokens (its prompt takes {width})")
        return result, stats

    def _room(self, phase: str, prompt_tokens: int, max_new_tokens: int, required: Optional[int]) -> int:
        """max_new_tokens cut to the context's room after the prompt; GenerationError (saying what the client
        can change for this step) when the prompt leaves none, or less than `required`."""
        context = self.backend.max_context
        room = context - prompt_tokens
        if room >= max(1, required or 0):
            return new_tokens_room(prompt_tokens, max_new_tokens, context)
        what = f"the 5 Hz LM's context is {context} tokens and this step's prompt takes {prompt_tokens}"
        if room < 1:
            raise GenerationError(f"{PHASE_LABELS.get(phase, phase)}: {what}, leaving no room to write: "
                                  f"{SHORTEN.get(phase, 'shorten its input')}")
        codes = (required or 0) - 1
        most = (room - 1) // CODES_PER_SECOND
        raise GenerationError(
            f"{PHASE_LABELS.get(phase, phase)}: a {codes / CODES_PER_SECOND:g} s song takes {codes} audio codes "
            f"and a stop, but {what} (caption, lyrics and metadata), leaving {room}: ask for at most {most} s "
            "(audio_duration), or shorten the caption or lyrics")

    def metadata_budget(self, mode: Literal["cot", "understand"]) -> int:
        """Max new tokens of a metadata pass ("understand": free text (lyrics) follows the block)."""
        return self.max_cot_tokens + (self.max_lyrics_tokens + 2 if mode == "understand" else 0)

    def codes_budget(self, target: Optional[int], constrained: bool) -> int:
        """Max new tokens of phase 2 for `target` codes: target + 1 (the stop) when constrained; upstream's
        target + 500 without constraints; the longest song's codes + 1 when no duration is known."""
        if target is None:
            return self.max_codes + 1
        return target + 1 if constrained else target + LM_UNCONSTRAINED_EXTRA_CODES

    def _stops(self, *extra: int) -> list[int]:
        v = self.backend.vocab
        return [v.eos_id, v.pad_id, *extra]

    def metadata_pass(self, prompt: str, *, mode: Literal["cot", "understand"], fields: Sequence[str],
                      forced: dict[str, Any], seed: int,
                      sampling: SamplingParams, constrained: bool, uncond: Optional[str] = None,
                      phase: str = "cot", progress: Optional[ProgressFn] = None) -> tuple[str, PhaseStats]:
        """One metadata block (mode "cot": phase 1, stops where `</think>` would be; "understand": `</think>` and
        free text follow). Returns the generated text and its stats."""
        v = self.backend.vocab
        constraints = None
        if constrained:
            constraints = [MetadataConstraint(self.backend.tables, fields=fields, forced=forced, mode=mode,
                                              max_caption_tokens=self.max_caption_tokens,
                                              max_lyrics_tokens=self.max_lyrics_tokens)]
        max_new = self.metadata_budget(mode)
        stops = self._stops(v.think_end_id) if (mode == "cot" and not constrained) else self._stops()
        result, stats = self._run(phase, prompt, seeds=[seed], sampling=sampling, max_new_tokens=max_new,
                                  uncond=uncond, constraints=constraints, stop_ids=stops, progress=progress)
        return self.backend.decode_text(result.tokens[0]), stats

    def cot(self, caption: str, lyrics: str, *, forced: dict[str, Any], use_cot_caption: bool = True,
            use_cot_language: bool = True, seed: int, sampling: SamplingParams, constrained: bool = True,
            negative_prompt: str = prompts.NO_USER_INPUT,
            progress: Optional[ProgressFn] = None) -> tuple[dict[str, Any], str, PhaseStats]:
        """Phase 1: (parsed metadata, raw text, stats)."""
        fields = [f for f in GENERATION_FIELDS
                  if not (f == "caption" and not use_cot_caption) and not (f == "language" and not use_cot_language)]
        text, stats = self.metadata_pass(prompts.cot_prompt(caption, lyrics), mode="cot", fields=fields,
                                         forced=forced, seed=seed, sampling=sampling, constrained=constrained,
                                         uncond=prompts.cot_unconditional_prompt(lyrics, negative_prompt),
                                         progress=progress)
        return parse_lm_output(text).metadata, text, stats

    def codes(self, caption: str, lyrics: str, metadata: dict[str, Any], *, seeds: Sequence[int],
              sampling: SamplingParams, target: Optional[int], constrained: bool = True,
              negative_prompt: str = prompts.NO_USER_INPUT, progress: Optional[ProgressFn] = None,
              max_new_tokens: Optional[int] = None, label: str = "") -> tuple[list[list[int]], str, PhaseStats]:
        """Phase 2: (codes per seed, the metadata block used, stats). target: exact code count (constrained);
        max_new_tokens: the cap (default target + 1, or max_codes + 1); upstream's unconstrained cap with a
        known duration is duration x 5 + 500."""
        cot = prompts.cot_text(metadata)
        constraints: Optional[list[Optional[TokenConstraint]]] = None
        if constrained:
            constraints = [CodesConstraint(self.backend.tables, target=target, max_codes=self.max_codes)
                           for _ in seeds]
        max_new = max_new_tokens or (target if target is not None else self.max_codes) + 1
        result, stats = self._run("codes", prompts.codes_prompt(caption, lyrics, cot), seeds=seeds,
                                  sampling=sampling, max_new_tokens=max_new,
                                  uncond=prompts.codes_unconditional_prompt(caption, lyrics, negative_prompt),
                                  constraints=constraints, stop_ids=self._stops(), progress=progress,
                                  label=label, required=target + 1 if constrained and target is not None else None)
        codes = [self.backend.vocab.codes_from_ids(t) for t in result.tokens]
        return codes, cot, stats

    def format_input(self, caption: str, lyrics: str, *, forced: dict[str, Any], seed: int,
                     sampling: SamplingParams, constrained: bool = True,
                     progress: Optional[ProgressFn] = None) -> tuple[dict[str, Any], str, str, PhaseStats]:
        """`use_format` / `/format_input`: (metadata, lyrics or "" when none came out, raw text, stats)."""
        fields = [f for f in FIELDS if not (f == "language" and forced.get("language"))]
        text, stats = self.metadata_pass(prompts.format_prompt(caption, lyrics), mode="understand", fields=fields,
                                         forced=forced, seed=seed, sampling=sampling.without_cfg(),
                                         constrained=constrained, phase="format", progress=progress)
        parsed = parse_lm_output(text)
        return parsed.metadata, parsed.lyrics, text, stats

    def create_sample(self, query: str, *, instrumental: bool, language: Optional[str], seed: int,
                      sampling: SamplingParams, constrained: bool = True,
                      progress: Optional[ProgressFn] = None) -> tuple[dict[str, Any], str, str, PhaseStats]:
        """`sample_mode` / `sample_query`: (metadata, lyrics, raw text, stats); "[Instrumental]" lyrics when
        instrumental and none came out."""
        forced = {"language": language} if language else {}
        text, stats = self.metadata_pass(prompts.sample_prompt(query, instrumental), mode="understand",
                                         fields=FIELDS, forced=forced, seed=seed, sampling=sampling.without_cfg(),
                                         constrained=constrained, phase="sample", progress=progress)
        parsed = parse_lm_output(text)
        lyrics = parsed.lyrics or (prompts.INSTRUMENTAL_LYRICS if instrumental else "")
        return parsed.metadata, lyrics, text, stats

    def understand(self, codes: Sequence[int], *, seed: int, temperature: float = 0.3, constrained: bool = True,
                   progress: Optional[ProgressFn] = None) -> tuple[dict[str, Any], str, str, PhaseStats]:
        """Audio codes -> (metadata, lyrics, raw text, stats) (upstream's understand mode: temperature 0.3)."""
        text, stats = self.metadata_pass(prompts.understand_prompt(format_audio_codes(list(codes))),
                                         mode="understand", fields=FIELDS, forced={}, seed=seed,
                                         sampling=SamplingParams(temperature=temperature), constrained=constrained,
                                         phase="understand", progress=progress)
        parsed = parse_lm_output(text)
        return parsed.metadata, parsed.lyrics, text, stats

    # --- a whole request ----------------------------------------------------------------------------------------
    def plan(self, request: GenerationRequest, seeds: Optional[Sequence[int]] = None,
             progress: Optional[ProgressFn] = None) -> LMPlan:
        r = request
        seeds = list(seeds) if seeds is not None else resolve_seeds(r)
        if len(seeds) != r.batch_size:
            raise ValueError(f"{len(seeds)} seeds for batch_size {r.batch_size}")
        steps = lm_steps(r)
        sampling = SamplingParams.from_request(r)
        constrained = r.constrained_decoding
        b = self.backend
        plan = LMPlan(metadata={}, lm_metadata={}, caption=r.prompt, lyrics=r.lyrics, lyrics_rewritten=False,
                      codes=[], seeds=seeds, model=b.model_name, backend=b.name, random_weights=b.random_weights,
                      dtype=b.dtype)
        known = user_metadata(r)
        user_duration = r.audio_duration  # seconds as given (known["duration"] is its int)
        lm_md: dict[str, Any] = {}
        caption, lyrics = r.prompt, r.lyrics
        skip_cot = False
        groups = [seeds] if r.allow_lm_batch else [[s] for s in seeds]
        tracker = PlanProgress(progress, self._planned(r, steps, known, len(groups))) if progress else None

        def step_progress(phase: str, budget: int) -> Optional[ProgressFn]:
            return tracker.phase(phase, budget) if tracker is not None else None

        if steps.sample:
            query = r.sample_query.strip() or prompts.NO_USER_INPUT
            instrumental = description_is_instrumental(query)
            language = r.vocal_language if r.vocal_language not in ("en", "unknown", "") else None
            md, text_lyrics, text, stats = self.create_sample(
                query, instrumental=instrumental, language=language, seed=seeds[0], sampling=sampling,
                constrained=constrained, progress=step_progress("sample", self.metadata_budget("understand")))
            md, caption, lyrics = self._take_rewrite(plan, md, text_lyrics, text, stats, known, lm_md, caption, lyrics)
            if "duration" in md:  # the sample's duration replaces the request's
                user_duration = None
            skip_cot = True  # upstream: use_cot_metas=False after sample mode
        if steps.format and (caption or lyrics):
            forced = dict(known)
            if r.vocal_language and r.vocal_language != "unknown":
                forced["language"] = r.vocal_language
            md, text_lyrics, text, stats = self.format_input(
                caption, lyrics, forced=forced, seed=seeds[0], sampling=sampling, constrained=constrained,
                progress=step_progress("format", self.metadata_budget("understand")))
            md, caption, lyrics = self._take_rewrite(plan, md, text_lyrics, text, stats, known, lm_md, caption, lyrics)
            skip_cot = skip_cot or "duration" in md
        cot_md = dict(known)  # what phase 2 is conditioned on
        cot_caption = None
        if steps.cot and not skip_cot and not has_all_metas(known):
            md, text, stats = self.cot(caption, lyrics, forced=known, use_cot_caption=r.use_cot_caption,
                                       use_cot_language=r.use_cot_language, seed=seeds[0], sampling=sampling,
                                       constrained=constrained, negative_prompt=r.lm_negative_prompt,
                                       progress=step_progress("cot", self.metadata_budget("cot")))
            plan.phases.append(stats)
            plan.lm_text = text
            md = self._valid(md, plan, exempt=known)
            lm_md.update(md)
            cot_md = {**{k: v for k, v in md.items() if k != "genres"}, **known}
            cot_caption = md.get("caption") if r.use_cot_caption else None
        elif tracker is not None:
            tracker.skip("cot")
        if self.demo_seconds is not None and user_duration is None:  # the length would be the LM's choice
            chosen = cot_md.get("duration", known.get("duration"))
            user_duration = self.demo_seconds
            known["duration"] = cot_md["duration"] = int(self.demo_seconds)
            plan.notes.append(f"random-weight LM: rendered the demo length {self.demo_seconds:g} s instead of the "
                              f"duration it chose ({chosen if chosen is not None else 'none'})")
        plan.lm_metadata = lm_md
        metadata = {**lm_md, **known}
        if user_duration is not None:
            metadata["duration"] = user_duration
        plan.caption = metadata["caption"] = cot_caption or caption
        plan.lyrics = lyrics
        plan.metadata = metadata

        if steps.codes:
            duration: Optional[float] = user_duration
            if duration is None and isinstance(known.get("duration"), int):  # from sample/format
                duration = known["duration"]
            if duration is None and self.enforce_lm_duration and isinstance(cot_md.get("duration"), int):
                duration = cot_md["duration"]
            target = target_codes(duration)
            budget = self.codes_budget(target, constrained)
            # allow_lm_batch=false decodes the items one after another (`groups`): the same codes (each item
            # draws from its own seed either way), a smaller peak memory, a longer wait.
            codes = []
            for n, group in enumerate(groups, 1):
                label = PHASE_LABELS["codes"] + (f", item {n}/{len(groups)}" if len(groups) > 1 else "")
                group_codes, cot_text, stats = self.codes(
                    caption, lyrics, cot_md, seeds=group, sampling=sampling, target=target if constrained else None,
                    constrained=constrained, negative_prompt=r.lm_negative_prompt,
                    progress=step_progress("codes", budget), max_new_tokens=budget, label=label)
                plan.phases.append(stats)
                codes.extend(group_codes)
            plan.codes = codes
            plan.cot_text = cot_text
            if target is not None and any(len(c) != target for c in codes):
                plan.notes.append(f"code counts {[len(c) for c in codes]} differ from the target {target}")
        plan.notes.extend(note for p in plan.phases for note in p.notes)  # e.g. a batch decoded in groups
        if plan.random_weights:
            plan.notes.append("the 5 Hz LM has random weights: its metadata and codes are noise")
        return plan

    def _planned(self, r: GenerationRequest, steps: LMSteps, known: dict[str, Any],
                 groups: int) -> list[tuple[str, int]]:
        """The steps plan() will run for `r`, in order, with their estimated token budgets (what an earlier step
        writes may skip phase 1 or change the codes' count: plan() corrects as it goes)."""
        planned = []
        if steps.sample:
            planned.append(("sample", self.metadata_budget("understand")))
        if steps.format and (steps.sample or r.prompt or r.lyrics):
            planned.append(("format", self.metadata_budget("understand")))
        if steps.cot and not steps.sample and not has_all_metas(known):
            planned.append(("cot", self.metadata_budget("cot")))
        if steps.codes:
            seconds = r.audio_duration or self.demo_seconds or DEFAULT_TEXT2MUSIC_SECONDS
            planned += [("codes", self.codes_budget(target_codes(seconds), r.constrained_decoding))] * groups
        return planned

    def _take_rewrite(self, plan: LMPlan, md: dict[str, Any], text_lyrics: str, text: str, stats: PhaseStats,
                      known: dict[str, Any], lm_md: dict[str, Any], caption: str,
                      lyrics: str) -> tuple[dict[str, Any], str, str]:
        """Record a sample/format step in the plan; returns its valid metadata and the caption and lyrics now."""
        plan.phases.append(stats)
        plan.lm_text = text
        md = self._valid(md, plan, exempt=known)
        lm_md.update(md)
        if text_lyrics:
            lyrics, plan.lyrics_rewritten = text_lyrics, True
        known.update({k: md[k] for k in USER_FIELDS if k in md})
        plan.written_caption, plan.written_lyrics = md.get("caption") or caption, lyrics
        return md, plan.written_caption, lyrics

    @staticmethod
    def _valid(md: dict[str, Any], plan: LMPlan, exempt: dict[str, Any]) -> dict[str, Any]:
        """Drop the LM's values out of range (only possible without constraints), with a note; values the user
        gave (exempt) are kept as they are."""
        out = dict(md)
        for field in ("bpm", "duration", "keyscale", "language", "timesignature"):
            if field in out and field not in exempt and metadata_problems({field: out[field]}):
                plan.notes.append(f"ignored the LM's {field} {out.pop(field)!r}: out of range")
        return out
