"""A faster VAE decode (and source encode) on CPU: one channels-last layout through the decoder and the encoder,
and a fused Snake activation.

Measured on the full-size Oobleck decoder in bf16 (bench/vae_cpu.py), the eager decode spent its time in
 - copies: every Conv1d reaches oneDNN as a 2-D convolution whose bf16 kernels want channels-last, so each
   call transposed its input in and its output back (the Snake's reshape also leaves a stride that makes
   PyTorch pick the plain layout again);
 - the Snake x + 1/b * sin(a x)^2: five passes over memory and five allocations per activation.
So the decoder here runs on [batch, channels, 1, time] tensors kept channels-last from its first convolution
to its last (the convolutions are 2-D with a height-1 kernel: the same arithmetic, no transposes), and each
Snake is one pass: a kernel torch.compile (inductor, C++/OpenMP) generates once per worker, or, without a
working compiler, fewer in-place passes in eager mode.

The encoder (source audio for cover / repaint / reference) is built of the same parts, Snakes and weight-normed
Conv1d's, with strided convolutions where the decoder has transposed ones, so it gets the same treatment and
shares the decoder's Snake kernel (one compile per worker).

The module trees are unchanged (only `forward`s are replaced), so vae_progress's hooks on the residual units
and the up/downsampling convolutions still report; weight norm is folded into plain weights once
(it recomputes g * v / |v| before every call otherwise). Other devices keep the original 3-D path.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

log = logging.getLogger("engine")

_MARK = "_acestep_fast_decode"
_KERNEL = "_acestep_snake_kernel"
_ON = {"1", "true", "yes", "on"}
_OFF = {"0", "false", "no", "off"}


@dataclass
class FastDecode:
    """What install did, for the log (and bench/vae_cpu.py)."""
    snake: str  # "compiled" or "eager"
    folded: int  # weight-normed convolutions folded
    compile_s: float  # wall seconds spent compiling (0 when not compiled)
    reason: str = ""  # why the Snake is not compiled, when it is not
    encoder_folded: int = 0  # the same, in the encoder

    def describe(self) -> str:
        text = f"VAE decode and encode: channels-last, {self.snake} Snake"
        if self.snake == "compiled":
            text += f" (compiled in {self.compile_s:.1f} s)"
        elif self.reason:
            text += f" ({self.reason})"
        return text


def _snake_eager(x: torch.Tensor, alpha: torch.Tensor, inv_beta: torch.Tensor) -> torch.Tensor:
    """x + inv_beta * sin(alpha x)^2 with one temporary, written over in place."""
    t = x * alpha
    t.sin_()
    t.mul_(t)
    return torch.addcmul(x, t, inv_beta, out=t)


def _snake_formula(x: torch.Tensor, alpha: torch.Tensor, inv_beta: torch.Tensor) -> torch.Tensor:
    return x + inv_beta * torch.sin(alpha * x).pow(2)


class _Snake:
    """The Snake kernel every activation of one VAE (decoder and encoder) shares: compiled if it can be, else eager."""

    def __init__(self) -> None:
        self.fn: Callable[..., torch.Tensor] = _snake_eager
        self.kind, self.reason = "eager", ""
        self.calls = {"compiled": 0, "eager": 0}  # which kernel the decodes ran, not only which was set up

    def compile(self, dtype: torch.dtype) -> float:
        """Compile and run the fused kernel once (the cold compile is the cost, seconds to a minute); falls
        back to eager, with the reason, when no C++ compiler or inductor works here."""
        t0 = time.perf_counter()
        try:
            fn = torch.compile(_snake_formula, dynamic=True)
            # batch 1 and 2 (torch specialises sizes 0 and 1), under both no-grad modes the pipeline may use
            rng = torch.Generator().manual_seed(0)  # its own: a load must not move the global RNG
            for batch, mode in ((1, torch.no_grad), (2, torch.no_grad), (1, torch.inference_mode)):
                x = torch.randn(batch, 4, 1, 16, generator=rng).to(dtype).contiguous(memory_format=torch.channels_last)
                a, b = (torch.rand(1, 4, 1, 1, generator=rng).to(dtype) + 0.5 for _ in range(2))
                with mode():
                    got = fn(x, a, b)
                if not torch.allclose(got.float(), _snake_formula(x, a, b).float(), atol=0.05, rtol=0.05):
                    raise RuntimeError("compiled Snake disagrees with the formula")
        except Exception as exc:  # no compiler, inductor unusable on this host: the eager kernel still works
            self.reason = f"not compiled: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            log.warning("VAE decode: %s; using the eager Snake", self.reason)
            return 0.0
        self.fn, self.kind = fn, "compiled"
        return time.perf_counter() - t0

    def __call__(self, x: torch.Tensor, alpha: torch.Tensor, inv_beta: torch.Tensor) -> torch.Tensor:
        if self.kind == "compiled":
            try:
                out = self.fn(x, alpha, inv_beta)
                self.calls["compiled"] += 1
                return out
            except Exception as exc:  # a shape or layout the compiler cannot take: keep decoding, eagerly
                self.fn, self.kind = _snake_eager, "eager"
                self.reason = f"compiled kernel failed ({type(exc).__name__}), eager since"
                log.warning("VAE decode: %s", self.reason)
        self.calls["eager"] += 1
        return _snake_eager(x, alpha, inv_beta)


def fold_weight_norm(module: torch.nn.Module) -> int:
    """Fold weight normalisation into plain weights (torch.nn.utils.weight_norm recomputes g * v / |v| before
    every call); returns how many modules were folded."""
    from torch.nn.utils.weight_norm import WeightNorm

    folded = 0
    for sub in module.modules():
        if any(isinstance(h, WeightNorm) for h in sub._forward_pre_hooks.values()):
            torch.nn.utils.remove_weight_norm(sub)
            folded += 1
    return folded


def _conv_forward(conv: torch.nn.Module, original: Callable) -> Callable:
    """A Conv1d (plain or strided) / ConvTranspose1d forward that takes [batch, channels, 1, time] as a height-1
    2-D convolution
    (the layout carries through oneDNN without copies), and 3-D input as before."""
    transposed = isinstance(conv, torch.nn.ConvTranspose1d)

    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            return original(x)
        weight = conv.weight.unsqueeze(2)
        if transposed:
            return F.conv_transpose2d(x, weight, conv.bias, (1, conv.stride[0]), (0, conv.padding[0]),
                                      (0, conv.output_padding[0]), conv.groups, (1, conv.dilation[0]))
        return F.conv2d(x, weight, conv.bias, (1, conv.stride[0]), (0, conv.padding[0]), (1, conv.dilation[0]),
                        conv.groups)

    return forward


def _snake_forward(snake: torch.nn.Module, original: Callable, kernel: _Snake) -> Callable:
    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            return original(x)
        alpha, beta = snake.alpha, snake.beta
        if snake.logscale:
            alpha, beta = alpha.exp(), beta.exp()
        # [1, C, 1] -> [1, C, 1, 1]: broadcasting over a channels-last tensor keeps its layout
        return kernel(x, alpha.unsqueeze(-1), (beta.unsqueeze(-1) + 1e-9).reciprocal())

    return forward


def _channels_last_forward(original: Callable) -> Callable:
    """The decoder's (or encoder's) forward on CPU: [batch, channels, time] in and out, channels-last inside."""
    def forward(z: torch.Tensor) -> torch.Tensor:
        if z.device.type != "cpu":
            return original(z)
        x = z.unsqueeze(2).contiguous(memory_format=torch.channels_last)
        return original(x).squeeze(2).contiguous()

    return forward


def _make_fast(stack: torch.nn.Module, kernel: _Snake) -> int:
    """Fold `stack`'s weight norm and route its convolutions and Snakes through the height-1 layout (in place);
    returns how many convolutions were folded."""
    from diffusers.models.autoencoders.autoencoder_oobleck import Snake1d

    folded = fold_weight_norm(stack)
    for module in stack.modules():
        if isinstance(module, (torch.nn.Conv1d, torch.nn.ConvTranspose1d)):
            module.forward = _conv_forward(module, module.forward)
        elif isinstance(module, Snake1d):
            module.forward = _snake_forward(module, module.forward, kernel)
    stack.forward = _channels_last_forward(stack.forward)
    return folded


def install(vae, *, compile_snake: bool) -> Optional[FastDecode]:
    """Make `vae.decoder` decode and `vae.encoder` encode on CPU as above (in place, once; None if already done).
    `compile_snake`: compile the fused Snake now (a one-time cost per process, paid at load rather than by a
    request)."""
    decoder = vae.decoder
    if getattr(decoder, _MARK, None) is not None:
        return None
    kernel = _Snake()
    folded = _make_fast(decoder, kernel)
    encoder_folded = _make_fast(vae.encoder, kernel)
    compile_s = kernel.compile(next(decoder.parameters()).dtype) if compile_snake else 0.0
    info = FastDecode(snake=kernel.kind, folded=folded, compile_s=compile_s,
                      reason=kernel.reason or ("" if compile_snake else "compile off"), encoder_folded=encoder_folded)
    setattr(decoder, _MARK, info)
    setattr(decoder, _KERNEL, kernel)
    return info


def snake_in_use(vae) -> Optional[dict]:
    """The Snake this VAE's decoder and encoder run now (it may have fallen back to eager since load) and how many
    activations each kernel computed so far (encodes included); None when install never ran on it (another device)."""
    kernel = getattr(vae.decoder, _KERNEL, None)
    if kernel is None:
        return None
    return {"snake": kernel.kind, "reason": kernel.reason, "calls": dict(kernel.calls)}


COMPILE_MIN_PARAMS = 10_000_000  # auto: compile only a decoder this large (the published one has ~100M)


def compile_setting(value: Optional[str] = None) -> Optional[bool]:
    """ACESTEP_VAE_COMPILE: auto (the default: compile the fused Snake at load for a full-size decoder, where a
    one-time compile of ~10-70 s buys back its cost within a song or two; not for a tiny test model, which
    would save nothing), true, or false (no compiler run at start; the decode keeps channels-last and the
    eager Snake). Returns None for auto."""
    raw = ("auto" if value is None else value).strip().lower()
    if raw in _ON:
        return True
    if raw in _OFF:
        return False
    if raw == "auto":
        return None
    raise ValueError(f"ACESTEP_VAE_COMPILE must be auto, true or false (got {raw!r})")


def prepare(vae, device: torch.device, setting: Optional[str] = None) -> Optional[FastDecode]:
    """The engine's entry point at load: the fast decode and encode on CPU (compiling per ACESTEP_VAE_COMPILE), nothing
    on other devices; None when nothing was done (another device, or this VAE was prepared already)."""
    if device.type != "cpu":
        return None
    choice = compile_setting(setting)
    if choice is None:
        choice = sum(p.numel() for p in vae.decoder.parameters()) >= COMPILE_MIN_PARAMS
    info = install(vae, compile_snake=choice)
    if info is not None:
        log.info("%s", info.describe())
    return info
