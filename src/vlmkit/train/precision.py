"""`train.bf16`: true, false, or "auto": bf16 autocast where this machine multiplies bf16 faster.

On a GPU, "auto" means bf16 where the GPU has it natively (Ampere and newer). On a CPU it
depends on the cores: with native bf16 instructions (AVX512-BF16, AMX) a bf16 matrix product
ran 3.7-4.2 times as fast as a float32 one on a 2-core AMD EPYC, and a small LM's training
step about 1.4 times (with eager attention; examples/shapes/README.md); without them bf16 is
emulated and can be many times slower. So on a CPU
"auto" times one product in each precision, once per process, and takes bf16 only when it
wins clearly. Autocast keeps the weights, their gradients and the optimizer in float32 either
way. The choice is printed and kept in the run's summary.
"""

from __future__ import annotations

import functools
import os
import time

import torch

from vlmkit.errors import ConfigError

AUTO = "auto"
# bf16 must beat float32 by this factor on the timed product: casts and the kernels that
# autocast leaves in float32 take back part of what the products win.
MIN_CPU_SPEEDUP = 1.5


def check(setting: bool | str) -> None:
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


def cpu_bf16_speedup(rows: int = 1024, inner: int = 256, cols: int = 512) -> float:
    """How many times faster a (rows x inner) @ (inner x cols) product runs in bf16 than in float32."""
    generator = torch.Generator().manual_seed(0)  # not the global generator, which seeds the run
    a, b = torch.randn(rows, inner, generator=generator), torch.randn(inner, cols, generator=generator)
    return _best_seconds(a, b) / _best_seconds(a.bfloat16(), b.bfloat16())


@functools.cache
def _auto() -> bool:
    """The "auto" decision, made and said once per process."""
    if torch.cuda.is_available():
        enabled = torch.cuda.is_bf16_supported(including_emulation=False)
        why = f"this GPU {'has' if enabled else 'lacks'} native bf16"
    elif torch.backends.mps.is_available():
        enabled, why = False, "auto stays in float32 on MPS"
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Each process would time its own product on shared cores and might choose otherwise.
        enabled, why = False, "several CPU processes; set train.bf16 to true or false to choose"
    else:
        speedup = cpu_bf16_speedup()
        enabled = speedup >= MIN_CPU_SPEEDUP
        why = f"a bf16 matrix product ran {speedup:.2f}x as fast as float32 on this CPU; bf16 from {MIN_CPU_SPEEDUP}x"
    print(f"train.bf16=auto: bf16 autocast {'on' if enabled else 'off'} ({why})")
    return enabled


def bf16_enabled(setting: bool | str) -> bool:
    """Whether a run with this train.bf16 trains under bf16 autocast."""
    check(setting)
    return _auto() if setting == AUTO else setting
