"""Two-layer MLP projectors (LLaVA-1.5, Basic-Visual-Language-Model, MiniMind-V's SigLIP2 variant)."""

from __future__ import annotations

from torch import nn
from transformers.activations import ACT2FN

from vlmkit.model.projectors.base import Grid
from vlmkit.model.projectors.linear import TokenwiseProjector


class MLPProjector(TokenwiseProjector):
    """Two linear layers with an activation between them (LLaVA-1.5, Basic-Visual-Language-Model).

    Args: `hidden_size` (default: the LM's width), `act` (default "gelu"), and the shared
    `layernorm`, `pos_embed` and `pool` (`TokenwiseProjector`).
    """

    ARGS = TokenwiseProjector.ARGS | {"hidden_size", "act"}

    def __init__(self, vision_dim: int, text_dim: int, args: dict, grid: Grid, prefix: int):
        super().__init__(grid, prefix, vision_dim, args)
        hidden = args.get("hidden_size", text_dim)
        self.linear_1 = nn.Linear(vision_dim, hidden)
        self.act = ACT2FN[args.get("act", "gelu")]
        self.linear_2 = nn.Linear(hidden, text_dim)

    def project(self, features):
        return self.linear_2(self.act(self.linear_1(features)))


class LayerNormMLPProjector(MLPProjector):
    """The MLP with a LayerNorm on its input (MiniMind-V with SigLIP2); `layernorm: false` turns it off."""

    layernorm_default = True
