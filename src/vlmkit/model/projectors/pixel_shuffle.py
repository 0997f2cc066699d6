"""Pixel-shuffle projector (nanoVLM, Idefics3): fold each f x f block of patches into one token.

Space-to-depth turns an (h, w, d) patch grid into (h/f, w/f, d*f*f), so a crop costs f*f
times fewer LM tokens while no feature is thrown away; a linear layer (or an MLP) then maps
the widened features to the LM. Prefix (CLS) tokens are dropped: they belong to no block.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN

from vlmkit.model.projectors.base import Grid, GridPositions, Projector, crop_grids, divided_grid, factor_arg, map_crops


def pixel_shuffle(patches: torch.Tensor, grid: Grid, factor: int) -> torch.Tensor:
    """(crops, h*w, d) row-major patches -> (crops, h/f * w/f, d*f*f).

    Output token (i, j) concatenates patches (i*f + a, j*f + b) for a, then b, in order
    (nanoVLM's and Idefics3's layout, so their weights fit).
    """
    (h, w), f = grid, factor
    crops, _, d = patches.shape
    blocks = patches.reshape(crops, h // f, f, w // f, f, d).permute(0, 1, 3, 2, 4, 5)
    return blocks.reshape(crops, (h // f) * (w // f), d * f * f)


class PixelShuffleProjector(Projector):
    """Space-to-depth by `factor` (default 2), then a linear layer, or an MLP when `hidden_size` is given.

    Other args: `act` (the MLP's activation, default "gelu"), `layernorm` (normalise the folded
    features first, as MiniMind-V's SigLIP2 projector does), `pos_embed` (learned positions).
    """

    ARGS = frozenset({"factor", "hidden_size", "act", "pos_embed", "layernorm"})

    def __init__(self, vision_dim: int, text_dim: int, args: dict, grid: Grid, prefix: int):
        super().__init__()
        self.prefix, self.factor = prefix, factor_arg(args, "factor", 2)
        wide = vision_dim * self.factor**2
        if "hidden_size" in args:
            hidden, act = args["hidden_size"], ACT2FN[args.get("act", "gelu")]
            self.proj = nn.Sequential(nn.Linear(wide, hidden), act, nn.Linear(hidden, text_dim))
        else:  # no bias, as in nanoVLM and Idefics3
            self.proj = nn.Linear(wide, text_dim, bias=False)
        # Positions join the folded features after the norm, as in TokenwiseProjector (and why).
        self.norm, self.positions = GridPositions.with_norm(divided_grid(grid, self.factor, "factor"), 0, wide, args)

    @staticmethod
    def grid_multiple(args: dict) -> int:
        return factor_arg(args, "factor", 2)

    @staticmethod
    def output_tokens(grid: Grid, prefix: int, args: dict) -> int:
        h, w = divided_grid(grid, factor_arg(args, "factor", 2), "factor")
        return h * w

    def forward(self, features, grids):
        grids = crop_grids(grids, features, self.prefix)
        out_grids = [divided_grid(grid, self.factor, "factor") for grid in grids]
        shuffled = map_crops(lambda p, grid: pixel_shuffle(p, grid, self.factor), features[:, self.prefix :], grids)
        return self.proj(self.positions(self.norm(shuffled), out_grids))
