"""How many `<image>` tokens one image crop becomes: the single source of that number.

The processor calls `num_image_tokens` to expand each `<image>` marker, and the model calls
it to check the features it produced; both read the same `image_token_spec` of the config,
so they cannot drift apart.
"""

from __future__ import annotations

from vlmkit.model import vision
from vlmkit.model.projectors import projector_class


def image_token_spec(config) -> dict:
    """The few numbers from a VLMConfig that decide the token count, as a JSON-able dict."""
    return {
        "projector_type": config.projector_type,
        "projector_args": dict(config.projector_args),
        "grid": list(vision.patch_grid(config)),
        "prefix": vision.prefix_tokens(config.vision_config, config.vision_feature_select_strategy),
        "input_size": vision.input_size(config),
    }


def num_image_tokens(spec: dict) -> int:
    """Tokens one crop of `spec["input_size"]` pixels becomes after encoder and projector."""
    cls = projector_class(spec["projector_type"])
    return cls.output_tokens(tuple(spec["grid"]), spec["prefix"], spec["projector_args"])
