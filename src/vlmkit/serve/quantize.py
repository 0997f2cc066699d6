"""`--quantize int8`: dynamic int8 quantisation of every linear layer, for CPU inference.

Linear weights are stored as int8 and each layer's input is quantised on the fly, per batch
(torch's dynamic quantisation). Embeddings, norms and attention arithmetic stay float32, so
the change is small; `benchmarks/serve_latency.py --accuracy` measures it on a test split.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from vlmkit.errors import ConfigError

QUANTIZE_CHOICES = ("int8",)


def quantize(model: nn.Module, mode: str | None) -> nn.Module:
    """`model` with its nn.Linear layers quantised in place (`mode` None: unchanged)."""
    if mode is None:
        return model
    if mode not in QUANTIZE_CHOICES:
        raise ConfigError(f"--quantize {mode!r} is not one of {', '.join(QUANTIZE_CHOICES)}")
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    if device.type != "cpu" or dtype != torch.float32:
        raise ConfigError(f"int8 dynamic quantisation needs a float32 model on the CPU, not {dtype} on {device}; "
                          "load it with device='cpu' and the default dtype")
    with warnings.catch_warnings():
        # torch marks torch.ao quantisation as deprecated in favour of torchao; it still works
        # and needs no extra package, so its notices would only alarm users.
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)
