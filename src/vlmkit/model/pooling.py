"""Pooling: the LM's last hidden states of a padded batch -> one vector per sequence.

A registry of plain functions, because users really choose: `last` suits a causal LM (only
the last token has seen the whole input), `mean` suits bidirectional attention, and
`weighted_mean` (SGPT's position-weighted mean) gives later tokens, which have seen more,
more weight. Every function reads the padding from the attention mask alone, so left and
right padding give the same vectors.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from vlmkit.errors import ConfigError


def last(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The hidden state of each sequence's last real token."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    index = torch.where(mask.bool(), positions, -1).max(dim=1).values
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]


def _weighted(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    weights = weights.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1e-9)


def mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The average over real tokens."""
    return _weighted(hidden, mask)


def weighted_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Real token i (counted from 1 among the real tokens) weighs i."""
    return _weighted(hidden, mask.cumsum(dim=1) * mask)


POOLINGS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "last": last,
    "mean": mean,
    "weighted_mean": weighted_mean,
}


def get_pooling(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if name not in POOLINGS:
        raise ConfigError(f"pooling {name!r} is not one of {', '.join(POOLINGS)}")
    return POOLINGS[name]
