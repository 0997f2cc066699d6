"""Projectors that map every vision token on its own: one linear layer (MiniMind-V)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.model.projectors.base import Grid, GridPositions, Projector, crop_grids, divided_grid, factor_arg, map_crops


def average_pool(patches, grid: Grid, factor: int):
    """(crops, h*w, d) row-major patches -> (crops, h/f * w/f, d), each f x f block averaged."""
    crops, _, d = patches.shape
    square = patches.transpose(1, 2).reshape(crops, d, *grid)
    return F.avg_pool2d(square, factor).flatten(2).transpose(1, 2)


class TokenwiseProjector(Projector):
    """Base of projectors that map every token on its own: crop i gives `prefix + h_i*w_i` tokens,
    or `prefix + (h_i/f)*(w_i/f)` with `pool: f`.

    Subclasses define `project`, applied to each row alone, so padding rows cannot leak
    into a crop's tokens. Args shared by all: `layernorm` (a LayerNorm on the input; default
    `layernorm_default`, or on with `pos_embed`), `pos_embed` (learned grid positions) and
    `pool` (average each f x f block of patches into one token first; CLS-like prefix tokens
    are kept as they are).

    Pooling is the cheap way to fewer LM tokens (LLaVA-OneVision pools video frames so): the
    LM's work per image falls f*f times, and the pooled features stay in the encoder's space,
    so a projector starts from features a linear probe can already read, where
    `pixel_shuffle`'s f*f-times-wider inputs must be learned from scratch (docs/architectures.md).

    Positions join the features before the projection, after the LayerNorm, as a ViT adds
    them to its patch embeddings: the norm fixes the features' scale, so positions start as
    loud as the content whatever the tower. Added after the projection instead, they were
    swamped: a from-scratch tower's projected tokens grew to norm 20-30 while the positions
    stayed near 0.25, and the LM could not tell the cells apart (examples/shapes/README.md).
    """

    ARGS = frozenset({"pos_embed", "layernorm", "pool"})

    layernorm_default = False

    def __init__(self, grid: Grid, prefix: int, vision_dim: int, args: dict):
        super().__init__()
        self.prefix, self.pool = prefix, factor_arg(args, "pool", 1)
        pooled = divided_grid(grid, self.pool, "pool")
        self.norm, self.positions = GridPositions.with_norm(pooled, prefix, vision_dim, args, self.layernorm_default)

    @staticmethod
    def grid_multiple(args: dict) -> int:
        return factor_arg(args, "pool", 1)

    @staticmethod
    def output_tokens(grid: Grid, prefix: int, args: dict) -> int:
        h, w = divided_grid(grid, factor_arg(args, "pool", 1), "pool")
        return prefix + h * w

    def project(self, features):
        """The per-token map from normalised, positioned vision features to LM embeddings."""
        raise NotImplementedError

    def forward(self, features, grids):
        grids = crop_grids(grids, features, self.prefix)
        if self.pool > 1:
            pooled = map_crops(lambda p, grid: average_pool(p, grid, self.pool), features[:, self.prefix :], grids)
            features = torch.cat([features[:, : self.prefix], pooled], dim=1)
            grids = [divided_grid(grid, self.pool, "pool") for grid in grids]
        longest = self.prefix + max(h * w for h, w in grids)
        return self.project(self.positions(self.norm(features[:, :longest]), grids))


class LinearProjector(TokenwiseProjector):
    """One linear layer (MiniMind-V)."""

    def __init__(self, vision_dim: int, text_dim: int, args: dict, grid: Grid, prefix: int):
        super().__init__(grid, prefix, vision_dim, args)
        self.linear = nn.Linear(vision_dim, text_dim)

    def project(self, features):
        return self.linear(features)
