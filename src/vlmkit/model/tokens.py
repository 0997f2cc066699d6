"""How many `<image>` tokens one image crop becomes: the single source of that number.

The processor calls `num_image_tokens` to expand each `<image>` marker, and the model calls
it to check the features it produced; both read the same `image_token_spec` of the config,
so they cannot drift apart.
"""

from __future__ import annotations

from vlmkit.model import vision
from vlmkit.model.projectors import projector_class

IGNORE_INDEX = -100  # a label no loss is taken on (transformers' and torch's convention)


def image_token_spec(config) -> dict:
    """The few numbers from a VLMConfig that decide the token count, as a JSON-able dict."""
    return {
        "projector_type": config.projector_type,
        "projector_args": dict(config.projector_args),
        "grid": list(vision.patch_grid(config)),
        "prefix": vision.prefix_tokens(config.vision_config, config.vision_feature_select_strategy),
        "input_size": vision.input_size(config),
        "stride": vision.stride(config.vision_config),
    }


def num_image_tokens(spec: dict, grid: tuple[int, int] | None = None) -> int:
    """Tokens one crop becomes after encoder and projector.

    By default the crop is the square of `spec["input_size"]` pixels; `grid` gives the
    (h, w) patch grid of a crop of another size instead.
    """
    cls = projector_class(spec["projector_type"])
    grid = tuple(spec["grid"] if grid is None else grid)
    return cls.output_tokens(grid, spec["prefix"], spec["projector_args"])


def grid_multiple(spec: dict) -> int:
    """What both sides of a crop's patch grid must be divisible by (e.g. a pixel shuffle's factor)."""
    return projector_class(spec["projector_type"]).grid_multiple(spec["projector_args"])
