"""What vlmkit needs to know about each kind of vision encoder, in one place.

The encoders are transformers models built with `AutoModel`: vision transformers (CLIP,
SigLIP, SigLIP2, DINOv2, ViT, and generally any model that takes `pixel_values` and returns
a sequence of patch features, with or without CLS or register tokens before them) and
convolutional networks (RegNet, ResNet, ConvNeXt). This module only answers: how big is the
square input, what grid of feature tokens comes out (plus any prefix tokens), how wide are
they, and how to run the encoder to get them.

A vision transformer of a family not listed below is probed once when it is first composed:
one forward pass at its native size says how many tokens come before the patches, and that
count is saved in its config (`PREFIX_ATTRIBUTE`), so a saved model never needs the probe.

Why convolutional encoders: trained from random weights, a small CNN learns shapes many
times faster than a ViT of the same cost, so the tiny from-scratch recipe uses one.
"""

from __future__ import annotations

import inspect
import math

import torch
from torch import nn
from transformers import PreTrainedConfig

from vlmkit.errors import ConfigError

# Tokens before the patch grid in each known family's hidden states (CLS, distillation, registers).
VIT_PREFIX_TOKENS = {"clip_vision_model": 1, "siglip_vision_model": 0, "siglip2_vision_model": 0, "dinov2": 1,
                     "vit": 1, "deit": 2}
CNN_TYPES = ("regnet", "resnet", "convnext")
PREFIX_ATTRIBUTE = "vlmkit_prefix_tokens"  # the probed count, for families not in VIT_PREFIX_TOKENS
# Sub-modules whose output never reaches the projector: frozen so that no optimizer or DDP
# bucket waits for gradients they will never get.
UNUSED_MODULES = ("post_layernorm", "head")


def check_supported(vision_config: PreTrainedConfig) -> None:
    """A CNN of a known family, or a vision transformer: something with a patch size and a width."""
    c = vision_config
    if c.model_type in CNN_TYPES or (getattr(c, "patch_size", None) and getattr(c, "hidden_size", None)):
        return
    raise ConfigError(
        f"vision encoder type {c.model_type!r} is not supported: vlmkit takes a vision transformer (a config "
        f"with patch_size and hidden_size, such as {', '.join(VIT_PREFIX_TOKENS)}) or a {'/'.join(CNN_TYPES)} CNN"
    )


def vit_prefix_tokens(vision_config: PreTrainedConfig) -> int:
    """Tokens before the patches in a vision transformer's hidden states."""
    c = vision_config
    if c.model_type == "dinov2_with_registers":
        return 1 + c.num_register_tokens
    if c.model_type in VIT_PREFIX_TOKENS:
        return VIT_PREFIX_TOKENS[c.model_type]
    count = getattr(c, PREFIX_ATTRIBUTE, None)
    if count is None:
        raise ConfigError(f"the {c.model_type!r} vision config does not say how many tokens precede its patches; "
                          "compose it from a checkpoint or a config through vlmkit.model.build, which probes it")
    return count


def probe_prefix_tokens(tower: nn.Module) -> None:
    """Count the prefix tokens of an unlisted vision transformer with one forward pass, and record them."""
    c = tower.config
    if is_cnn(c) or c.model_type in VIT_PREFIX_TOKENS or c.model_type == "dinov2_with_registers":
        return
    side, channels = native_size(c), getattr(c, "num_channels", 3)
    with torch.no_grad():
        pixels = torch.zeros(1, channels, side, side, dtype=tower.dtype)
        hidden = tower(pixel_values=pixels, output_hidden_states=True, return_dict=True).hidden_states[-1]
    patches = (side // stride(c)) ** 2
    if hidden.dim() != 3 or hidden.shape[1] < patches:
        raise ConfigError(f"the {c.model_type!r} vision model gave hidden states of shape {tuple(hidden.shape)} for "
                          f"a {side}px image, not a sequence of at least {patches} patch features")
    setattr(c, PREFIX_ATTRIBUTE, hidden.shape[1] - patches)


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


def native_size(vision_config: PreTrainedConfig) -> int:
    """Side of the square image a vision transformer was trained on (its position grid), in pixels."""
    c = vision_config
    if c.model_type == "siglip2_vision_model":
        # SigLIP2 (NaFlex) takes any grid up to num_patches; vlmkit feeds it the largest square.
        return math.isqrt(c.num_patches) * stride(c)
    size = c.image_size
    return size if isinstance(size, int) else int(size[0])


def input_size(config) -> int:
    """Side of the square image the encoder takes, in pixels (`config` is a VLMConfig): the model's
    `image_size` when set (a ViT then interpolates its positions), else the tower's native size."""
    c = config.vision_config
    if is_cnn(c):
        if not config.image_size:
            raise ConfigError(f"a {c.model_type} encoder has no input size of its own; set model image_size")
        return config.image_size
    return config.image_size or native_size(c)


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
                          f"stride {s}; choose image sizes that are")
    return height // s, width // s


def feature_size(vision_config: PreTrainedConfig) -> int:
    return vision_config.hidden_sizes[-1] if is_cnn(vision_config) else vision_config.hidden_size


def feature_layers(config) -> list[int]:
    """The hidden states that feed the projector: `vision_feature_layer`, one index or a list of them.

    Several layers are concatenated along the width, as transformers' LLaVA does with a list:
    deep layers carry what the image shows, earlier ones what a self-supervised encoder such as
    DINOv2 learnt to discard on the way (colour, under its colour-jitter augmentation).
    """
    layer = config.vision_feature_layer
    return list(layer) if isinstance(layer, (list, tuple)) else [layer]


def prefix_tokens(vision_config: PreTrainedConfig, select_strategy: str) -> int:
    """Prefix tokens that reach the projector: the CLS token is kept only with strategy 'full'."""
    check_supported(vision_config)
    if is_cnn(vision_config) or select_strategy != "full":
        return 0
    return vit_prefix_tokens(vision_config)


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
    c = config.vision_config
    kwargs = {}
    if not is_cnn(c) and tuple(pixel_values.shape[-2:]) != (native_size(c),) * 2 and _takes_interpolation(tower):
        kwargs["interpolate_pos_encoding"] = True  # DINOv2 interpolates always, and takes no such flag
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
    channels = 1 if is_cnn(c) else -1  # a CNN's feature maps are (batch, channels, height, width)
    hidden = torch.cat([out.hidden_states[layer] for layer in feature_layers(config)], dim=channels)
    if is_cnn(c):
        grid = grid_for_size(c, *pixel_values.shape[-2:])
        if tuple(hidden.shape[-2:]) != grid:
            raise ConfigError(f"the {c.model_type} encoder gave a {tuple(hidden.shape[-2:])} feature map, not the "
                              f"expected {grid}; choose image_size as a multiple of its stride {stride(c)}")
        return hidden.flatten(2).transpose(1, 2)
    drop = vit_prefix_tokens(c) - prefix_tokens(c, config.vision_feature_select_strategy)
    return hidden[:, drop:]


def _takes_interpolation(tower: nn.Module) -> bool:
    return "interpolate_pos_encoding" in inspect.signature(tower.forward).parameters
