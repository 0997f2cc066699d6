"""Projectors that map every vision token on its own: one linear layer (MiniMind-V)."""

from __future__ import annotations

from torch import nn

from vlmkit.model.projectors.base import Grid, GridPositions, Projector, crop_grids


class TokenwiseProjector(Projector):
    """Base of projectors that keep every token: crop i gives `prefix + h_i*w_i` tokens.

    Subclasses define `project`, applied to each row alone, so padding rows cannot leak
    into a crop's tokens.
    """

    def __init__(self, grid: Grid, prefix: int, text_dim: int, args: dict):
        super().__init__()
        self.prefix = prefix
        self.positions = GridPositions(grid, prefix, text_dim, args.get("pos_embed", False))

    @staticmethod
    def output_tokens(grid: Grid, prefix: int, args: dict) -> int:
        return prefix + grid[0] * grid[1]

    def project(self, features):
        raise NotImplementedError

    def forward(self, features, grids):
        grids = crop_grids(grids, features, self.prefix)
        longest = self.prefix + max(h * w for h, w in grids)
        return self.positions(self.project(features[:, :longest]), grids)


class LinearProjector(TokenwiseProjector):
    """One linear layer (MiniMind-V)."""

    def __init__(self, vision_dim: int, text_dim: int, args: dict, grid: Grid, prefix: int):
        super().__init__(grid, prefix, text_dim, args)
        self.linear = nn.Linear(vision_dim, text_dim)

    def project(self, features):
        return self.linear(features)
