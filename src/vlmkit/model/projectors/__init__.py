"""Projectors: vision features -> LM embeddings, chosen by name from `PROJECTORS`.

Every projector is called as `projector(features, grids)` with (crops, prefix + h*w,
vision_dim) features and one shared (h, w) patch grid or one per crop (see `base`), and
says how many tokens a crop becomes through its `output_tokens` -- the only place that
number is decided (see `vlmkit.model.tokens`) -- and what the grid's sides must be
divisible by through `grid_multiple`. One file per kind.
"""

from __future__ import annotations

from torch import nn

from vlmkit.errors import ConfigError
from vlmkit.model.projectors.base import GridPositions, Projector
from vlmkit.model.projectors.linear import LinearProjector
from vlmkit.model.projectors.mlp import LayerNormMLPProjector, MLPProjector
from vlmkit.model.projectors.pixel_shuffle import PixelShuffleProjector
from vlmkit.model.projectors.qformer import QFormerProjector
from vlmkit.model.projectors.resampler import ResamplerProjector

PROJECTORS: dict[str, type[Projector]] = {
    "linear": LinearProjector,
    "mlp": MLPProjector,
    "layernorm_mlp": LayerNormMLPProjector,
    "pixel_shuffle": PixelShuffleProjector,
    "resampler": ResamplerProjector,
    "qformer": QFormerProjector,
}


def projector_class(name: str) -> type[Projector]:
    """The projector class registered as `name`; ConfigError listing the choices otherwise."""
    if name not in PROJECTORS:
        raise ConfigError(f"unknown projector_type {name!r}; choose one of {', '.join(sorted(PROJECTORS))}")
    return PROJECTORS[name]


def build_projector(config) -> nn.Module:
    """The projector named by a VLMConfig, sized from its vision and text configs."""
    from vlmkit.model import vision

    cls = projector_class(config.projector_type)
    unknown = set(config.projector_args) - cls.ARGS
    if unknown:
        raise ConfigError(f"projector_args {sorted(unknown)} mean nothing to the {config.projector_type} projector; "
                          f"it reads {sorted(cls.ARGS) or 'none'} (YAML needs a space: `key: value`)")
    grid = vision.patch_grid(config)
    prefix = vision.prefix_tokens(config.vision_config, config.vision_feature_select_strategy)
    width = vision.feature_size(config.vision_config) * len(vision.feature_layers(config))
    return cls(width, config.text_config.hidden_size, config.projector_args,
               grid, prefix)


__all__ = ["PROJECTORS", "GridPositions", "Projector", "build_projector", "projector_class"]
