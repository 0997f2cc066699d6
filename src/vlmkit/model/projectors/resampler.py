"""Perceiver-style resampler (MiniCPM-V): a fixed number of learned queries attend to the patches.

Every crop becomes `num_queries` tokens whatever its grid, so the LM's cost per crop is
fixed. Parameter names follow MiniCPM-V's `Resampler` (query, kv_proj, attn, ln_q, ln_kv,
ln_post, proj) so its weights map over one to one.
"""

from __future__ import annotations

import torch
from torch import nn

from vlmkit.errors import ConfigError
from vlmkit.model.projectors.base import Grid, Projector, crop_grids, pad_crops, valid_mask


def sincos_2d(dim: int, grid: Grid, device=None) -> torch.Tensor:
    """(h*w, dim) fixed 2D sin-cos positions of a row-major grid, laid out as MiniCPM-V's.

    The first half of each vector encodes the column, the second half the row; each half
    is [sin, cos] of the position times frequencies 1 / 10000^(k / (dim/4)).
    """
    h, w = grid
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float32, device=device) / (dim / 4))
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float32, device=device),
                                torch.arange(w, dtype=torch.float32, device=device), indexing="ij")
    parts = [angle.reshape(-1, 1) * omega for angle in (cols, rows)]
    return torch.cat([torch.cat([part.sin(), part.cos()], dim=-1) for part in parts], dim=-1)


def attention_heads(args: dict, width: int, name: str) -> int:
    """`args["heads"]`, by default one per 64 channels (at least one); it must divide `width`."""
    heads = args.get("heads", max(1, width // 64))
    if not isinstance(heads, int) or heads < 1 or width % heads:
        raise ConfigError(f"projector_args.heads = {heads!r} must be a positive integer dividing the {name} "
                          f"projector's width {width}")
    return heads


def query_count(args: dict, default: int) -> int:
    n = args.get("num_queries", default)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"projector_args.num_queries must be a positive integer, not {n!r}")
    return n


class ResamplerProjector(Projector):
    """`num_queries` (default 64) learned queries, one cross-attention layer with `heads` heads.

    Keys and values are the patches, mapped to the LM's width and normalised; the keys also
    get 2D sin-cos positions of each crop's own grid, so crops of any shape work. Prefix
    (CLS) tokens are dropped: they have no place on the grid.
    """

    ARGS = frozenset({"heads", "num_queries"})

    def __init__(self, vision_dim: int, text_dim: int, args: dict, grid: Grid, prefix: int):
        super().__init__()
        if text_dim % 4:
            raise ConfigError(f"the resampler's 2D sin-cos positions need an LM width divisible by 4, not {text_dim}")
        self.prefix, self.text_dim = prefix, text_dim
        self.query = nn.Parameter(torch.randn(query_count(args, 64), text_dim) * 0.02)
        self.kv_proj = nn.Linear(vision_dim, text_dim, bias=False)
        heads = attention_heads(args, text_dim, "resampler")
        self.attn = nn.MultiheadAttention(text_dim, heads, batch_first=True)
        self.ln_q, self.ln_kv, self.ln_post = (nn.LayerNorm(text_dim) for _ in range(3))
        self.proj = nn.Parameter(text_dim**-0.5 * torch.randn(text_dim, text_dim))

    @staticmethod
    def output_tokens(grid: Grid, prefix: int, args: dict) -> int:
        return query_count(args, 64)

    @torch.no_grad()
    def scale_output_(self, factor: float) -> None:
        self.proj.mul_(factor)

    def forward(self, features, grids):
        grids = crop_grids(grids, features, self.prefix)
        lengths = [h * w for h, w in grids]
        patches = features[:, self.prefix : self.prefix + max(lengths)]
        valid = valid_mask(lengths, patches.shape[1], patches.device)
        # Zeroed padding: its attention weight is 0, but 0 * NaN would still poison the sum.
        kv = self.ln_kv(self.kv_proj(patches)).masked_fill(~valid[..., None], 0.0)
        positions = pad_crops([sincos_2d(self.text_dim, grid, kv.device) for grid in grids]).to(kv.dtype)
        query = self.ln_q(self.query).expand(len(grids), -1, -1)
        out, _ = self.attn(query, kv + positions, kv, key_padding_mask=~valid, need_weights=False)
        return self.ln_post(out) @ self.proj
