"""Model FLOPs utilisation (MFU) while training: the FLOPs a step needs over what the hardware
could do in the same time (PaLM's measure; nanoGPT prints it every step).

FLOPs per step are counted per token of the step's input, image placeholders included
(`VLMTrainer.floating_point_ops`), for the language model and the projector: 2 per parameter
forward, 2 backward for the gradient of the activations (the projector before the LM learns,
so it flows through every layer), and 2 more per trainable parameter for the weight gradients.
With everything trained that is PaLM's 6 per parameter; with LoRA on a frozen LM it is about
4, since frozen weights get no gradient, and counting 6 would overstate the utilisation by
half. The vision tower is left out: in the default recipe it is frozen and its features are
computed once per image and reused. The hardware's peak is a matmul timed when training
starts, in the training precision, unless `train.peak_flops` gives it (a GPU's datasheet figure).
"""

from __future__ import annotations

import time

import torch

PROBE_SIDE = 2048  # a 2048^3 product: 17 GFLOP, large enough to reach a CPU's peak, a fraction of a second


def measured_peak(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", repeats: int = 3) -> float:
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
    """Training FLOPs per input token of the LM and projector (embeddings left out, as transformers'
    `num_parameters(exclude_embeddings=True)` does): 4 per parameter, and 2 more per trainable one."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    parts = [p for name, p in base.language_model.named_parameters() if "embed_tokens" not in name]
    parts += list(base.projector.parameters())
    return sum(4 * p.numel() + (2 * p.numel() if p.requires_grad else 0) for p in parts)
