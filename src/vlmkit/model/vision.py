"""What vlmkit needs to know about each kind of vision encoder, in one place.

The encoders are transformers models built with `AutoModel`: vision transformers (CLIP,
SigLIP, SigLIP2 vision models) and convolutional networks (RegNet, ResNet, ConvNeXt). This
module only answers: how big is the square input, what grid of feature tokens comes out
(plus any CLS prefix), how wide are they, and how to run the encoder to get them.

Why convolutional encoders: trained from random weights, a small CNN learns shapes many
times faster than a ViT of the same cost (measured in docs/design.md), so the tiny
from-scratch recipe uses one; pretrained CLIP/SigLIP towers are for real models.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import PreTrainedConfig

from vlmkit.errors import ConfigError

VIT_PREFIX_TOKENS = {"clip_vision_model": 1, "siglip_vision_model": 0, "siglip2_vision_model": 0}
CNN_TYPES = ("regnet", "resnet", "convnext")
# Sub-modules whose output never reaches the projector: frozen so that no optimizer or DDP
# bucket waits for gradients they will never get.
UNUSED_MODULES = ("post_layernorm", "head")


def check_supported(vision_config: PreTrainedConfig) -> None:
    if vision_config.model_type not in (*VIT_PREFIX_TOKENS, *CNN_TYPES):
        raise ConfigError(
            f"vision encoder type {vision_config.model_type!r} is not supported; use one of "
            f"{', '.join((*VIT_PREFIX_TOKENS, *CNN_TYPES))} (a checkpoint or a config)"
        )


def is_cnn(vision_config: PreTrainedConfig) -> bool:
    return vision_config.model_type in CNN_TYPES


def stride(vision_config: PreTrainedConfig) -> int:
    """Pixels per output token along each side."""
    c = vision_config
    if c.model_type == "regnet":  # stride-2 stem, then every stage halves (the first one optionally)
        return 2 * 2 ** (len(c.hidden_sizes) - (0 if c.downsample_in_first_stage else 1))
    if c.model_type == "resnet":  # stride-4 stem (conv + max-pool), then stages as in regnet
        return 4 * 2 ** (len(c.hidden_sizes) - (0 if c.downsample_in_first_stage else 1))
    if c.model_type == "convnext":  # patchify stem, then every later stage halves
        return c.patch_size * 2 ** (c.num_stages - 1)
    size = c.patch_size
    return size if isinstance(size, int) else int(size[0])


def input_size(config) -> int:
    """Side of the square image the encoder takes, in pixels (`config` is a VLMConfig)."""
    c = config.vision_config
    if is_cnn(c):
        if not config.image_size:
            raise ConfigError(f"a {c.model_type} encoder has no input size of its own; set model image_size")
        return config.image_size
    if c.model_type == "siglip2_vision_model":
        # SigLIP2 (NaFlex) takes any grid up to num_patches; vlmkit feeds it the largest square.
        return math.isqrt(c.num_patches) * stride(c)
    return c.image_size


def patch_grid(config) -> tuple[int, int]:
    """The (rows, cols) feature grid of the encoder's native square input."""
    side = input_size(config) // stride(config.vision_config)
    return side, side


def grid_for_size(vision_config: PreTrainedConfig, height: int, width: int) -> tuple[int, int]:
    """The (rows, cols) feature grid of a crop of `height` x `width` pixels (slices need not be square).

    A ViT's patch convolution drops pixels left over past the last whole patch (384 px at patch
    14 gives 27 patches), so the grid rounds down; a CNN's crops must divide by its stride.
    """
    s = stride(vision_config)
    if is_cnn(vision_config) and (height % s or width % s):
        raise ConfigError(f"a {height}x{width} crop is not a multiple of the {vision_config.model_type} encoder's "
                          f"stride {s}; choose image sizes that are")  # fmt: skip
    return height // s, width // s


def feature_size(vision_config: PreTrainedConfig) -> int:
    return vision_config.hidden_sizes[-1] if is_cnn(vision_config) else vision_config.hidden_size


def prefix_tokens(vision_config: PreTrainedConfig, select_strategy: str) -> int:
    """Prefix tokens that reach the projector: the CLS token is kept only with strategy 'full'."""
    check_supported(vision_config)
    return VIT_PREFIX_TOKENS.get(vision_config.model_type, 0) if select_strategy == "full" else 0


def prepare_tower(tower: nn.Module) -> nn.Module:
    """Freeze the encoder parts whose output vlmkit never uses (pooled output, pooling head)."""
    for name, module in tower.named_modules():
        if name.split(".")[-1] in UNUSED_MODULES:
            module.requires_grad_(False)
    return tower


def encode(tower: nn.Module, config, pixel_values: torch.Tensor) -> torch.Tensor:
    """The selected hidden state of the encoder for a batch of same-size crops: (crops, tokens, width).

    Crops other than the native square (slices) go through ViTs with their position
    embeddings interpolated, as MiniCPM-V and LLaVA-NeXT do; CNNs take any size as is.
    """
    c, layer = config.vision_config, config.vision_feature_layer
    kwargs = {}
    native = (input_size(config),) * 2
    if c.model_type in ("clip_vision_model", "siglip_vision_model") and tuple(pixel_values.shape[-2:]) != native:
        kwargs["interpolate_pos_encoding"] = True
    if c.model_type == "siglip2_vision_model":
        # SigLIP2 takes flattened patches plus their grid; patch order matches its image processor.
        p = stride(c)
        b, ch, h, w = pixel_values.shape
        patches = pixel_values.reshape(b, ch, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, -1, p * p * ch)
        kwargs["pixel_attention_mask"] = torch.ones(patches.shape[:2], dtype=torch.long, device=patches.device)
        kwargs["spatial_shapes"] = torch.tensor([[h // p, w // p]] * b, device=patches.device)
        pixel_values = patches
    if is_cnn(c):
        # oneDNN's convolutions run a quarter to a third faster on channels-last input on a CPU
        # (the weights can stay as they are, and so can every checkpoint).
        pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
    out = tower(pixel_values=pixel_values, output_hidden_states=True, return_dict=True, **kwargs)
    hidden = out.hidden_states[layer]
    if is_cnn(c):
        grid = grid_for_size(c, *pixel_values.shape[-2:])
        if tuple(hidden.shape[-2:]) != grid:
            raise ConfigError(f"the {c.model_type} encoder gave a {tuple(hidden.shape[-2:])} feature map, not the "
                              f"expected {grid}; choose image_size as a multiple of its stride {stride(c)}")  # fmt: skip
        return hidden.flatten(2).transpose(1, 2)
    drop = VIT_PREFIX_TOKENS[c.model_type] - prefix_tokens(c, config.vision_feature_select_strategy)
    return hidden[:, drop:]
