"""ACE-Step 1.5's 5 Hz LM planner: metadata, rewritten lyrics and audio codes for the DiT.

Modules (one job each; the torch-free ones are usable by any runtime, a future vLLM backend included):

    vocab.py        value sets (bpm, duration, key/scales, time signatures, languages) and LMVocab: the format's
                    token ids looked up in a tokenizer (never hard-coded)                              torch-free
    prompts.py      the prompts of every mode, as text (Qwen3 ChatML), and the phase-2 metadata block torch-free
    metadata.py     parsing LM output: metadata (no `</think>` needed), codes, lyrics; range checks    torch-free
    constraints.py  constrained decoding as per-sequence state machines (allowed()/advance())        torch-free
    masking.py      constraints -> logits masks in torch (shared by every torch runtime)
    sampling.py     CFG, repetition penalty, temperature, top-k, top-p, seeded draws
    transformers_backend.py  TransformersLM: load a LM folder, batched cond+uncond decode with a KV cache;
                    constraint_logits_processor() for model.generate()
    vllm_backend.py VllmLM: the same on stock vLLM (constraints and CFG pairs in a vLLM logits processor);
                    imports vLLM, so only engine.lm_bridge loads it, when ACESTEP_LM_BACKEND asks
    backend_choice.py  ACESTEP_LM_BACKEND (pt | vllm | auto) -> the runtime to load              torch-free
    planner.py      Planner: a GenerationRequest -> LMPlan (sample/format, phase 1, phase 2)      torch-free
    types.py        SamplingParams, DecodeResult, LMBackend (the runtime protocol), PhaseStats, LMPlan
    tiny.py         build_tiny_lm(): a random Qwen3 with the real token layout, offline, in seconds
    folders.py      resolve_lm_folder(), ensure_demo_lm()

Use:

    from engine.lm.transformers_backend import TransformersLM
    from engine.lm.planner import Planner, lm_steps

    lm = TransformersLM.load(path, device="cuda")          # once per worker
    planner = Planner(lm)
    if lm_steps(request).any:
        plan = planner.plan(request, seeds=engine.plan.resolve_seeds(request), progress=callback)
        plan.metadata, plan.caption, plan.lyrics, plan.codes, plan.audio_code_strings, plan.info()

Importing this package imports nothing heavy.
"""
