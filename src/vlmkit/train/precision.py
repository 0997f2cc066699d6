"""`train.bf16`: true, false, or "auto": bf16 autocast where this machine multiplies bf16 faster.

On a GPU, "auto" means bf16 wherever the GPU supports it (Ampere and newer). On a CPU it
depends on the cores: with native bf16 instructions (AVX512-BF16, AMX) a bf16 matrix product
of the demo's sizes ran 2.6 times faster than a float32 one here, and the demo's SFT step 1.4
times faster; without them bf16 is emulated and can be many times slower. So on a CPU "auto"
times one product in each precision, once per process, and takes bf16 only when it wins
clearly. Autocast keeps the weights, their gradients and the optimizer in float32 either way.
"""

from __future__ import annotations

import functools
import time

import torch

from vlmkit.errors import ConfigError

AUTO = "auto"
# bf16 must beat float32 by this factor on the timed product: casts and the kernels that
# autocast leaves in float32 take back part of what the products win.
MIN_CPU_SPEEDUP = 1.5


def check(setting) -> None:
    """Raise ConfigError for a train.bf16 that is neither a bool nor "auto"."""
    if not isinstance(setting, bool) and setting != AUTO:
        raise ConfigError(f"train.bf16 must be true, false or {AUTO!r}, not {setting!r}")


def _best_seconds(a: torch.Tensor, b: torch.Tensor, repeats: int = 5) -> float:
    a @ b  # the first call sets up the kernel
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return min(times)  # the least disturbed by other work on the machine


@functools.cache
def cpu_bf16_speedup(rows: int = 1024, inner: int = 256, cols: int = 512) -> float:
    """How many times faster a (rows x inner) @ (inner x cols) product runs in bf16 than in float32."""
    a, b = torch.randn(rows, inner), torch.randn(inner, cols)
    return _best_seconds(a, b) / _best_seconds(a.bfloat16(), b.bfloat16())


def _auto() -> tuple[bool, str]:
    if torch.cuda.is_available():
        supported = torch.cuda.is_bf16_supported()
        return supported, f"this GPU {'supports' if supported else 'lacks'} bf16"
    if torch.backends.mps.is_available():
        return False, "vlmkit does not use autocast on MPS"
    speedup = cpu_bf16_speedup()
    return speedup >= MIN_CPU_SPEEDUP, (f"a bf16 matrix product ran {speedup:.1f}x as fast as float32 on this "
                                        f"CPU; bf16 from {MIN_CPU_SPEEDUP}x")  # fmt: skip


@functools.cache
def bf16_enabled(setting: bool | str) -> bool:
    """Whether the run trains under bf16 autocast; for "auto", decided (and said) once per process."""
    check(setting)
    if setting != AUTO:
        return setting
    enabled, why = _auto()
    print(f"train.bf16=auto: bf16 autocast {'on' if enabled else 'off'} ({why})")
    return enabled
