"""Encoder features of images already seen, reused while the vision encoder is frozen.

With a frozen encoder (LLaVA's first stage, LoRA on the LM alone) an image's features never
change, yet every epoch would run the encoder on it again; for a small LM the encoder can be
a third of a step. The cache keys each crop by a digest of its pixel values -- exact, since
the same pixels give the same features -- so it needs no image ids and stays right under
any data order, slicing or augmentation (an augmented crop is simply a new key).

Memory is bounded: past `max_bytes` new features are computed as usual but not stored. The
stored features live in CPU memory, whatever the encoder's device: accelerator memory is the
scarcer, and copying a crop's features back costs far less than encoding it.
"""

from __future__ import annotations

import hashlib
from typing import Callable

import torch


class FeatureCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.stored_bytes = 0
        self.features: dict[bytes, torch.Tensor] = {}
        self.hits = self.misses = 0

    def clear(self) -> None:
        self.features.clear()
        self.stored_bytes = 0

    @staticmethod
    def key(crop: torch.Tensor) -> bytes:
        data = crop.detach().to("cpu", copy=False).contiguous()
        digest = hashlib.blake2b(f"{tuple(data.shape)} {data.dtype}".encode(), digest_size=16)  # same bytes, other shape
        digest.update(data.view(torch.uint8).numpy().tobytes())
        return digest.digest()

    def encode(self, encode: Callable[[torch.Tensor], torch.Tensor], pixel_values: torch.Tensor) -> torch.Tensor:
        """`encode(pixel_values)`, running the encoder only on the crops not seen before."""
        keys = [self.key(crop) for crop in pixel_values]
        missing = [i for i, key in enumerate(keys) if key not in self.features]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        fresh = {}
        if missing:
            with torch.no_grad():
                computed = encode(pixel_values[missing])
            for i, features in zip(missing, computed):
                fresh[keys[i]] = features
                if self.stored_bytes + features.nbytes <= self.max_bytes:
                    # A copy: a view would keep the whole batch's features alive.
                    self.features[keys[i]] = features.to("cpu", copy=True)
                    self.stored_bytes += features.nbytes
        device = pixel_values.device
        return torch.stack([fresh[key] if key in fresh else self.features[key].to(device) for key in keys])
