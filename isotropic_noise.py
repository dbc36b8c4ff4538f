"""Random numbers for isotropic GA's noise on the CPU: a counter-based stream and a fast kernel.

L_GA^I draws one random number per trainable parameter at every step (16M for TIRG), and torch's
CPU generator (a serial Mersenne Twister) takes about 3 ns per number here: a sixth of a plain
training step at batch 32. This module defines a stream that can be computed in any order and
in parallel, and computes it with a small C kernel (``isotropic_noise.c``), built at first use
with the machine's C compiler and cached. The kernel draws the noise in blocks that stay in
cache and uses them in the same pass: added to the gradient with the dot product for the logged
value (``add_``; 0.6 ns per number on one core here), or that and SGD's step as well (``sgd_``).
Where the kernel cannot be built (no compiler, no vector math library) or is switched off
(TIRG_GA_NOISE_KERNEL=0), the same stream comes from torch operations (``reference``), slower;
the two agree to a few units in float32's last place (tested), so the choice does not change
what a run draws beyond that.

The stream of a 64-bit key, element e (a tensor's flattened index):
    pairs j = 1, 2, ...: x_j = mix(key + j * 0x9E3779B97F4A7C15 mod 2^64), mix = SplitMix64's
    output function; hi_j = x_j >> 40 and lo_j = x_j & 0xFFFFFF, two 24-bit integers.
    Elements come in blocks of 2048: block b, offset o < 1024 uses pair j = 1024 b + o + 1 and
    its 'cosine' half, offset 1024 + o the 'sine' half of the same pair.
    gaussian (Box-Muller): rho = sqrt(-2 log((hi_j + 1) 2^-24)), t = lo_j 2 pi 2^-24,
        cosine half rho cos t, sine half rho sin t.
    uniform: (2 h + 1 - 2^24) 2^-24 sqrt(3), h = hi_j (cosine half) or lo_j (sine half):
        unit variance on (-sqrt 3, sqrt 3).
The Gaussian's tails end at 5.8 sigma (the 24-bit uniform), like torch's float32 sampler. The
kernel takes cos t and sin t from polynomials on the octant the top bits of lo_j pick, torch
from its own functions of t. Keys come from ``step_keys``: one per parameter tensor, a pure
function of (seed, iteration).
"""

from __future__ import annotations

import ctypes
import math

import numpy as np
import torch

import cpu_kernels

KINDS = ("gaussian", "uniform")
BLOCK = 2048  # elements per block of the stream; chunk offsets are multiples of it
ENV_SWITCH = "TIRG_GA_NOISE_KERNEL"  # "0": neither build nor use the C kernel
# Mixed into the seed so that the noise never coincides with another stream seeded by --seed.
_STREAM = 0x15_07_0C
_GOLDEN, _MIX1, _MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_TWO_PI_2M24 = float(np.float32(2 * math.pi)) * 2.0**-24
# Chunks of the torch path: below ATen's parallel grain size (32768), so that every op runs
# serially in the thread that called it (the callers spread tensors over a thread pool).
_TORCH_CHUNK = 16 * BLOCK


def step_keys(seed: int, iteration: int, count: int) -> list[int]:
    """``count`` 64-bit keys for step ``iteration`` of a run seeded with ``seed``, one per
    parameter tensor. Every DDP rank and a resumed run get the same keys."""
    states = np.random.SeedSequence([seed, iteration, _STREAM]).generate_state(count, np.uint64)
    return [int(s) for s in states]


def _check(kind: str, offset: int) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if offset % BLOCK:
        raise ValueError(f"offset must be a multiple of {BLOCK}, got {offset}")


def _int64(value: int) -> int:
    """The int64 with the bits of the uint64 ``value``: torch's integers wrap like C's."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def _logical_shift(x: torch.Tensor, bits: int) -> torch.Tensor:
    return (x >> bits) & ((1 << (64 - bits)) - 1)  # torch shifts int64 arithmetically


def reference(n: int, kind: str, key: int, scale: float = 1.0, offset: int = 0) -> torch.Tensor:
    """Elements offset .. offset + n - 1 of the stream of ``key``, times ``scale``, as float32,
    computed with torch operations (the definition in the module docstring)."""
    _check(kind, offset)
    scale = _kernel_scale(kind, scale)
    blocks = -(-n // BLOCK)
    if blocks == 0:
        return torch.empty(0)
    first = offset // BLOCK * (BLOCK // 2) + 1
    x = torch.arange(first, first + blocks * (BLOCK // 2), dtype=torch.int64)
    x.mul_(_int64(_GOLDEN)).add_(_int64(key))
    x ^= _logical_shift(x, 30)
    x.mul_(_int64(_MIX1))
    x ^= _logical_shift(x, 27)
    x.mul_(_int64(_MIX2))
    x ^= _logical_shift(x, 31)
    hi, lo = (_logical_shift(x, 40)).view(blocks, -1), (x & 0xFFFFFF).view(blocks, -1)
    if kind == "uniform":
        halves = [(2 * h + 1 - (1 << 24)).float().mul_(2.0**-24).mul_(scale) for h in (hi, lo)]
    else:
        rho = (hi + 1).float().mul_(2.0**-24).log_().mul_(-2.0).sqrt_().mul_(scale)
        t = lo.float().mul_(_TWO_PI_2M24)
        halves = [rho * torch.cos(t), rho * torch.sin(t)]
    return torch.cat(halves, dim=1).view(-1)[:n]


# --------------------------------------------------------------------------- the C kernel


def _declare(lib: ctypes.CDLL) -> None:
    head = [ctypes.c_int, ctypes.c_uint64, ctypes.c_int64, ctypes.c_float]
    lib.tirg_noise_fill.restype = None
    lib.tirg_noise_fill.argtypes = [*head, ctypes.c_void_p, ctypes.c_int64]
    lib.tirg_noise_add.restype = ctypes.c_double
    lib.tirg_noise_add.argtypes = [*head, *[ctypes.c_void_p] * 2, ctypes.c_int64]
    lib.tirg_noise_sgd.restype = ctypes.c_double
    lib.tirg_noise_sgd.argtypes = [
        *head, *[ctypes.c_void_p] * 3, ctypes.c_int, *[ctypes.c_float] * 3, ctypes.c_int64,
    ]  # fmt: skip


def _require_vector_math(binary: bytes) -> None:
    if b"_ZGV" not in binary:  # no call to the vector math library: slower than torch
        raise OSError("the compiler did not vectorize log/cos/sin (no libmvec)")


KERNEL = cpu_kernels.Kernel(
    "isotropic_noise.c", "tirg_noise_", 3, _declare, ENV_SWITCH, ("-lmvec", "-lm"),
    _require_vector_math,
)  # fmt: skip


def kernel_status() -> str:
    """What computes the stream in this process: the kernel's path, or why the torch path."""
    return KERNEL.load()[1]


def kernel_accepts(*tensors: torch.Tensor) -> bool:
    """Whether the kernel is built and can work on these tensors in place (float32, contiguous,
    on the CPU)."""
    return _kernel_for(*tensors) is not None


def _kernel_for(*tensors: torch.Tensor):
    """The kernel when it can work on these tensors in place, else None."""
    if not all(
        t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() for t in tensors
    ):
        return None
    return KERNEL.load()[0]


# --------------------------------------------------------------------------- public operations


def fill_(out: torch.Tensor, kind: str, key: int, scale: float = 1.0, offset: int = 0):
    """Write elements offset .. offset + out.numel() - 1 of the stream of ``key``, times
    ``scale``, into the 1-D CPU tensor ``out``. float32 comes from the kernel where it is built;
    another dtype gets the float32 stream, converted, times ``scale`` in that dtype."""
    _check(kind, offset)
    if out.dim() != 1:
        raise ValueError(f"out must be 1-D, got shape {tuple(out.shape)}")
    lib = _kernel_for(out)
    if lib is not None:
        lib.tirg_noise_fill(
            kind == "uniform", key, offset, _kernel_scale(kind, scale), out.data_ptr(), out.numel()
        )
        return out
    single = out.dtype == torch.float32
    for start in range(0, out.numel(), _TORCH_CHUNK):
        chunk = out[start : start + _TORCH_CHUNK]
        if single:
            chunk.copy_(reference(chunk.numel(), kind, key, scale, offset + start))
        else:
            unit = torch.empty(chunk.numel())
            chunk.copy_(fill_(unit, kind, key, 1.0, offset + start)).mul_(scale)
    return out


def add_(grad: torch.Tensor, param: torch.Tensor, kind: str, key: int, scale: float) -> float:
    """grad += scale * r and return <scale * r, param>, r the stream of ``key``; grad and param
    are 1-D CPU tensors of one size. The numbers added are those ``fill_`` writes."""
    if grad.shape != param.shape or grad.dim() != 1:
        raise ValueError(f"grad and param must be 1-D of one size: {grad.shape}, {param.shape}")
    lib = _kernel_for(grad, param)
    if lib is not None:
        return lib.tirg_noise_add(
            kind == "uniform", key, 0, _kernel_scale(kind, scale), grad.data_ptr(),
            param.data_ptr(), grad.numel(),
        )  # fmt: skip
    total = 0.0
    scratch = torch.empty(min(grad.numel(), _TORCH_CHUNK), dtype=grad.dtype)
    for start in range(0, grad.numel(), _TORCH_CHUNK):
        stop = min(start + _TORCH_CHUNK, grad.numel())
        chunk = fill_(scratch[: stop - start], kind, key, scale, start)
        total += torch.dot(chunk, param[start:stop]).item()
        grad[start:stop].add_(chunk)
    return total


def sgd_(
    grad: torch.Tensor,
    param: torch.Tensor,
    buf: torch.Tensor,
    first: bool,
    lr: float,
    momentum: float,
    weight_decay: float,
    kind: str,
    key: int,
    scale: float,
) -> float | None:
    """grad += scale * r (the numbers ``add_`` adds), then torch.optim.SGD's step with momentum
    (no dampening, not Nesterov) on ``param`` and its momentum buffer ``buf`` (``first``: the
    buffer is new and becomes the gradient), all in one pass over the 1-D tensors. Returns
    <scale * r, param> at the parameter before the step, or None, with nothing done, where the
    kernel is not built or the tensors are not float32, contiguous and on the CPU."""
    _check(kind, 0)
    if not grad.shape == param.shape == buf.shape or grad.dim() != 1:
        raise ValueError(f"grad, param, buf must be 1-D of one size: {grad.shape}, {param.shape}")
    lib = _kernel_for(grad, param, buf)
    if lib is None:
        return None
    return lib.tirg_noise_sgd(
        kind == "uniform", key, 0, _kernel_scale(kind, scale), grad.data_ptr(), param.data_ptr(),
        buf.data_ptr(), first, lr, momentum, weight_decay, grad.numel(),
    )  # fmt: skip


def _kernel_scale(kind: str, scale: float) -> float:
    return math.sqrt(3.0) * scale if kind == "uniform" else scale
