"""`VLMConfig`: a vision encoder config, a projector choice and a causal LM config, composed.

Follows transformers' composite-config convention (as LlavaConfig does): `vision_config`
and `text_config` are any configs that `AutoModel` / `AutoModelForCausalLM` can build, so
save/load, the Auto classes and PEFT work unchanged.
"""

from __future__ import annotations

from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec


@strict
class VLMConfig(PreTrainedConfig):
    r"""
    Args:
        vision_config: config of the vision encoder (CLIP, SigLIP or SigLIP2 vision model).
        text_config: config of the causal language model (Llama, Qwen2, SmolLM, ...).
        projector_type: key of `vlmkit.model.projectors.PROJECTORS`.
        projector_args: extra arguments of that projector (e.g. `num_queries` for a resampler).
        vision_feature_layer: which hidden state of the encoder feeds the projector (-1: last), or a
            list of them, concatenated along the width.
        vision_feature_select_strategy: "default" drops the encoder's CLS token when it has one,
            "full" keeps it.
        image_token_id: id of the `<image>` placeholder token in the LM's vocabulary.
        image_size: side of the square input, for encoders whose config has none (CNNs).
    """

    model_type = "vlmkit"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="clip_vision_model"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    projector_type: str = "mlp"
    projector_args: dict | None = None
    vision_feature_layer: int | list[int] = -1
    vision_feature_select_strategy: Literal["default", "full"] = "default"
    image_token_id: int | None = None
    image_size: int | None = None
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.projector_args = dict(self.projector_args or {})
        # The LM keeps its own tying decision (it lives in text_config); mirror it here so
        # transformers' top-level checks see the same answer.
        self.tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", False))


__all__ = ["VLMConfig"]

# A saved vlmkit model's config.json says model_type "vlmkit": AutoConfig reads it once this module is imported.
AutoConfig.register(VLMConfig.model_type, VLMConfig, exist_ok=True)
