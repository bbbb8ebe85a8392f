"""Whole songs on CPU, the engine as a worker runs it: float32 vs bf16 vs bf16 + int8 DiT, per-stage wall and CPU-s.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/song_cpu.py             # full size, 10 s and 30 s songs
    .venv/bin/python bench/song_cpu.py --tiny                               # the same path on tiny models
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/song_cpu.py --durations 10 --snr --vae-check   # + SNR, decode check

A row is one request with the API's default batch_size (2: seeds 7 and 8), so two songs: the DiT and the VAE decode
run both (the row's `batch`). --snr keeps the first song as float WAV and gives int8's SNR against bf16 and bf16's
against float32; --vae-check decodes the song's latent again (alone, in the progress hooks, a random latent), and
every row says which Snake the decode ran (engine/vae_fast.snake_in_use).

One child process per row (configuration x song length), so every figure is its own: the child loads the engine
the way a worker does (EngineConfig.from_env + Engine.load: fit check, dtype choice, quantisation, the CPU VAE
decode's compile at load), runs the engine's own warm-up (ACESTEP_WARMUP=true does the same), then one
text2music song at the turbo model's default steps through Engine.generate (audio encoded, as a worker stores it).
Configurations (environment the worker reads):
  float32    ACESTEP_DTYPE=float32
  bf16       ACESTEP_DTYPE=bfloat16          (what ACESTEP_DTYPE=auto picks on CPUs with AMX / AVX512-BF16)
  bf16+int8  ACESTEP_DTYPE=bfloat16 ACESTEP_QUANTIZE_DIT=int8   (torchao weight-only int8 DiT)
Per stage (text encoder = text + condition encoders, DiT = every step's transformer call, VAE decode) the bench
hooks the same modules the engine times and reads the wall clock, the process's CPU seconds (all threads) and its
peak RSS (VmHWM, restarted at each stage boundary). The engine's own stage timings are kept beside them.

Memory safety (a shared machine): before a full-size row the parent waits (10 s polls, up to 5 min) until no other
full-size benchmark runs and MemAvailable >= the row's expected peak + 3 GiB (the 30 s float32 row: >= 20 GiB and
last); otherwise the row is skipped and the reason recorded. The checkpoint (full size: 2B turbo DiT, VAE, text
encoder with published shapes, RANDOM weights, stored bf16, ~6.3 GB) is built once under --work-dir and reused.
Random weights: the audio is noise; times and memory are those of the real shapes. On a shared machine read the
CPU-seconds, not the wall times (the load average is recorded per row).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from measure import loadavg, mem_available, reset_peak, status_bytes, write_results  # noqa: E402  (bench/measure.py)

GIB = 1024**3
MODEL = "acestep-v15-turbo"
PROMPT = "upbeat synth pop, female vocals, 120 bpm"
LYRICS = "[verse]\nneon lights across the city\n[chorus]\nwe keep on running through the night"
CONFIGS: dict[str, dict[str, str]] = {
    "float32": {"ACESTEP_DTYPE": "float32"},
    "bf16": {"ACESTEP_DTYPE": "bfloat16"},
    "bf16+int8": {"ACESTEP_DTYPE": "bfloat16", "ACESTEP_QUANTIZE_DIT": "int8"},
}
# Expected peak RSS of a full-size row, GiB, linear in the song's length: issue 25's whole-song measurements
# (float32 30 s 17.4, bf16 30 s 8.6) and bench/memory_table.py's VAE working sets (10 s vs 30 s). int8 loads the
# DiT in bf16 before quantising it, so it peaks like bf16.
EXPECTED_PEAK = {"float32": (13.5, 0.13), "bf16": (6.2, 0.08), "bf16+int8": (6.2, 0.08)}
BUILD_PEAK_GIB = 7.5  # building the full-size checkpoint in bf16
HEADROOM_GIB = 3.0
LAST_ROW_MIN_GIB = 20.0  # the 30 s float32 row runs only with this much MemAvailable
ABORT_BELOW_GIB = 1.5  # a row is stopped (and says so) when MemAvailable falls under this while it runs
OTHER_BENCHES = "bench/memory_table.py|bench/quantize.py|bench/lm.py"
STAGES = {"text encoder": ("text_encoder", "condition_encoder"), "DiT": ("transformer",), "VAE decode": ("vae.decoder",)}
ENGINE_STAGES = {"text encoder": ("text_encoding_s", "condition_encoding_s"), "DiT": ("dit_s",),
                 "VAE decode": ("vae_decode_s",)}


# ---------------------------------------------------------------- other full-size benchmarks running

def other_benchmarks() -> list[str]:
    out = subprocess.run(["pgrep", "-af", OTHER_BENCHES], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if line.strip() and str(os.getpid()) != line.split()[0]]


def expected_peak_gib(config: str, seconds: float) -> float:
    base, per_s = EXPECTED_PEAK[config]
    return base + per_s * seconds


def needed_gib(config: str, seconds: float, last_row: bool) -> float:
    need = expected_peak_gib(config, seconds) + HEADROOM_GIB
    return max(need, LAST_ROW_MIN_GIB) if last_row else need


def wait_until_safe(need_gib: float, *, poll_s: float = 10.0, limit_s: float = 300.0,
                    available: Callable[[], int] = mem_available,
                    others: Callable[[], list[str]] = other_benchmarks,
                    sleep: Callable[[float], None] = time.sleep,
                    clock: Callable[[], float] = time.monotonic) -> tuple[bool, str]:
    """Poll until no other full-size benchmark runs and MemAvailable >= need_gib: (ok, what was seen last)."""
    deadline = clock() + limit_s
    while True:
        free, busy = available() / GIB, others()
        seen = f"MemAvailable {free:.1f} GiB (needed {need_gib:.1f})" + (
            f", other benchmark running: {busy[0][:120]}" if busy else "")
        if free >= need_gib and not busy:
            return True, seen
        if clock() >= deadline:
            return False, seen
        print(f"  waiting: {seen}", file=sys.stderr, flush=True)
        sleep(poll_s)


# ---------------------------------------------------------------- per-stage meter (child)

class StageMeter:
    """Wall, CPU seconds (the whole process) and peak RSS per stage, from forward hooks on the stage's modules.

    VmHWM is restarted at every stage boundary, so each stage's peak is its own; what runs between stages
    (scheduler, latents, audio encoding) is 'other'."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.peak: dict[str, int] = {}
        self.calls: dict[str, int] = {}
        self._open: dict[int, tuple[float, float]] = {}

    def _note_peak(self, stage: str) -> None:
        self.peak[stage] = max(self.peak.get(stage, 0), status_bytes("VmHWM"))
        reset_peak()

    def start(self) -> None:
        reset_peak()

    def finish(self) -> None:
        self._note_peak("other")

    def attach(self, module, stage: str) -> None:
        def pre(mod, args):
            self._note_peak("other")
            self._open[id(mod)] = (time.perf_counter(), time.process_time())

        def post(mod, args, output):
            begun = self._open.pop(id(mod), None)
            if begun is None:
                return
            self.wall[stage] = self.wall.get(stage, 0.0) + time.perf_counter() - begun[0]
            self.cpu[stage] = self.cpu.get(stage, 0.0) + time.process_time() - begun[1]
            self.calls[stage] = self.calls.get(stage, 0) + 1
            self._note_peak(stage)

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)


def _component(pipe, dotted: str):
    obj = pipe
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
    return obj


def measure_row(env: Mapping[str, str], seconds: float, *, warm_up: bool = True, audio_format: str = "mp3",
                batch_size: int = 2,
                save_audio: Optional[Path] = None, vae_check: bool = False) -> dict:
    """Load the engine from `env` as a worker does, warm it up, run one song; the row's figures. `save_audio`:
    write the song there (as encoded: wav32 keeps the float samples for --snr). `vae_check`: decode the song's
    latents again, timed, with and without the engine's progress hooks, and a random latent of the same shape."""
    import torch

    from engine import vae_fast
    from engine.config import EngineConfig
    from engine.request import GenerationRequest
    from engine.service import Engine

    row: dict[str, Any] = {"song_s": seconds, "load_avg_start": loadavg()}
    reset_peak()
    t0, c0 = time.perf_counter(), time.process_time()
    engine = Engine.load(EngineConfig.from_env(env))
    row.update(load_wall_s=round(time.perf_counter() - t0, 2), load_cpu_s=round(time.process_time() - c0, 2),
               load_peak_gib=round(status_bytes("VmHWM") / GIB, 3))
    if warm_up:
        t0 = time.perf_counter()
        engine.warm_up()
        row["warm_up_wall_s"] = round(time.perf_counter() - t0, 2)
    pipe = engine.model(None).pipe  # the default model: what a request without `model` runs
    meter = StageMeter()
    for stage, components in STAGES.items():
        for comp in components:
            module = _component(pipe, comp)
            if isinstance(module, torch.nn.Module):
                meter.attach(module, stage)
    latents: list = []
    decoder = pipe.vae.decoder
    capture = decoder.register_forward_pre_hook(lambda _m, args: latents.append(args[0].detach().clone()))
    request = GenerationRequest(prompt=PROMPT, lyrics=LYRICS, audio_duration=seconds, seeds=[7], bpm=120,
                                audio_format=audio_format, batch_size=batch_size)
    row.update(rss_before_song_gib=round(status_bytes("VmRSS") / GIB, 3),
               rss_file_before_song_gib=round(status_bytes("RssFile") / GIB, 3),
               rss_anon_before_song_gib=round(status_bytes("RssAnon") / GIB, 3))
    snake_before = vae_fast.snake_in_use(pipe.vae)
    recompiles_before = _recompiles()
    meter.start()
    t0, c0 = time.perf_counter(), time.process_time()
    result = engine.generate(request)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    meter.finish()
    info = result.generation_info
    timings = info["timings"]
    row.update(
        wall_s=round(wall, 2), cpu_s=round(cpu, 2), peak_gib=round(max(meter.peak.values()) / GIB, 3),
        stages={stage: {"wall_s": round(meter.wall.get(stage, 0.0), 2), "cpu_s": round(meter.cpu.get(stage, 0.0), 2),
                        "peak_gib": round(meter.peak.get(stage, 0) / GIB, 3), "calls": meter.calls.get(stage, 0),
                        "engine_wall_s": round(sum(timings.get(k, 0.0) for k in ENGINE_STAGES[stage]), 2)}
                for stage in STAGES},
        other_peak_gib=round(meter.peak.get("other", 0) / GIB, 3),
        audio_encoding_s=timings.get("audio_encoding_s"), steps=info["steps"], dtype=info["dtype"],
        batch=info.get("batch_size"),  # the request's default batch_size is 2: two songs per row, decoded together
        dtype_choice=info.get("dtype_choice"), quantization=info.get("quantization"),
        vae_decode=info.get("vae_decode"), random_weights=info["random_weights"], threads=torch.get_num_threads(),
        load_avg_end=loadavg(), status="measured",
    )
    row["other_cpu_s"] = round(cpu - sum(s["cpu_s"] for s in row["stages"].values()), 2)
    capture.remove()
    snake = vae_fast.snake_in_use(pipe.vae)
    if snake is not None and snake_before is not None:  # the song's own Snake calls, per kernel
        snake["calls"] = {k: n - snake_before["calls"][k] for k, n in snake["calls"].items()}
    row.update(snake=snake, dynamo_recompiles_in_song=_recompiles() - recompiles_before)
    if latents:
        z = latents[-1].float()
        row["latent"] = {"shape": list(z.shape), "std": round(float(z.std()), 4), "max_abs": round(float(z.abs().max()), 3)}
    if save_audio is not None:
        save_audio.parent.mkdir(parents=True, exist_ok=True)
        save_audio.write_bytes(result.audios[0].data)
        row["audio_file"] = str(save_audio)
    if vae_check and latents:
        row["vae_check"] = decode_check(pipe.vae, latents[-1])
    return row


def _recompiles() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["recompiles"].values()) + sum(counters["graph_break"].values())


def decode_check(vae, z) -> dict:
    """The decoder alone on the song's latent z, as bench/vae_cpu.py times it, then inside the engine's progress
    hooks, then on a random latent of z's shape: wall and CPU-s each (what the engine's decode adds, if anything)."""
    import torch

    from engine import vae_progress

    def timed(latent, hooks: bool) -> dict:
        with torch.inference_mode():
            if hooks:
                with vae_progress.reporting(vae, lambda _f: None) as progress:
                    progress.expect(int(latent.shape[-1]))
                    t0, c0 = time.perf_counter(), time.process_time()
                    vae.decode(latent)
            else:
                t0, c0 = time.perf_counter(), time.process_time()
                vae.decode(latent)
        return {"wall_s": round(time.perf_counter() - t0, 2), "cpu_s": round(time.process_time() - c0, 2)}

    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(0)).to(z.dtype)
    return {"song_latent": timed(z, False), "song_latent_progress_hooks": timed(z, True),
            "random_latent": timed(noise, False), "load_avg": loadavg()}


def row_env(config: str, checkpoint_dir: Path, threads: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACESTEP_")}
    env.update(OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
               ACESTEP_CHECKPOINT_DIR=str(checkpoint_dir), ACESTEP_CONFIG_PATH=MODEL, ACESTEP_DEVICE="cpu",
               ACESTEP_ALLOW_DOWNLOAD="false", **CONFIGS[config])
    return env


# ---------------------------------------------------------------- parent

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny random models (seconds; no memory gate)")
    p.add_argument("--durations", type=float, nargs="+", default=[10.0, 30.0])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=2, help="songs per request (2: the API's default)")
    p.add_argument("--format", default="mp3", choices=["mp3", "wav", "flac"])
    p.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "acestep-song-cpu",
                   help="where the checkpoint is built once and reused")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "song_cpu")
    p.add_argument("--poll-limit-s", type=float, default=300.0)
    p.add_argument("--snr", action="store_true",
                   help="songs as float WAV (wav32) under --work-dir; SNR in dB of int8's song against bf16's "
                        "and bf16's against float32's (same request and seed)")
    p.add_argument("--vae-check", action="store_true",
                   help="after each song, decode its latent again: alone, with the progress hooks, random latent")
    p.add_argument("--child", nargs=2, metavar=("CONFIG", "SECONDS"), help=argparse.SUPPRESS)
    p.add_argument("--build", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def checkpoint_dir(args) -> Path:
    return args.work_dir / ("tiny" if args.tiny else "full")


def build_checkpoint(path: Path, tiny: bool) -> None:
    """The full-size one in bf16 straight away (~6.5 GiB peak instead of float32's ~13)."""
    import torch

    from engine.weights.checkpoints import build_tiny_checkpoint

    if not tiny:
        torch.set_default_dtype(torch.bfloat16)
    build_tiny_checkpoint(path / MODEL, seed=0, model_name=MODEL, size="tiny" if tiny else "full")


def ordered_rows(configs: list[str], durations: list[float]) -> list[tuple[str, float]]:
    """float32's longest song last: it is the row that needs the most memory."""
    rows = [(c, d) for c in configs for d in durations]
    heaviest = ("float32", max(durations))
    return [r for r in rows if r != heaviest] + ([heaviest] if heaviest in rows else [])


def report_row(work_dir: Path, row: dict) -> None:
    """To the parent (stdout) and to work_dir/rows.jsonl, so rows measured survive a parent stopped midway."""
    line = json.dumps(row)
    with open(work_dir / "rows.jsonl", "a") as f:
        f.write(line + "\n")
    print("RESULT " + line, flush=True)


def guard_memory(work_dir: Path, config: str, seconds: float) -> None:
    """In the child: stop this row before the machine runs out (the kernel's OOM killer may pick someone else's
    process): a thread watches MemAvailable and exits with an 'aborted' row when it falls under ABORT_BELOW_GIB."""
    import threading

    def watch_self() -> None:
        while True:
            free = mem_available()
            if free < ABORT_BELOW_GIB * GIB:
                report_row(work_dir, {"status": "aborted", "config": config, "song_s": seconds,
                                      "reason": f"stopped itself: MemAvailable fell to {free / GIB:.1f} GiB while "
                                                f"it ran (RSS {status_bytes('VmRSS') / GIB:.1f} GiB)"})
                os._exit(3)
            time.sleep(0.25)

    threading.Thread(target=watch_self, daemon=True, name="memory-guard").start()


def run_child(args, config: str, seconds: float) -> dict:
    env = row_env(config, checkpoint_dir(args), args.threads)
    cmd = [sys.executable, __file__, "--child", config, str(seconds), "--threads", str(args.threads),
           "--format", args.format, "--work-dir", str(args.work_dir),
           "--batch-size", str(args.batch_size)] + (
        ["--tiny"] if args.tiny else []) + (["--snr"] if args.snr else []) + (["--vae-check"] if args.vae_check else [])
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, text=True)
        lowest = watch(proc, args.tiny)
        out.seek(0)
        found = [line[7:] for line in out.read().splitlines() if line.startswith("RESULT ")]
    if found:
        return dict(json.loads(found[0]), lowest_mem_available_gib=round(lowest / GIB, 2))
    if proc.returncode == -9 and lowest < ABORT_BELOW_GIB * GIB:
        return {"status": "aborted", "reason": f"stopped by the bench: MemAvailable fell to {lowest / GIB:.1f} GiB "
                                                f"(other processes grew; < {ABORT_BELOW_GIB} GiB)"}
    return {"status": "failed", "reason": f"child exited {proc.returncode} (negative: killed by a signal; lowest "
                                          f"MemAvailable {lowest / GIB:.1f} GiB)"}


def watch(proc: subprocess.Popen, tiny: bool) -> int:
    """Wait for the child; stop it before the machine runs out of memory (others share it). Lowest MemAvailable."""
    lowest = mem_available()
    while proc.poll() is None:
        time.sleep(0.5)
        lowest = min(lowest, mem_available())
        if not tiny and lowest < ABORT_BELOW_GIB * GIB:
            proc.kill()
            proc.wait()
    return lowest


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.build:
        build_checkpoint(checkpoint_dir(args), args.tiny)
        return 0
    if args.child:
        config, seconds = args.child[0], float(args.child[1])
        env = row_env(config, checkpoint_dir(args), args.threads)
        if not args.tiny:
            guard_memory(checkpoint_dir(args), config, seconds)
        try:
            row = measure_row(env, seconds, audio_format="wav32" if args.snr else args.format,
                              save_audio=audio_path(args, config, seconds) if args.snr else None,
                              vae_check=args.vae_check, batch_size=args.batch_size)
        except Exception as exc:  # a refusal (fit check) or a failure: the row says why
            row = {"status": "failed", "reason": f"{type(exc).__name__}: {str(exc)[:300]}"}
        report_row(checkpoint_dir(args), dict(row, config=config, song_s=seconds))
        return 0

    from engine.weights.checkpoints import is_complete

    shown = sys.argv[1:] if argv is None else argv
    command = "OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/song_cpu.py" + "".join(" " + a for a in shown)
    meta: dict[str, Any] = {"command": command, "size": "tiny" if args.tiny else "full-size", "model": MODEL,
                            "random_weights": True, "machine": f"{platform.processor() or platform.machine()}, "
                            f"{os.cpu_count()} cores, {args.threads} threads, OMP_WAIT_POLICY=PASSIVE",
                            "date": time.strftime("%Y-%m-%d %H:%M"), "load_avg_start": loadavg()}
    path = checkpoint_dir(args) / MODEL
    if not is_complete(path):
        ok, seen = (True, "tiny") if args.tiny else wait_until_safe(BUILD_PEAK_GIB + HEADROOM_GIB,
                                                                   limit_s=args.poll_limit_s)
        if not ok:
            print(f"not building the full-size checkpoint: {seen}", file=sys.stderr)
            return 1
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--build", "--work-dir", str(args.work_dir)]
                       + (["--tiny"] if args.tiny else []), cwd=ROOT, check=True,
                       env=dict(os.environ, OMP_NUM_THREADS=str(args.threads), OMP_WAIT_POLICY="PASSIVE"))
        meta["build_s"] = round(time.perf_counter() - t0, 1)
    rows: list[dict] = []
    plan = ordered_rows(args.configs, args.durations)
    for i, (config, seconds) in enumerate(plan):
        print(f"{config} {seconds:g} s ...", file=sys.stderr, flush=True)
        if args.tiny:
            ok, seen = True, "tiny: not gated"
        else:
            last = config == "float32" and seconds == max(args.durations)
            ok, seen = wait_until_safe(needed_gib(config, seconds, last), limit_s=args.poll_limit_s)
        row = run_child(args, config, seconds) if ok else {"status": "skipped", "reason": seen}
        row.update(config=config, song_s=seconds, gate=seen)
        rows.append(row)
        print("  " + (f"{row['wall_s']} s wall, {row['cpu_s']} CPU-s, peak {row['peak_gib']} GiB"
                      if row["status"] == "measured" else f"{row['status']}: {row['reason']}"),
              file=sys.stderr, flush=True)
    meta["load_avg_end"] = loadavg()
    if args.snr:
        meta["snr_db_vs_bf16"] = snr_table(args, rows)
    write_results(args.out, meta, rows, markdown)
    return 0


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"Whole songs on CPU ({meta['size']} {meta['model']}, RANDOM weights: the audio is noise), "
             f"{meta['machine']}, {meta['date']}; load average {meta['load_avg_start']} -> {meta.get('load_avg_end')}",
             f"`{meta['command']}`", "",
             "| song | config | steps | wall s | CPU-s | text enc wall / CPU-s | DiT wall / CPU-s | VAE dec wall / CPU-s "
             "| other CPU-s | peak RSS GiB (text / DiT / VAE) | load s / peak GiB | load avg |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if r.get("status") != "measured":
            lines.append(f"| {r['song_s']:g} s | {r['config']} | | {r['status']}: {r.get('reason', '')} | | | | | | | | |")
            continue
        st = r["stages"]
        cells = [f"{r['song_s']:g} s", r["config"], str(r["steps"]), f"{r['wall_s']:.1f}", f"{r['cpu_s']:.1f}",
                 *(f"{st[s]['wall_s']:.1f} / {st[s]['cpu_s']:.1f}" for s in STAGES), f"{r['other_cpu_s']:.1f}",
                 f"**{r['peak_gib']:.2f}** (" + " / ".join(f"{st[s]['peak_gib']:.2f}" for s in STAGES) + ")",
                 f"{r['load_wall_s']:.0f} / {r['load_peak_gib']:.2f}",
                 f"{r['load_avg_start'].split()[0]} -> {r['load_avg_end'].split()[0]}"]
        lines.append("| " + " | ".join(cells) + " |")
    for r in rows:
        if r.get("status") == "measured" and r["config"] == "bf16":
            st = r["stages"]
            dit, vae = st["DiT"]["cpu_s"], st["VAE decode"]["cpu_s"]
            lines.append(f"\n{r['song_s']:g} s bf16: VAE decode {vae:.1f} CPU-s vs DiT {dit:.1f} CPU-s "
                         f"({vae / dit:.2f}x; target <= 1)" if dit else "")
    for r in rows:
        if r.get("status") == "measured" and r.get("snake"):
            lines.append(f"\n{r['song_s']:g} s {r['config']}: Snake {r['snake']['snake']} "
                         f"(calls in the song: {r['snake']['calls']}), dynamo recompiles {r['dynamo_recompiles_in_song']}, "
                         f"latent std {r.get('latent', {}).get('std')}, RSS before the song {r['rss_before_song_gib']} GiB "
                         f"(file {r['rss_file_before_song_gib']}, anon {r['rss_anon_before_song_gib']})")
        if r.get("vae_check"):
            lines.append(f"  decode again: {r['vae_check']}")
    for key, value in meta.get("snr_db_vs_bf16", {}).items():
        lines.append(f"\nSNR {key} (same request and seed): {value:.2f} dB")
    return "\n".join(lines) + "\n"


def audio_path(args, config: str, seconds: float) -> Path:
    return checkpoint_dir(args) / "audio" / f"{config}_{seconds:g}s.wav"  # beside the checkpoint, not in the repo


def snr_db(test, reference) -> float:
    """10 log10(|reference|^2 / |test - reference|^2) over all samples and channels."""
    import numpy as np

    ref, got = np.asarray(reference, dtype=np.float64), np.asarray(test, dtype=np.float64)
    n = min(len(ref), len(got))
    noise = float(np.sum((got[:n] - ref[:n]) ** 2))
    return float("inf") if noise == 0 else 10 * float(np.log10(float(np.sum(ref[:n] ** 2)) / noise))


SNR_PAIRS = (("bf16+int8", "bf16"), ("bf16", "float32"))  # (song, reference)


def snr_table(args, rows: list[dict]) -> dict[str, float]:
    """int8's song against bf16's, and bf16's against float32's, of the same length (same request and seed), from
    this run's songs (a pair needs both rows measured in it)."""
    import soundfile as sf

    out: dict[str, float] = {}
    files = {(r["config"], r["song_s"]): r["audio_file"] for r in rows
             if r.get("status") == "measured" and r.get("audio_file")}
    for seconds in sorted({r["song_s"] for r in rows}):
        for config, reference in SNR_PAIRS:
            if (config, seconds) in files and (reference, seconds) in files:
                got, _rate = sf.read(files[(config, seconds)], dtype="float32")
                ref, _rate = sf.read(files[(reference, seconds)], dtype="float32")
                key = f"{config} vs {reference}, {seconds:g} s"
                out[key] = round(snr_db(got, ref), 2)
                print(f"  SNR {key}: {out[key]:.2f} dB", file=sys.stderr)
    return out


if __name__ == "__main__":
    sys.exit(main())
