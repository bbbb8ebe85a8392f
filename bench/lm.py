"""The 5 Hz LM's codes phase: tokens per second and the time to plan a song, transformers vs vLLM, batch 1 vs 8.

Runs both backends on one tiny random LM with the published token layout (65,535 code tokens, so the LM head
and the sampler see the real vocabulary size; the network itself is tiny). Each row plans one song of
--seconds per sequence (5 codes per second) with CFG on (--cfg), the constraint on, top-p 0.9, and reports
decode tokens per second per sequence and in aggregate, the share of decode time spent in the constraint
(allowed/advance and masking, both backends), and for vLLM the share spent in its logits processor as a whole
(constraint, CFG guidance and the pair's draw, which vLLM's own sampler cannot do for a pair).
Side by side in one run, so the ratios between rows are the figures to read; absolute speed on a 2-core CPU
says nothing about a GPU.

vLLM needs its venv (`make vllm-venv`, which also has transformers):

    HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=1 .venv-vllm/bin/python bench/lm.py [--seconds 240] [--threads 1]
    .venv/bin/python bench/lm.py --backends pt          # transformers only

Full size (the 1.7B LM's real shape, random weights; transformers, float32 vs bf16, output head trimmed or not):

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/lm.py --full-size [--steps 24] [--threads 2]

The decode step alone (bf16, trimmed head) under KV cache / compile variants, interleaved, with a profile:

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/lm.py --full-size --variants dynamic static static+compile [--context 1200] [--profile]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def load(backend: str, path: Path):
    if backend == "vllm":
        from engine.lm.vllm_backend import VllmLM

        return VllmLM.load(path, max_model_len=4096, max_num_seqs=32, enforce_eager=True, dtype="float32")
    from engine.lm.transformers_backend import TransformersLM

    return TransformersLM.load(path, device="cpu")


def song_metadata(seconds: float) -> dict:
    return {"bpm": 120, "caption": "lofi piano", "duration": int(seconds), "keyscale": "C major", "language": "en",
            "timesignature": 4}


def measure_codes(planner, *, seconds: float, sampling, batch: int = 1, warmup: bool = True):
    """One codes phase planning `batch` songs of `seconds` (5 codes a second, constraint on) after a 20-code
    warm-up; asserts every sequence got its codes and returns the phase's PhaseStats."""
    target = int(round(seconds * 5))
    metadata = song_metadata(seconds)
    if warmup:
        planner.codes("warm up", "", metadata, seeds=[0], sampling=sampling, target=20)
    codes, _, stats = planner.codes("lofi piano", "[verse] la la", metadata, seeds=list(range(batch)),
                                    sampling=sampling, target=target)
    assert all(len(c) == target for c in codes)
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=240.0, help="song length to plan (codes = 5 x seconds)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (transformers)")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--backends", default="pt,vllm")
    parser.add_argument("--cfg", type=float, default=2.5, help="lm_cfg_scale (1 = no guidance)")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    import torch

    from engine.lm.planner import Planner
    from engine.lm.tiny import build_tiny_lm
    from engine.lm.types import SamplingParams

    torch.set_num_threads(args.threads)
    target = int(round(args.seconds * 5))
    sampling = SamplingParams(temperature=0.85, cfg_scale=args.cfg, top_k=None, top_p=0.9, repetition_penalty=1.0)
    versions = [f"torch {torch.__version__}"]
    rows: dict[tuple[str, int], float] = {}
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_lm(Path(tmp) / "tiny-lm", seed=0)
        for backend in args.backends.split(","):
            lm = load(backend, path)
            if backend == "vllm":
                import vllm

                versions.append(f"vllm {vllm.__version__} ({lm.runner.upper()} model runner)")
            planner = Planner(lm)
            host = None
            if backend == "vllm":
                from engine.lm.vllm_backend import HOST as host
            for batch in (int(b) for b in args.batches.split(",")):
                stats = measure_codes(planner, seconds=args.seconds, sampling=sampling, batch=batch,
                                      warmup=batch == int(args.batches.split(",")[0]))
                aggregate = sum(stats.generated_tokens) / stats.decode_s
                rows[(backend, batch)] = aggregate
                processor = f"{100 * host.seconds / stats.decode_s:.1f}%" if host is not None else ""
                lines.append(f"| {backend} | {batch} | {stats.seconds:.1f} | {aggregate / batch:.0f} | {aggregate:.0f} | "
                             f"{100 * stats.constraint_s / stats.decode_s:.1f}% | {processor} |")
            del planner, lm
    print(f"5 Hz LM codes phase, tiny random LM (65,535 code tokens), CPU, {args.threads} torch thread(s), "
          f"Python {platform.python_version()}, {', '.join(versions)}; {target} codes per song, CFG {args.cfg}")
    print()
    print("| backend | batch | song s (wall) | tokens/s per sequence | tokens/s aggregate | "
          "constraint share of decode | vLLM processor share |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print("\n".join(lines))
    print()
    batches = sorted({b for _, b in rows})
    for backend in args.backends.split(","):
        if len(batches) > 1:
            first, last = batches[0], batches[-1]
            print(f"{backend}: aggregate tokens/s, batch {last} / batch {first}: "
                  f"{rows[(backend, last)] / rows[(backend, first)]:.2f}x")
    if {"pt", "vllm"} <= {b for b, _ in rows}:
        for batch in batches:
            print(f"batch {batch}: vLLM / transformers aggregate tokens/s: "
                  f"{rows[('vllm', batch)] / rows[('pt', batch)]:.2f}x")


# The published acestep-5Hz-lm-1.7B's shape (Qwen3-1.7B with the 217,204-token vocabulary, tied embeddings).
LM_1_7B = dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
               num_key_value_heads=8, head_dim=128, vocab_size=217204, max_position_embeddings=40960,
               rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)


def full_lm_model(tokenizer, *, seed: int = 0, device: str = "cpu", dtype=None):
    """A random Qwen3ForCausalLM in the 1.7B LM's shape for `tokenizer` (the tiny LM's), built on `device` in
    `dtype` (None: torch's default, float32)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    ids = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    config = Qwen3Config(**LM_1_7B, bos_token_id=ids[0], pad_token_id=ids[0], eos_token_id=ids[1])
    default = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        torch.set_default_dtype(dtype or default)
        try:
            return Qwen3ForCausalLM(config).eval()
        finally:
            torch.set_default_dtype(default)


def save_full_lm(path: Path, *, seed: int = 0, device: str = "cpu") -> Path:
    """A 5 Hz LM folder (published layout, random-weight marker) holding the 1.7B shape in bf16, loadable by both
    backends: the tiny LM's folder (tokenizer, marker) with its model replaced by full_lm_model's."""
    import torch

    from engine.lm.tiny import build_tiny_lm, build_tokenizer

    path = Path(path)
    if (path / "model.safetensors").exists() and (path / "full-size").exists():
        return path
    build_tiny_lm(path, seed=seed, notice="random weights in the 1.7B LM's shape: its codes are noise")
    # built in bf16 directly: a float32 build then a cast peaks at 10.4 GiB, this at 3.5
    model = full_lm_model(build_tokenizer(seed=seed), seed=seed, device=device, dtype=torch.bfloat16)
    model.save_pretrained(path)
    (path / "full-size").write_text("acestep-5Hz-lm-1.7B shape\n")
    del model
    return path


def full_size(args) -> None:
    """Codes-phase decode steps of the 1.7B LM in its real shape (random weights), CFG (2 rows), float32 vs
    bf16 x the model's own head / the blocked head / the trimmed head, side by side; same tokens asserted.

    The tokenizer is the tiny LM's (65,535 code tokens after a ~1k base vocabulary), the model's head is
    217,204 wide as published: a codes step may sample from the same 64,001 of 217,204 logits as on the real
    LM (at other ids), so the head's work and the trim's share are the real ones. One model in memory at a
    time (float32 1.7B: 6.9 GiB, converted to bf16 in place after its rows).
    """
    import resource
    import time

    import torch

    from engine.lm.planner import Planner
    from engine.lm.tiny import build_tokenizer
    from engine.lm.transformers_backend import TransformersLM
    from engine.lm.types import SamplingParams

    torch.set_num_threads(args.threads)
    tokenizer = build_tokenizer()
    t0 = time.perf_counter()
    model = full_lm_model(tokenizer)
    build_s = time.perf_counter() - t0
    sampling = SamplingParams(temperature=0.85, cfg_scale=args.cfg, top_p=0.9)
    metadata = {"bpm": 120, "caption": "lofi piano", "duration": 30, "keyscale": "C major", "language": "en",
                "timesignature": 4}
    target = args.steps
    lines, rates = [], {}
    for dtype in ("float32", "bfloat16"):
        model.to(getattr(torch, dtype))
        lm = TransformersLM(model, tokenizer, model_name="acestep-5Hz-lm-1.7B (random weights)",
                            random_weights=True)
        planner = Planner(lm)
        whole_head = lm.head
        tokens = {}
        for mode in ("model head", "blocked head", "trimmed head"):
            lm.head = None if mode == "model head" else whole_head
            lm.trim_head = mode == "trimmed head"
            lm._decoder = model.get_decoder() if lm.head is not None else None
            planner.codes("warm up", "", metadata, seeds=[0], sampling=sampling, target=4)
            codes, _, stats = planner.codes("lofi piano", "[verse] la la", metadata, seeds=[7], sampling=sampling,
                                            target=target)
            assert len(codes[0]) == target
            tokens[mode] = codes[0]
            rate = target / stats.decode_s
            rates[(dtype, mode)] = rate
            lines.append(f"| {dtype} | {mode} | {target} | {1000 * stats.decode_s / stats.steps:.0f} | {rate:.2f} |")
            print(lines[-1], flush=True)
        assert tokens["trimmed head"] == tokens["blocked head"], "the trim changed the tokens"
        same = tokens["model head"] == tokens["blocked head"]
        lines.append(f"| {dtype} | tokens: trimmed == blocked: yes; == model head: {'yes' if same else 'no'} | | | |")
        del planner, lm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)
    print(f"\n5 Hz LM 1.7B (published Qwen3 shape, vocab 217,204, random weights, built in {build_s:.0f} s), CPU, "
          f"{args.threads} torch thread(s), torch {torch.__version__}; codes phase, CFG {args.cfg} (2 rows), "
          f"top-p 0.9, {target} codes after a 4-code warm-up per row; peak RSS {peak:.1f} GiB\n")
    print("| dtype | head | codes | ms per step | tokens/s |")
    print("|---|---|---:|---:|---:|")
    print("\n".join(lines))
    for dtype in ("float32", "bfloat16"):
        print(f"{dtype}: trimmed / model head {rates[(dtype, 'trimmed head')] / rates[(dtype, 'model head')]:.2f}x")
    print(f"bf16 trimmed / float32 model head: "
          f"{rates[('bfloat16', 'trimmed head')] / rates[('float32', 'model head')]:.2f}x")


def decode_variants(args) -> None:
    """The 1.7B LM's codes-phase decode step (bf16, CFG, trimmed head) under each --variants entry, interleaved
    over --rounds: wall and CPU ms per step (after the prefill), the share of the step in the network's forward
    (the rest: guidance, constraint, sampling), the load average; same tokens asserted for greedy runs.

    Variants: "dynamic" (transformers' DynamicCache, the previous path), "static" (StaticCache, the default),
    "static+compile" (the decoder under torch.compile, its cold compile timed), "static+int8dyn" (torchao's int8
    dynamic-activation int8-weight linears in the decoder; quantises in place, so list it last, without
    static+compile). --context N starts the decode N
    tokens later (a 240 s song's last codes: ~1,200). --profile adds torch.profiler's top operators for one
    decode under the first variant.
    """
    import resource
    import time

    import torch

    from bench.measure import cpu_with_children, loadavg
    from engine.lm import prompts
    from engine.lm.constraints import CodesConstraint
    from engine.lm.tiny import build_tokenizer
    from engine.lm.transformers_backend import TransformersLM
    from engine.lm.types import SamplingParams

    torch.set_num_threads(args.threads)
    tokenizer = build_tokenizer()
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16: no float32 copy at 6.9 GiB
    try:
        model = full_lm_model(tokenizer)
    finally:
        torch.set_default_dtype(default)
    lm = TransformersLM(model, tokenizer, model_name="acestep-5Hz-lm-1.7B (random weights)", random_weights=True)
    decoder = lm._decoder
    cot = prompts.cot_text({"bpm": 120, "caption": "lofi piano", "duration": 30, "keyscale": "C major",
                            "language": "en", "timesignature": 4})
    prompt = lm.encode(prompts.codes_prompt("lofi piano", "[verse] la la", cot))
    uncond = lm.encode(prompts.codes_unconditional_prompt("lofi piano", "[verse] la la", None))
    if args.context:  # a late step of a long song: --context more tokens already in the cache
        filler = (lm.encode(" la") * args.context)[:args.context]
        prompt, uncond = filler + prompt, filler + uncond
    forward_s = [0.0]
    inner = lm._forward

    def timed_forward(*a, **kw):
        t0 = time.perf_counter()
        try:
            return inner(*a, **kw)
        finally:
            forward_s[0] += time.perf_counter() - t0
    lm._forward = timed_forward

    def decode(steps: int, temperature: float, logits: list | None = None):
        marks: dict[int, tuple[float, float, float]] = {}

        def on_step(step: int) -> None:
            if step == 1:
                marks[1] = (time.perf_counter(), time.process_time(), forward_s[0])
        sampling = SamplingParams(temperature=temperature, cfg_scale=args.cfg, top_p=0.9)
        hook = None if logits is None else (lambda step, guided: logits.append(guided[0]))
        result = lm.generate([prompt], seeds=[7], sampling=sampling, max_new_tokens=steps + 1,
                             uncond_prompts=[uncond], constraints=[CodesConstraint(lm.tables, steps)],
                             stop_ids=[lm.vocab.eos_id], on_step=on_step, logits_hook=hook)
        wall, cpu, fwd = time.perf_counter(), time.process_time(), forward_s[0]
        n = result.steps - 1  # the steps after the first (whose forward is the prefill)
        return (result.tokens[0], 1000 * (wall - marks[1][0]) / n, 1000 * (cpu - marks[1][1]) / n,
                (fwd - marks[1][2]) / (wall - marks[1][0]))

    compiled: list = []
    quantised: list = []

    def configure(variant: str) -> str:
        lm.kv_cache = "dynamic" if variant == "dynamic" else "static"
        lm._decoder = decoder
        note = ""
        if variant == "static+int8dyn":  # last: quantises the decoder's linears in place (the head stays bf16)
            if not quantised:
                from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

                t0 = time.perf_counter()
                quantize_(decoder, Int8DynamicActivationInt8WeightConfig())
                quantised.append(True)
                note = f"torchao int8 dynamic-activation, quantised in {time.perf_counter() - t0:.0f} s"
            return note
        if variant == "static+compile":
            if compiled:
                lm._decoder = compiled[0]
                return note
            t0, c0 = time.perf_counter(), cpu_with_children()
            lm._decoder = torch.compile(decoder)
            compiled.append(lm._decoder)
            decode(3, 0.0)
            note = f"cold compile + 3 steps: {time.perf_counter() - t0:.0f} s wall, {cpu_with_children() - c0:.0f} CPU-s"
        return note

    notes, rows, greedy, agree = {}, [], {}, {}
    first = args.variants[0]
    for variant in args.variants:
        notes[variant] = configure(variant)
        decode(2, 0.0)  # warm-up
        logits: list = []
        greedy[variant] = (decode(args.greedy_steps, 0.0, logits)[0], logits)
        # greedy against the first variant: leading tokens in common, and the guided logits' largest difference
        # over the steps whose inputs were still the same (bf16: attention over another key length rounds
        # differently; a random LM's near-ties then flip a greedy choice)
        (ref, ref_logits), (mine, mine_logits) = greedy[first], greedy[variant]
        same = next((i for i, (a, b) in enumerate(zip(ref, mine)) if a != b), len(ref))
        live = [torch.isfinite(a) for a in ref_logits[:same + 1]]
        diff = max(float((a[m] - b[m]).abs().max()) for a, b, m in zip(ref_logits, mine_logits, live))
        spread = float(ref_logits[0][live[0]].std())
        agree[variant] = f"greedy: {same}/{len(ref)} tokens as {first}, logits max diff {diff:.3f} (std {spread:.2f})"
        print(f"{variant}: ready {notes[variant]}; {agree[variant]} (load {loadavg()})", flush=True)
    for rnd in range(args.rounds):
        for variant in args.variants:
            configure(variant)
            tokens, wall_ms, cpu_ms, fwd_share = decode(args.steps, 0.85)
            rows.append((rnd, variant, wall_ms, cpu_ms, fwd_share, loadavg()))
            print(f"| {rnd} | {variant} | {wall_ms:.0f} | {cpu_ms:.0f} | {100 * fwd_share:.0f}% | {rows[-1][5]} |",
                  flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)
    print(f"\n5 Hz LM 1.7B (published shape, random weights), bf16, CFG {args.cfg} (2 rows), trimmed head, top-p 0.9, "
          f"{args.steps} codes per row, {args.threads} torch thread(s), torch {torch.__version__}; "
          f"{args.rounds} rounds; peak RSS {peak:.1f} GiB\n")
    print("| variant | median wall ms/step | median CPU ms/step | forward share | against the first | note |")
    print("|---|---:|---:|---:|---|---|")
    import statistics
    for variant in args.variants:
        mine = [r for r in rows if r[1] == variant]
        print(f"| {variant} | {statistics.median(r[2] for r in mine):.0f} | "
              f"{statistics.median(r[3] for r in mine):.0f} | {100 * statistics.median(r[4] for r in mine):.0f}% | "
              f"{agree[variant]} | {notes[variant]} |")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        configure(first)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            decode(args.steps, 0.85)
        print(f"\nprofile, {first}, {args.steps} steps (load {loadavg()}):")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    if "--full-size" in sys.argv and "--variants" in sys.argv:
        parser = argparse.ArgumentParser(description=decode_variants.__doc__.splitlines()[0])
        parser.add_argument("--full-size", action="store_true")
        parser.add_argument("--variants", nargs="+", default=["dynamic", "static"],
                            choices=["dynamic", "static", "static+compile", "static+int8dyn"])
        parser.add_argument("--steps", type=int, default=24, help="codes per timed decode")
        parser.add_argument("--greedy-steps", type=int, default=8, help="greedy codes compared across variants")
        parser.add_argument("--rounds", type=int, default=2)
        parser.add_argument("--threads", type=int, default=2)
        parser.add_argument("--cfg", type=float, default=2.0)
        parser.add_argument("--profile", action="store_true")
        parser.add_argument("--context", type=int, default=0,
                            help="tokens added before the prompt: the cache of a step this far into a song")
        decode_variants(parser.parse_args())
    elif "--full-size" in sys.argv:
        parser = argparse.ArgumentParser(description=full_size.__doc__.splitlines()[0])
        parser.add_argument("--full-size", action="store_true")
        parser.add_argument("--steps", type=int, default=24, help="codes per configuration")
        parser.add_argument("--threads", type=int, default=2)
        parser.add_argument("--cfg", type=float, default=2.0)
        full_size(parser.parse_args())
    else:
        main()
