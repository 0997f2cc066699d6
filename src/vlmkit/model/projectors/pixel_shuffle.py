"""Pixel-shuffle projector (nanoVLM, Idefics3): fold each f x f block of patches into one token.

Space-to-depth turns an (h, w, d) patch grid into (h/f, w/f, d*f*f), so a crop costs f*f
times fewer LM tokens while no feature is thrown away; a linear layer (or an MLP) then maps
the widened features to the LM. Prefix (CLS) tokens are dropped: they belong to no block.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN

from vlmkit.errors import ConfigError
from vlmkit.model.projectors.base import Grid, GridPositions, Projector, crop_grids, map_crops


def shuffle_factor(args: dict) -> int:
    factor = args.get("factor", 2)
    if not isinstance(factor, int) or isinstance(factor, bool) or factor < 1:
        raise ConfigError(f"projector_args.factor must be a positive integer, not {factor!r}")
    return factor


def shuffled_grid(grid: Grid, factor: int) -> Grid:
    """The (h/f, w/f) grid after space-to-depth; ConfigError when f does not divide both sides."""
    if grid[0] % factor or grid[1] % factor:
        raise ConfigError(f"the pixel_shuffle projector needs a patch grid divisible by its factor {factor}, but "
                          f"got a {grid[0]}x{grid[1]} grid; change the image size or projector_args.factor")
    return grid[0] // factor, grid[1] // factor


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
        self.prefix, self.factor = prefix, shuffle_factor(args)
        wide = vision_dim * self.factor**2
        if "hidden_size" in args:
            hidden, act = args["hidden_size"], ACT2FN[args.get("act", "gelu")]
            self.proj = nn.Sequential(nn.Linear(wide, hidden), act, nn.Linear(hidden, text_dim))
        else:  # no bias, as in nanoVLM and Idefics3
            self.proj = nn.Linear(wide, text_dim, bias=False)
        # Positions join the folded features after the norm, as in TokenwiseProjector (and why).
        self.norm, self.positions = GridPositions.with_norm(shuffled_grid(grid, self.factor), 0, wide, args)

    @staticmethod
    def grid_multiple(args: dict) -> int:
        return shuffle_factor(args)

    @staticmethod
    def output_tokens(grid: Grid, prefix: int, args: dict) -> int:
        h, w = shuffled_grid(grid, shuffle_factor(args))
        return h * w

    def forward(self, features, grids):
        grids = crop_grids(grids, features, self.prefix)
        out_grids = [shuffled_grid(grid, self.factor) for grid in grids]
        shuffled = map_crops(lambda p, grid: pixel_shuffle(p, grid, self.factor), features[:, self.prefix :], grids)
        return self.proj(self.positions(self.norm(shuffled), out_grids))
