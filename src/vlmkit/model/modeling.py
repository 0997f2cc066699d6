"""`VLMForConditionalGeneration`: vision encoder -> projector -> causal LM, as one transformers model.

The composition follows transformers' LLaVA: image features replace the `<image>`
placeholder embeddings (masked_scatter), then the language model runs as usual. The LM is
kept whole (`AutoModelForCausalLM`), so its own head, weight tying, loss and cache behave
exactly as they do alone, and GenerationMixin drives decoding with its KV cache (pixel
values are dropped after the prefill step by transformers itself).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText, GenerationMixin, PreTrainedModel

from vlmkit.errors import ImageTokenMismatchError
from vlmkit.model import vision
from vlmkit.model.configuration import VLMConfig
from vlmkit.model.feature_cache import FeatureCache
from vlmkit.model.projectors import build_projector
from vlmkit.model.tokens import IGNORE_INDEX, image_token_spec, num_image_tokens


class VLMPreTrainedModel(PreTrainedModel):
    config: VLMConfig
    config_class = VLMConfig
    base_model_prefix = ""
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True


class VLMForConditionalGeneration(VLMPreTrainedModel, GenerationMixin):
    """A vision-language model; pass `vision_tower`/`language_model` to compose already-loaded parts."""

    def __init__(self, config: VLMConfig, vision_tower: nn.Module | None = None, language_model: nn.Module | None = None):
        super().__init__(config)
        vision.check_supported(config.vision_config)
        # A composite config created without attn_implementation pushes None down to its
        # sub-configs, and an LM whose attention implementation is None silently attends
        # both ways (no causal mask). Pin it so the LM stays causal however it was built.
        for part, sub_config in ((language_model, config.text_config), (vision_tower, config.vision_config)):
            sub_config = part.config if part is not None else sub_config
            if sub_config._attn_implementation is None and not vision.is_cnn(sub_config):
                sub_config._attn_implementation = config._attn_implementation or "sdpa"
        self.vision_tower = vision.prepare_tower(vision_tower or AutoModel.from_config(config.vision_config))
        self.projector = build_projector(config)
        self.language_model = language_model or AutoModelForCausalLM.from_config(config.text_config)
        # Set by training while the encoder is frozen (vlmkit/model/feature_cache.py); never saved.
        self.feature_cache: FeatureCache | None = None
        self.post_init()

    def train(self, mode: bool = True):
        """Switch to training mode, except that a frozen part (no trainable parameter) stays in eval mode.

        A frozen part must not change: in training mode a batch-norm tower (RegNet, ConvNeXt V1
        variants) would still update its running statistics, and normalise with batch statistics
        that inference never sees. Dropout in a frozen part would only add noise to its features.
        The Trainer calls `train()` before every step, so this holds for the whole run.
        """
        super().train(mode)
        if mode:
            for part in (self.vision_tower, self.projector, self.language_model):
                if not any(param.requires_grad for param in part.parameters()):
                    part.eval()
        return self

    # Embedding access is delegated so that resize_token_embeddings, PEFT and generation work.
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    @property
    def tokens_per_crop(self) -> int:
        """Tokens of one crop at the encoder's native size (slices of other sizes: `crop_tokens`)."""
        return num_image_tokens(image_token_spec(self.config))

    def crop_tokens(self, height: int, width: int) -> int:
        grid = vision.grid_for_size(self.config.vision_config, height, width)
        return num_image_tokens(image_token_spec(self.config), grid)

    def encode_crops(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The encoder's selected features of same-size crops, from the feature cache where one is set."""
        encode = lambda crops: vision.encode(self.vision_tower, self.config, crops)  # noqa: E731
        return encode(pixel_values) if self.feature_cache is None else self.feature_cache.encode(encode, pixel_values)

    def get_image_features(self, pixel_values: torch.Tensor, crop_sizes: torch.Tensor | None = None,
                           **kwargs) -> torch.Tensor:
        """Projected features of a batch of crops, flattened to (total image tokens, text_dim).

        `crop_sizes` (crops, 2) gives each crop's true (height, width) when crops of several
        sizes were padded into one tensor (slicing); crops of one size are encoded together,
        and the projector sees each crop's own grid, so padding never changes a crop's tokens.
        """
        cfg = self.config
        pixel_values = pixel_values.to(dtype=self.vision_tower.dtype)
        if crop_sizes is None:
            sizes = [tuple(pixel_values.shape[-2:])] * pixel_values.shape[0]
        else:
            sizes = [tuple(int(v) for v in size) for size in crop_sizes.tolist()]
        groups: dict[tuple[int, int], list[int]] = {}
        for index, size in enumerate(sizes):
            groups.setdefault(size, []).append(index)
        grids = [vision.grid_for_size(cfg.vision_config, *size) for size in sizes]
        if len(groups) == 1:
            height, width = sizes[0]
            features = self.encode_crops(pixel_values[..., :height, :width])
            projected = self.projector(features, grids[0])
        else:
            encoded: list[torch.Tensor | None] = [None] * len(sizes)
            for (height, width), indices in groups.items():
                features = self.encode_crops(pixel_values[indices, :, :height, :width])
                for index, feature in zip(indices, features):
                    encoded[index] = feature
            projected = self.projector(nn.utils.rnn.pad_sequence(encoded, batch_first=True), grids)
        counts = [self.crop_tokens(*size) for size in sizes]
        if projected.shape[1] < max(counts) or (len(groups) == 1 and projected.shape[1] != counts[0]):
            raise ImageTokenMismatchError(
                f"projector {cfg.projector_type!r} returned {projected.shape[1]} tokens per crop but "
                f"num_image_tokens() says {max(counts)}; the projector's output_tokens is wrong"
            )
        if len(groups) == 1:
            return projected.reshape(-1, projected.shape[-1])
        return torch.cat([crop[:n] for crop, n in zip(projected, counts)])

    def merge_image_features(self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor, pixel_values,
                             crop_sizes: torch.Tensor | None = None) -> torch.Tensor:
        """Put the image features at the `<image>` placeholder positions, checking the counts agree."""
        placeholders = input_ids == self.config.image_token_id
        n_placeholders = int(placeholders.sum())
        if pixel_values is None:
            if n_placeholders:
                raise ImageTokenMismatchError(
                    f"the input has {n_placeholders} <image> placeholder tokens but no pixel_values were given"
                )
            return inputs_embeds
        features = self.get_image_features(pixel_values, crop_sizes)
        if n_placeholders != features.shape[0]:
            crops = pixel_values.shape[0]
            raise ImageTokenMismatchError(
                f"the input has {n_placeholders} <image> placeholder tokens but its {crops} image crop(s) give "
                f"{features.shape[0]} features; build inputs with this model's processor (it expands each "
                "<image> marker to the right count) and never truncate inside an image"
            )
        mask = placeholders.unsqueeze(-1).expand_as(inputs_embeds)
        return inputs_embeds.masked_scatter(mask, features.to(inputs_embeds.dtype))

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        crop_sizes: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ):
        """Same contract as the LM's forward, plus `pixel_values` (crops, 3, H, W) for the `<image>` tokens
        (and `crop_sizes` when crops of several sizes were padded together). In training mode with
        `labels`, the logits are those of the supervised positions only, flattened to (positions, vocab).

        Extra keyword arguments (such as the Trainer's `num_items_in_batch`, which makes the
        loss a sum over the whole accumulation window divided by its supervised-token count)
        go straight to the language model.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
            inputs_embeds = self.merge_image_features(input_ids, inputs_embeds, pixel_values, crop_sizes)
        elif pixel_values is not None:
            raise ValueError("pixel_values need input_ids to find the <image> placeholders")
        # TRL's fused LM head on the LM (DPO: train/dpo.py) scores only the labelled positions by itself.
        fused = kwargs.get("fused_lm_head", False)
        if labels is not None and self.training and not fused and isinstance(logits_to_keep, int) and not logits_to_keep:
            # Training needs logits only where the next token is supervised: about a tenth of a
            # chat sample's positions, and the LM head is a sixth of a small LM's work. The LM
            # scores those positions alone and computes its own loss on the labels they predict.
            shifted = nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
            logits_to_keep = shifted != IGNORE_INDEX
            kwargs["shift_labels"] = shifted[logits_to_keep]
        if past_key_values is not None:
            # Passed on only when given: transformers 5.24 renamed the LM's argument to `cache` (which
            # generation now passes through **kwargs) and warns whenever the old name is set, even to None.
            kwargs["past_key_values"] = past_key_values
        return self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )


__all__ = ["VLMForConditionalGeneration", "VLMPreTrainedModel"]

AutoModelForImageTextToText.register(VLMConfig, VLMForConditionalGeneration, exist_ok=True)
