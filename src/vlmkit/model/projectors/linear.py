"""Projectors that map every vision token on its own: one linear layer (MiniMind-V)."""

from __future__ import annotations

from torch import nn

from vlmkit.model.projectors.base import Grid, GridPositions, Projector, crop_grids


class TokenwiseProjector(Projector):
    """Base of projectors that keep every token: crop i gives `prefix + h_i*w_i` tokens.

    Subclasses define `project`, applied to each row alone, so padding rows cannot leak
    into a crop's tokens. Args shared by all: `layernorm` (a LayerNorm on the input; default
    `layernorm_default`, or on with `pos_embed`) and `pos_embed` (learned grid positions).

    Positions join the features before the projection, after the LayerNorm, as a ViT adds
    them to its patch embeddings: the norm fixes the features' scale, so positions start as
    loud as the content whatever the tower. Added after the projection instead, they were
    swamped: a from-scratch tower's projected tokens grew to norm 20-30 while the positions
    stayed near 0.25, and the LM could not tell the cells apart (examples/shapes/README.md).
    """

    ARGS = frozenset({"pos_embed", "layernorm"})

    layernorm_default = False

    def __init__(self, grid: Grid, prefix: int, vision_dim: int, args: dict):
        super().__init__()
        self.prefix = prefix
        self.norm, self.positions = GridPositions.with_norm(grid, prefix, vision_dim, args, self.layernorm_default)

    @staticmethod
    def output_tokens(grid: Grid, prefix: int, args: dict) -> int:
        return prefix + grid[0] * grid[1]

    def project(self, features):
        """The per-token map from normalised, positioned vision features to LM embeddings."""
        raise NotImplementedError

    def forward(self, features, grids):
        grids = crop_grids(grids, features, self.prefix)
        longest = self.prefix + max(h * w for h, w in grids)
        return self.project(self.positions(self.norm(features[:, :longest]), grids))


class LinearProjector(TokenwiseProjector):
    """One linear layer (MiniMind-V)."""

    def __init__(self, vision_dim: int, text_dim: int, args: dict, grid: Grid, prefix: int):
        super().__init__(grid, prefix, vision_dim, args)
        self.linear = nn.Linear(vision_dim, text_dim)

    def project(self, features):
        return self.linear(features)
