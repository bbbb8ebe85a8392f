"""The memory table, measured: full-size random-weight modules on CPU, one per child process, per dtype and quantisation.

    OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 .venv/bin/python bench/memory_table.py [--threads 2] [--only dit,vae]

Modules (published shapes: engine/published_configs.py, the LM sizes of /work/shared/reference/lm-notes.md 1.1):
  dit           the 2B turbo DiT's transformer; one diffusion step for a --dit-seconds song (batch 1, turbo: no CFG)
  dit-xl        the XL turbo DiT's transformer (4B), the same step; its encoders are dit_encoders' (the 2B widths)
  dit_encoders  the condition encoder and the audio (de)tokenizer that come with a DiT
  vae           the Oobleck VAE; an untiled decode of each of --vae-seconds (stock diffusers decode)
  text_encoder  Qwen3-Embedding-0.6B
  lm-0.6B, lm-1.7B, lm-4B   the 5 Hz LM (Qwen3ForCausalLM, vocabulary 217,204, tied head); its KV cache as the
                transformers backend allocates it and the fit check counts it (engine/lm/kv_budget.py: one song
                with CFG, 2 rows at the full context), filled by a 16-token prefill
Configurations: bfloat16, float32, and int8 through the engine's own code path (engine/quantize.py: built in bf16,
then quantised in place, as the engine does after loading) for the modules the engine quantises (DiT, LM).
float32 is recorded as skipped for the 4B LM and the XL DiT (~16 GiB of weights each).

Per run, in a fresh child (so each figure is its own): the RSS before building (Python, torch and its libraries
imported and warmed up), the resident weights (RSS delta once built, weights materialised, garbage collected),
the tensors' own bytes, and for the DiT and VAE the peak RSS during the step / decode (VmHWM reset just before)
minus the RSS with the module loaded: its working set. For int8 also the resident weights once glibc's
malloc_trim has handed back the heap the freed bf16 weights took (without it the process keeps up to 1 GiB more). Each child first estimates its peak from parameter counts,
skips (recorded with the reason) above --max-peak-gib, and waits (10 s polls, up to 5 min) until MemAvailable exceeds
that peak + 3 GiB: the machine is shared. Children run one at a time.

Writes bench/memory_measured.json (with each module's tensor layout, so tests/test_memory_table.py can put the fit
check's estimate, engine/memory.py, beside every measured figure) and prints the table. Random weights: only the
shapes and bytes matter here; nothing is generated that anyone should listen to.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from measure import GIB, ChildFailed, reset_peak, run_child, status_bytes, wait_for_memory  # noqa: E402
OUT = ROOT / "bench" / "memory_measured.json"
COMMAND = "OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 .venv/bin/python bench/memory_table.py --threads 2"
MODULES = ("dit", "dit-xl", "dit_encoders", "vae", "text_encoder", "lm-0.6B", "lm-1.7B", "lm-4B")
QUANTISED = ("dit", "dit-xl", "lm-0.6B", "lm-1.7B", "lm-4B")  # what engine/service.py and the LM loader quantise
DTYPES = ("bfloat16", "float32")
DITS = {"dit": "acestep-v15-turbo", "dit-xl": "acestep-v15-xl-turbo"}  # module -> the published name built
# The 5 Hz LM sizes (Qwen3 0.6B / 1.7B / 4B with the 217,204-token vocabulary, tied embeddings).
_LM_COMMON = dict(num_key_value_heads=8, head_dim=128, vocab_size=217204, max_position_embeddings=40960,
                  rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
LM_SHAPES = {
    "lm-0.6B": dict(_LM_COMMON, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16),
    "lm-1.7B": dict(_LM_COMMON, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16),
    "lm-4B": dict(_LM_COMMON, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32),
}
# Where each component's file lies in a model folder (engine/memory.weight_bytes reads the folder's headers).
FILES = {"transformer": "transformer/diffusion_pytorch_model.safetensors",
         "condition_encoder": "condition_encoder/diffusion_pytorch_model.safetensors",
         "audio_tokenizer": "audio_tokenizer/diffusion_pytorch_model.safetensors",
         "audio_token_detokenizer": "audio_token_detokenizer/diffusion_pytorch_model.safetensors",
         "vae": "vae/diffusion_pytorch_model.safetensors",
         "text_encoder": "text_encoder/model.safetensors",
         "lm": "model.safetensors"}
ALWAYS_SKIPPED = [
    {"module": "dit-xl", "dtype": "float32", "quantize": "none",
     "reason": "float32 XL DiT: ~15.5 GiB of weights, over what a shared 24 GB machine may give one benchmark"},
    {"module": "lm-4B", "dtype": "float32", "quantize": "none",
     "reason": "float32 4B LM: ~16 GiB of weights, over what a shared 24 GB machine may give one benchmark"},
]


# ---------------------------------------------------------------- building (child)

def build(module: str):
    """The module(s) of `module`, in torch's current default dtype: {component: nn.Module}."""
    from engine import published_configs as pc

    if module in DITS:
        from engine.weights.random_pipeline import build_transformer

        return {"transformer": build_transformer(DITS[module], size="full")}
    if module == "dit_encoders":
        from diffusers.pipelines.ace_step.modeling_ace_step import (
            AceStepAudioTokenDetokenizer, AceStepAudioTokenizer, AceStepConditionEncoder)

        return {"condition_encoder": AceStepConditionEncoder(**pc.CONDITION_ENCODER),
                "audio_tokenizer": AceStepAudioTokenizer(**pc.AUDIO_TOKENIZER),
                "audio_token_detokenizer": AceStepAudioTokenDetokenizer(**pc.AUDIO_DETOKENIZER)}
    if module == "vae":
        from diffusers import AutoencoderOobleck

        return {"vae": AutoencoderOobleck(**pc.VAE)}
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

    if module == "text_encoder":
        return {"text_encoder": Qwen3Model(Qwen3Config(**pc.TEXT_ENCODER))}
    config = Qwen3Config(**LM_SHAPES[module], bos_token_id=0, pad_token_id=0, eos_token_id=1)
    return {"lm": Qwen3ForCausalLM(config)}


def parameter_count(module: str) -> int:
    import torch

    with torch.device("meta"):
        parts = build(module)
    return sum(t.numel() for m in parts.values() for t in unique_tensors(m).values())


def unique_tensors(m) -> dict:
    """What a safetensors file of `m` holds: its state dict, each shared tensor (a tied LM head) once."""
    seen: set = set()
    out = {}
    for key, tensor in m.state_dict(keep_vars=True).items():
        ident = id(tensor)
        if ident not in seen:
            seen.add(ident)
            out[key] = tensor
    return out


def layout(parts: dict) -> dict:
    """Each component's tensors, grouped by name pattern (layer indices as N), shape and kind: compact, and enough
    for engine/memory.py's rule (which reads names and shapes)."""
    groups: dict = {}
    for component, m in parts.items():
        counts: dict = {}
        for key, tensor in unique_tensors(m).items():
            code = "BF16" if tensor.is_floating_point() else {8: "I64", 4: "I32", 2: "I16", 1: "I8"}[tensor.element_size()]
            entry = (re.sub(r"\.\d+\.", ".N.", key), tuple(tensor.shape), code)
            counts[entry] = counts.get(entry, 0) + 1
        groups[component] = [[name, list(shape), code, n] for (name, shape, code), n in sorted(counts.items())]
    return groups


def working_set_guess(module: str, dtype_bytes: int, args) -> int:
    """Rough upper bound of a step's / decode's working set (only to decide waiting and skipping)."""
    if module == "vae":
        from engine.memory import vae_decode_bytes

        return int(1.3 * vae_decode_bytes(1, max(args.vae_seconds), 128, dtype_bytes))
    if module in DITS:
        return 2 * GIB if dtype_bytes == 4 else GIB
    if module in LM_SHAPES:
        from engine.lm.kv_budget import fit_cache_bytes

        return int(1.2 * fit_cache_bytes(LM_SHAPES[module], dtype_bytes))
    return 0


def child(module: str, dtype_name: str, quantize_mode: str, args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, dtype_name)
    build_dtype = torch.bfloat16 if quantize_mode != "none" else dtype
    params = parameter_count(module)
    expected = int(params * (2 if build_dtype == torch.bfloat16 else 4) * 1.05
                   + working_set_guess(module, 4 if dtype == torch.float32 else 2, args) + 0.8 * GIB)
    row: dict = {"module": module, "dtype": dtype_name, "quantize": quantize_mode, "parameters": params,
                 "expected_peak_bytes": expected}
    if expected > args.max_peak_gib * GIB:
        return dict(row, status="skipped", reason=f"expected peak {expected / GIB:.1f} GiB > {args.max_peak_gib} GiB")
    ok, free = wait_for_memory(expected + 3 * GIB)
    if not ok:
        return dict(row, status="skipped", reason=f"MemAvailable {free / GIB:.1f} GiB < expected peak "
                                                  f"{expected / GIB:.1f} + 3 GiB after 5 min")
    # the runtime warmed up before the baseline: a matmul and a conv in this dtype load oneDNN's kernels
    with torch.inference_mode():
        a = torch.randn(64, 64, dtype=dtype)
        (a @ a).sum()
        torch.nn.functional.conv1d(a[None], a[:, :, None]).sum()
    del a
    gc.collect()
    base = status_bytes("VmRSS")
    reset_peak()
    t0 = time.perf_counter()
    torch.set_default_dtype(build_dtype)  # built in its dtype: never a float32 copy first
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        parts = build(module)
    torch.set_default_dtype(torch.float32)
    for m in parts.values():
        m.eval().requires_grad_(False)
    row["layout"] = layout(parts)
    if quantize_mode != "none":
        from engine import quantize

        for m in parts.values():
            skip = quantize.tied_output_head(m) if module.startswith("lm-") else []
            row["quantised_layers"] = row.get("quantised_layers", 0) + quantize.quantize_module(m, quantize_mode, skip)
    gc.collect()
    from engine.quantize import storage_bytes

    loaded = status_bytes("VmRSS")
    row.update(status="measured", base_rss_bytes=base, weights_rss_bytes=loaded - base,
               tensor_bytes=sum(storage_bytes(m) for m in parts.values()),
               load_peak_bytes=status_bytes("VmHWM") - base, build_s=round(time.perf_counter() - t0, 1),
               rss_file_bytes=status_bytes("RssFile"))
    if quantize_mode != "none":  # quantize_module itself hands the freed bf16 heap back (malloc_trim)
        row["weights_rss_trimmed_bytes"] = loaded - base
    if module in DITS:
        row["steps"] = [dit_step(parts["transformer"], dtype, args.dit_seconds, loaded)]
    elif module == "vae":
        row["steps"] = [vae_decode(parts["vae"], dtype, s, loaded) for s in args.vae_seconds]
    elif module in LM_SHAPES:
        row["steps"] = [lm_kv_cache(parts["lm"], module, loaded)]
    row["peak_rss_bytes"] = max([row["load_peak_bytes"] + base] + [s["peak_rss_bytes"] for s in row.get("steps", [])])
    return row


def dit_step(model, dtype, seconds: float, loaded: int) -> dict:
    """One diffusion step: a transformer forward, batch 1 (turbo: no CFG), 25 latent frames per second."""
    import torch

    cfg = model.config
    frames = int(seconds * 25)
    gen = torch.Generator().manual_seed(0)
    acoustic = int(cfg.audio_acoustic_hidden_dim)
    inputs = dict(
        hidden_states=torch.randn(1, frames, acoustic, generator=gen).to(dtype),
        context_latents=torch.randn(1, frames, int(cfg.in_channels) - acoustic, generator=gen).to(dtype),
        encoder_hidden_states=torch.randn(1, 256, int(cfg.encoder_hidden_size or cfg.hidden_size),  # XL: 2048 wide
                                          generator=gen).to(dtype),
        timestep=torch.tensor([0.5]).to(dtype), timestep_r=torch.tensor([0.5]).to(dtype), return_dict=False)
    return _peak_of(lambda: model(**inputs)[0], "dit step", seconds, loaded)


def vae_decode(vae, dtype, seconds: float, loaded: int) -> dict:
    import torch

    with torch.inference_mode():
        vae.decode(torch.randn(1, int(vae.config.decoder_input_channels), 8, dtype=dtype))  # first-call set-up
    z = torch.randn(1, int(vae.config.decoder_input_channels), int(seconds * 25), dtype=dtype)
    return _peak_of(lambda: vae.decode(z).sample, "vae decode", seconds, loaded)


def lm_kv_cache(model, module: str, loaded: int, prompt: int = 16) -> dict:
    """The KV cache the fit check counts for the transformers LM, allocated as a decode allocates it:
    transformers' StaticCache at the length kv_budget.cache_tokens gives for a decode that may reach the full
    context, rows for one song with CFG, filled by a prefill of `prompt` tokens. Its working set is the cache plus
    that prefill's activations."""
    import torch
    from transformers import StaticCache

    from engine.lm import kv_budget
    from engine.lm.transformers_backend import use_filled_sdpa

    # as the engine's decode: attention over the cache's filled part only, the decoder without the output head
    # (the engine computes the head itself, engine/lm/output_head.py; Qwen3ForCausalLM's own head on a [rows, 1,
    # hidden] slice copies the transposed 217k x hidden tied weight: +0.83 GiB and ~14 s at 0.6B on this CPU)
    extra = {"acestep_filled": prompt} if use_filled_sdpa(model) else {}
    decoder = model.get_decoder()
    rows = kv_budget.cache_rows(kv_budget.FIT_ITEMS, cfg=True)
    tokens = kv_budget.cache_tokens(prompt, kv_budget.LM_MAX_CONTEXT - prompt)
    ids = torch.arange(2, 2 + prompt).repeat(rows, 1)
    held = {}

    def prefill():
        cache = StaticCache(config=model.config, max_cache_len=tokens)
        out = decoder(input_ids=ids, cache=cache, use_cache=True, **extra).last_hidden_state
        held["bytes"] = sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values))
        return cache, out

    step = _peak_of(prefill, "lm kv cache", None, loaded)
    config = {k: LM_SHAPES[module][k] for k in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                                "head_dim", "hidden_size")}
    return dict(step, rows=rows, tokens=tokens, cache_tensor_bytes=held["bytes"], config=config)


def _peak_of(fn, what: str, seconds: float | None, loaded: int) -> dict:
    import torch

    gc.collect()
    before = status_bytes("VmRSS")
    reset_peak()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = fn()
    wall = time.perf_counter() - t0
    peak = status_bytes("VmHWM")
    del out
    gc.collect()
    return {"what": what, "seconds": seconds, "wall_s": round(wall, 2), "peak_rss_bytes": peak,
            "working_set_bytes": peak - before, "over_loaded_bytes": peak - loaded}


# ---------------------------------------------------------------- parent

def jobs(only: list[str]) -> list[tuple[str, str, str]]:
    out = []
    for module in MODULES:
        for dtype in DTYPES:
            if (module, dtype) in (("lm-4B", "float32"), ("dit-xl", "float32")):
                continue  # ALWAYS_SKIPPED
            out.append((module, dtype, "none"))
        if module in QUANTISED:
            out.append((module, "bfloat16", "int8"))
    # --only: modules, or single runs as module:dtype:quantize
    return [job for job in out if not only or job[0] in only or ":".join(job) in only]


def table(rows: list[dict]) -> str:
    lines = ["| module | dtype | quantised | weights resident GiB | tensors GiB | peak over loaded GiB (step) "
             "| peak RSS GiB |", "|---|---|---|---:|---:|---|---:|"]
    for r in rows:
        if r["status"] != "measured":
            lines.append(f"| {r['module']} | {r['dtype']} | {r['quantize']} | skipped: {r['reason']} | | | |")
            continue
        steps = "; ".join(f"{s['over_loaded_bytes'] / GIB:.2f} ({s['what']} {_step_size(s)}, {s['wall_s']} s)"
                          for s in r.get("steps", [])) or "-"
        lines.append(f"| {r['module']} | {r['dtype']} | {r['quantize']} | {r['weights_rss_bytes'] / GIB:.2f} "
                     f"| {r['tensor_bytes'] / GIB:.2f} | {steps} | {r['peak_rss_bytes'] / GIB:.2f} |")
    return "\n".join(lines)


def _step_size(step: dict) -> str:
    return f"{step['seconds']:g} s" if step.get("seconds") is not None else f"{step['rows']} x {step['tokens']} tokens"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", default="", help="comma-separated modules or module:dtype:quantize runs (default: all)")
    p.add_argument("--dit-seconds", type=float, default=10.0)
    p.add_argument("--vae-seconds", type=float, nargs="+", default=[10.0, 30.0])
    p.add_argument("--max-peak-gib", type=float, default=12.0, help="skip a run whose expected peak is above")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--child", nargs=3, metavar=("MODULE", "DTYPE", "QUANTIZE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child, args)), flush=True)
        return
    env = dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
               OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1")
    rows: list[dict] = []
    passthrough = ["--threads", str(args.threads), "--dit-seconds", str(args.dit_seconds),
                   "--max-peak-gib", str(args.max_peak_gib), "--vae-seconds", *map(str, args.vae_seconds)]
    for module, dtype, mode in jobs([m for m in args.only.split(",") if m]):
        print(f"{module} {dtype} {mode} ...", file=sys.stderr, flush=True)
        try:
            row = run_child([__file__, *passthrough, "--child", module, dtype, mode], env=env, cwd=str(ROOT),
                            show_stderr=True)
        except ChildFailed as failed:
            row = {"module": module, "dtype": dtype, "quantize": mode, "status": "failed", "reason": str(failed)}
        rows.append(row)
        print(f"  {row['status']}: " + (f"weights {row['weights_rss_bytes'] / GIB:.2f} GiB, peak "
                                        f"{row['peak_rss_bytes'] / GIB:.2f} GiB" if row["status"] == "measured"
                                        else row["reason"]), file=sys.stderr, flush=True)
    import torch

    rows += [dict(s, status="skipped") for s in ALWAYS_SKIPPED]
    layouts = {r["module"]: r.pop("layout") for r in rows if "layout" in r}
    report = {"command": COMMAND, "random_weights": True, "device": "cpu",
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                         f"{args.threads} threads, OMP_WAIT_POLICY={env['OMP_WAIT_POLICY']}",
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "rows": rows, "layouts": layouts}
    if args.only and args.out.exists():  # a partial run updates its modules' rows, keeps the others
        old = json.loads(args.out.read_text())
        done = {(r["module"], r["dtype"], r["quantize"]) for r in rows}
        ran = {r["module"] for r in rows if r["status"] == "measured"}  # an old skip of a module now run is stale
        report["rows"] = [r for r in old["rows"] if (r["module"], r["dtype"], r["quantize"]) not in done
                          and not (r["status"] == "skipped" and r["module"] in ran)] + rows
        report["layouts"] = dict(old.get("layouts", {}), **layouts)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(table(report["rows"]))


if __name__ == "__main__":
    main()
