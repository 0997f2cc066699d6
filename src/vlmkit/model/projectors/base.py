"""What every projector shares: the interface, per-crop grids, padding, learned grid positions.

A projector is called as `projector(features, grids)`. `features` is (crops, L, vision_dim);
`grids` is one (h, w) shared by every crop, or a list with one (h, w) per crop. Crop i's
valid rows are its first `prefix + h_i * w_i` (CLS-like prefix tokens first, then the patch
grid in row-major order); any rows after them are padding and must not change its output.
The result is (crops, T_max, text_dim): crop i's first `output_tokens((h_i, w_i), prefix,
args)` rows are its tokens, the rest padding.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from vlmkit.errors import ConfigError, ImageTokenMismatchError

Grid = tuple[int, int]


def factor_arg(args: dict, name: str, default: int) -> int:
    """`projector_args[name]`, a positive integer (a pooling or folding factor)."""
    factor = args.get(name, default)
    if not isinstance(factor, int) or isinstance(factor, bool) or factor < 1:
        raise ConfigError(f"projector_args.{name} must be a positive integer, not {factor!r}")
    return factor


def divided_grid(grid: Grid, factor: int, name: str) -> Grid:
    """The (h/f, w/f) grid of f x f blocks; ConfigError when f does not divide both sides."""
    if grid[0] % factor or grid[1] % factor:
        raise ConfigError(f"projector_args.{name} {factor} needs a patch grid divisible by it, but got a "
                          f"{grid[0]}x{grid[1]} grid; change the image size or projector_args.{name}")
    return grid[0] // factor, grid[1] // factor


class Projector(nn.Module):
    """Base class: subclasses define `output_tokens` and may narrow `grid_multiple`."""

    ARGS: frozenset[str] = frozenset()  # the projector_args keys it reads; any other is a typo

    @staticmethod
    def output_tokens(grid: Grid, prefix: int, args: dict) -> int:
        """Tokens one crop with an h x w patch grid (plus `prefix` tokens) becomes."""
        raise NotImplementedError

    @staticmethod
    def grid_multiple(args: dict) -> int:
        """What both sides of a patch grid must be divisible by (the image slicer sizes crops to fit)."""
        return 1

    @torch.no_grad()
    def scale_output_(self, factor: float) -> None:
        """Multiply every output token by `factor`: scales the last linear layer, which ends the
        projectors that have no output map of their own (override where another map ends it)."""
        last = [module for module in self.modules() if isinstance(module, nn.Linear)][-1]
        last.weight.mul_(factor)
        if last.bias is not None:
            last.bias.mul_(factor)


def crop_grids(grids, features: torch.Tensor, prefix: int) -> list[Grid]:
    """One (h, w) per crop, from a shared grid or a per-crop list, checked against the features."""
    crops, length = features.shape[:2]
    if len(grids) == 2 and all(isinstance(side, int) for side in grids):
        grids = [tuple(grids)] * crops
    grids = [(int(h), int(w)) for h, w in grids]
    if len(grids) != crops:
        raise ImageTokenMismatchError(f"got {len(grids)} patch grids for {crops} image crops; pass one per crop")
    longest = prefix + max(h * w for h, w in grids)
    if length < longest:
        raise ImageTokenMismatchError(f"the vision features have {length} rows per crop, but a {grids} grid "
                                      f"with {prefix} prefix tokens needs {longest}")
    return grids


def valid_mask(lengths: list[int], width: int, device) -> torch.Tensor:
    """(crops, width) booleans, True for the first `lengths[i]` rows of crop i."""
    return torch.arange(width, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]


def pad_crops(rows: list[torch.Tensor]) -> torch.Tensor:
    """Stack per-crop (T_i, dim) tensors into (crops, T_max, dim), zero-padded."""
    return pad_sequence(rows, batch_first=True)


def map_crops(fn: Callable[[torch.Tensor, Grid], torch.Tensor], patches: torch.Tensor, grids: list[Grid]) -> torch.Tensor:
    """`fn(patches of the crops, grid)` on each crop's valid patches: all at once when the crops
    share a grid, else crop by crop, zero-padded to the longest result."""
    if len(set(grids)) == 1:
        h, w = grids[0]
        return fn(patches[:, : h * w], (h, w))
    return pad_crops([fn(patches[i : i + 1, : h * w], (h, w))[0] for i, (h, w) in enumerate(grids)])


class GridPositions(nn.Module):
    """Optional learned position embedding per token (`pos_embed: true`), added to `dim`-wide features.

    Convolutional encoders say nothing about where a feature is, and an LM's rotary
    positions do not reach attention values, so "where is it?" needs this. The table is
    sized for the config's grid; a crop with another grid gets it bilinearly resized (the
    prefix rows are kept as they are), so row r, column c keeps meaning the same place.
    It starts at unit scale, the scale of the layer-normalised features it is meant for.
    """

    def __init__(self, grid: Grid, prefix: int, dim: int, enabled: bool):
        super().__init__()
        self.grid, self.prefix = tuple(grid), prefix
        n_tokens = prefix + grid[0] * grid[1]
        self.embedding = nn.Parameter(torch.randn(n_tokens, dim)) if enabled else None

    @classmethod
    def with_norm(cls, grid: Grid, prefix: int, dim: int, args: dict, layernorm_default: bool = False):
        """(input norm, positions) as `args` ask: positions are added after a LayerNorm, which
        `pos_embed` turns on unless `layernorm: false` says otherwise."""
        pos_embed = args.get("pos_embed", False)
        norm = nn.LayerNorm(dim) if args.get("layernorm", layernorm_default or pos_embed) else nn.Identity()
        return norm, cls(grid, prefix, dim, pos_embed)

    def table(self, grid: Grid) -> torch.Tensor:
        """The (prefix + h*w, dim) positions for one crop's grid."""
        if tuple(grid) == self.grid:
            return self.embedding
        prefix, patches = self.embedding[: self.prefix], self.embedding[self.prefix :]
        square = patches.T.reshape(1, -1, *self.grid)
        resized = F.interpolate(square, size=tuple(grid), mode="bilinear", align_corners=False)
        return torch.cat([prefix, resized.reshape(patches.shape[1], -1).T])

    def forward(self, tokens: torch.Tensor, grids: list[Grid]) -> torch.Tensor:
        if self.embedding is None:
            return tokens
        tables = {grid: self.table(grid) for grid in set(grids)}
        return tokens + pad_crops([tables[grid] for grid in grids])[:, : tokens.shape[1]]
