"""Reduced precision for calibration passes whose activations only feed float64 statistics.

Fitting a depth map runs the subnet (and the removed layers) over thousands of calibration tokens, but what it
keeps is a float64 Gram matrix of those activations: bfloat16 matmuls change the fitted maps far less than the
sampling noise of the tokens does (SmolLM2-135M, 25 % of layers removed, 8,192 tokens: held-out perplexity 59.25
with bfloat16 vs 59.23 in float32) and run 2.8× faster where the CPU has native bfloat16 (AVX512-BF16, AMX).

Where it has not, PyTorch emulates bfloat16 and the pass gets *slower*, so ``auto`` does not guess from CPU
flags: it times one small matmul in both precisions, once per process, and uses bfloat16 only where it pays.
That keeps one wheel fast on every machine, the way the native code dispatches at run time.

torch is imported inside the functions: the CLI's ``--help`` reads :data:`PRECISIONS` without loading it.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:
    import torch

PRECISIONS = ("auto", "float32", "bfloat16")
# bfloat16 must be at least this much faster to be used: a timing on a busy machine is noisy, and float32 is the
# reference the tests and every other figure use.
_MIN_SPEEDUP = 1.4


def _best_seconds(a: torch.Tensor, b: torch.Tensor, repeats: int = 3) -> float:
    import torch

    torch.nn.functional.linear(a, b)  # first call: oneDNN picks and caches its kernel
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.nn.functional.linear(a, b)
        best = min(best, time.perf_counter() - start)
    return best


@functools.cache
def bfloat16_pays(device_type: str) -> bool:
    """Whether bfloat16 matmuls beat float32 on this device (CPU: measured, ≈ 20 ms once per process)."""
    import torch

    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device_type != "cpu":
        return False
    gen = torch.Generator().manual_seed(0)
    # A projection of a small model over a row batch: big enough for the kernels' steady state, small enough
    # to cost nothing next to the pass it decides.
    a, b = torch.randn(512, 576, generator=gen), torch.randn(1536, 576, generator=gen)
    fp32 = _best_seconds(a, b)
    bf16 = _best_seconds(a.bfloat16(), b.bfloat16())
    return fp32 >= _MIN_SPEEDUP * bf16


def check(precision: str) -> None:
    """Raise unless ``precision`` is one of :data:`PRECISIONS` (no timing: cheap enough to validate inputs)."""
    if precision not in PRECISIONS:
        raise ConfigError("precision", [f"unknown precision {precision!r}; supported are: {', '.join(PRECISIONS)}"],
                          fix="pass one of the supported precisions")


def resolve(precision: str, device: torch.device | str = "cpu") -> torch.dtype:
    """The compute dtype ``precision`` (one of :data:`PRECISIONS`) means on ``device``."""
    import torch

    check(precision)
    if precision == "auto":
        return torch.bfloat16 if bfloat16_pays(torch.device(device).type) else torch.float32
    return getattr(torch, precision)


@contextlib.contextmanager
def compute_in(dtype: torch.dtype, device: torch.device | str = "cpu") -> Iterator[None]:
    """Matmuls in ``dtype`` (autocast); float32 is a no-op, so the reference path is untouched."""
    import torch

    if dtype == torch.float32:
        yield
        return
    with torch.autocast(torch.device(device).type, dtype=dtype):
        yield
