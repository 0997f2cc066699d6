"""Projectors: vision features -> LM embeddings, chosen by name from `PROJECTORS`.

Every projector takes (crops, prefix + h*w, vision_dim) features of an h x w patch grid and
returns (crops, T, text_dim), and says how big T is through `output_tokens` -- the only
place that number is decided (see `vlmkit.model.tokens`).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN

from vlmkit.errors import ConfigError


class GridPositions(nn.Module):
    """Optional learned position embedding per output token (`pos_embed: true`).

    Convolutional encoders say nothing about where a feature is, and an LM's rotary
    positions do not reach attention values, so "where is it?" needs this.
    """

    def __init__(self, n_tokens: int, text_dim: int, enabled: bool):
        super().__init__()
        self.embedding = nn.Parameter(torch.zeros(n_tokens, text_dim)) if enabled else None

    def forward(self, tokens):
        return tokens if self.embedding is None else tokens + self.embedding[: tokens.shape[1]]


class LinearProjector(nn.Module):
    """One linear layer (MiniMind-V)."""

    def __init__(self, vision_dim: int, text_dim: int, args: dict, grid: tuple[int, int], prefix: int):
        super().__init__()
        self.linear = nn.Linear(vision_dim, text_dim)
        self.positions = GridPositions(self.output_tokens(grid, prefix, args), text_dim, args.get("pos_embed", False))

    @staticmethod
    def output_tokens(grid: tuple[int, int], prefix: int, args: dict) -> int:
        return prefix + grid[0] * grid[1]

    def forward(self, features, grid):
        return self.positions(self.linear(features))


class MLPProjector(nn.Module):
    """Two linear layers with an activation between them (LLaVA-1.5, Basic-Visual-Language-Model)."""

    def __init__(self, vision_dim: int, text_dim: int, args: dict, grid: tuple[int, int], prefix: int):
        super().__init__()
        hidden = args.get("hidden_size", text_dim)
        self.norm = nn.LayerNorm(vision_dim) if args.get("layernorm", False) else nn.Identity()
        self.linear_1 = nn.Linear(vision_dim, hidden)
        self.act = ACT2FN[args.get("act", "gelu")]
        self.linear_2 = nn.Linear(hidden, text_dim)
        self.positions = GridPositions(self.output_tokens(grid, prefix, args), text_dim, args.get("pos_embed", False))

    output_tokens = staticmethod(LinearProjector.output_tokens)

    def forward(self, features, grid):
        return self.positions(self.linear_2(self.act(self.linear_1(self.norm(features)))))


PROJECTORS: dict[str, type[nn.Module]] = {
    "linear": LinearProjector,
    "mlp": MLPProjector,
}


def projector_class(name: str) -> type[nn.Module]:
    if name not in PROJECTORS:
        raise ConfigError(f"unknown projector_type {name!r}; choose one of {', '.join(sorted(PROJECTORS))}")
    return PROJECTORS[name]


def build_projector(config) -> nn.Module:
    """The projector named by a VLMConfig, sized from its vision and text configs."""
    from vlmkit.model import vision

    cls = projector_class(config.projector_type)
    grid = vision.patch_grid(config)
    prefix = vision.prefix_tokens(config.vision_config, config.vision_feature_select_strategy)
    return cls(vision.feature_size(config.vision_config), config.text_config.hidden_size, config.projector_args,
               grid, prefix)  # fmt: skip
