"""Model FLOPs utilisation (MFU) while training: the FLOPs a step needs over what the hardware
could do in the same time (PaLM's measure; nanoGPT prints it every step).

FLOPs per step are counted as PaLM counts them, 6 per parameter per token (2 forward, 4
backward), for the language model and the projector over the step's input tokens, image
placeholders included (`VLMTrainer.floating_point_ops`). The vision tower is left out: in the
default recipe it is frozen and its features are computed once per image and reused. The
hardware's peak is a matmul timed when training starts, in the training precision, unless
`train.peak_flops` gives it (a GPU's datasheet figure, say).
"""

from __future__ import annotations

import time

import torch

PROBE_SIDE = 1024  # a 1024^3 product: about 2 GFLOP, a few milliseconds to a few tens on a CPU


def measured_peak(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", repeats: int = 5) -> float:
    """FLOP/s of the best of `repeats` square matmuls on `device` in `dtype`."""
    a = torch.randn(PROBE_SIDE, PROBE_SIDE, device=device, dtype=dtype)
    b = torch.randn(PROBE_SIDE, PROBE_SIDE, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):  # the first sets up the kernel
        if torch.cuda.is_available() and a.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.mm(a, b)
        if a.is_cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * PROBE_SIDE**3 / best


def flops_per_token(model) -> int:
    """6 x the parameters every input token passes through in training: the LM's (embeddings left
    out, as transformers' `num_parameters(exclude_embeddings=True)` does) and the projector's."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    lm = base.language_model.num_parameters(exclude_embeddings=True)
    projector = sum(p.numel() for p in base.projector.parameters())
    return 6 * (lm + projector)
