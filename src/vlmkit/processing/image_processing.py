"""`VLMImageProcessor`: PIL images -> normalised crops for the vision encoder.

Written on PIL and NumPy only (no torchvision). Without slicing, each image becomes one crop
at the encoder's square input, by padding to a square with the mean colour first (LLaVA-1.5),
centre-cropping (CLIP) or squashing. With slicing (`vlmkit.processing.slicing`), an image
becomes a whole view plus slices: MiniCPM-V's adaptive slices (sizes vary with the aspect
ratio) or LLaVA-NeXT's AnyRes tiles. Saves and loads as `preprocessor_config.json` like any
transformers image processor.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from transformers.image_processing_base import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor

from vlmkit.errors import ConfigError
from vlmkit.processing import slicing

RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "lanczos": Image.LANCZOS, "nearest": Image.NEAREST}
RESIZE_MODES = ("pad", "crop", "squash")
SLICING_MODES = ("minicpm", "anyres")
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
PAD_LIMIT = 4  # images longer than this many model inputs are shrunk before padding to a square


@dataclass(frozen=True)
class ImagePlan:
    """The crops one image becomes, known from its size alone (before any pixel is decoded)."""

    crop_sizes: tuple[tuple[int, int], ...]  # (height, width) of each crop: the whole view first, then slices
    grid: tuple[int, int] | None = None  # (cols, rows) of the slices; None when the image is not sliced
    boundaries: bool = False  # the text wraps the whole view in <img>...</img> and each slice in <slice>...</slice>


class VLMImageProcessor(BaseImageProcessor):
    """Turns each image into one `size` x `size` crop, or with `slicing` a whole view plus slices."""

    model_input_names = ["pixel_values"]

    def __init__(self, size: int = 224, image_mean=CLIP_MEAN, image_std=CLIP_STD, resample: str = "bicubic",
                 resize_mode: str = "pad", slicing: str | None = None, max_slices: int = 9, multiple: int = 14,
                 **kwargs):
        super().__init__(**kwargs)
        if resize_mode not in RESIZE_MODES:
            raise ConfigError(f"resize_mode {resize_mode!r} is not one of {', '.join(RESIZE_MODES)}")
        if resample not in RESAMPLE:
            raise ConfigError(f"resample {resample!r} is not one of {', '.join(RESAMPLE)}")
        if slicing is not None and slicing not in SLICING_MODES:
            raise ConfigError(f"slicing {slicing!r} is not one of none, {', '.join(SLICING_MODES)}")
        if max_slices < 1 or multiple < 1:
            raise ConfigError(f"max_slices ({max_slices}) and multiple ({multiple}) must be at least 1")
        self.size, self.resample, self.resize_mode = int(size), resample, resize_mode
        self.image_mean, self.image_std = list(image_mean), list(image_std)
        # `multiple`: crop sides must divide into whole encoder patches (times the projector's own factor).
        self.slicing, self.max_slices, self.multiple = slicing, int(max_slices), int(multiple)

    def to_square(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        if self.resize_mode == "pad" and w != h:
            if max(w, h) > PAD_LIMIT * self.size:
                # A long strip would pad to a square of its long side (a 1:50 image at the pixel
                # limit: gigabytes); shrunk first, the canvas stays within (PAD_LIMIT * size)^2.
                scale = PAD_LIMIT * self.size / max(w, h)
                image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), RESAMPLE[self.resample])
                w, h = image.size
            side = max(w, h)
            fill = tuple(int(255 * m) for m in self.image_mean)
            canvas = Image.new("RGB", (side, side), fill)
            canvas.paste(image, ((side - w) // 2, (side - h) // 2))
            image = canvas
        elif self.resize_mode == "crop" and w != h:
            side = min(w, h)
            left, top = (w - side) // 2, (h - side) // 2
            image = image.crop((left, top, left + side, top + side))
        return image.resize((self.size, self.size), RESAMPLE[self.resample])

    def normalise(self, image: Image.Image) -> torch.Tensor:
        array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        array = (array - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        return torch.from_numpy(array.transpose(2, 0, 1).copy())

    def _max_slices(self, max_slices: int | None) -> int:
        """A request may lower the slice budget (never below the whole view alone), not raise it."""
        return self.max_slices if max_slices is None else max(1, min(int(max_slices), self.max_slices))

    def plan(self, image_size: tuple[int, int], max_slices: int | None = None) -> ImagePlan:
        """The crops an image of (width, height) becomes; `crops` returns exactly these sizes."""
        width, height = image_size
        if self.slicing is None:
            return ImagePlan(((self.size, self.size),))
        budget = self._max_slices(max_slices)
        if self.slicing == "anyres":
            cols, rows = slicing.anyres_grid(width, height, self.size, budget)
            return ImagePlan(((self.size, self.size),) * (1 + cols * rows), (cols, rows), True)
        whole, grid, refined = slicing.minicpm_sizes(width, height, self.size, budget, self.multiple)
        sizes = [(whole[1], whole[0])]
        if grid is not None:
            sizes += [(refined[1] // grid[1], refined[0] // grid[0])] * (grid[0] * grid[1])
        return ImagePlan(tuple(sizes), grid, True)

    def crops(self, image: Image.Image, max_slices: int | None = None) -> list[torch.Tensor]:
        """The normalised crops of one image, in the order their tokens appear in the text."""
        if self.slicing is None:
            return [self.normalise(self.to_square(image))]
        budget = self._max_slices(max_slices)
        if self.slicing == "anyres":
            fill = tuple(int(255 * m) for m in self.image_mean)
            sliced = slicing.anyres_tiles(image, self.size, budget, fill=fill)
        else:
            sliced = slicing.minicpm_slices(image, self.size, budget, self.multiple)
        return [self.normalise(crop) for crop in slicing.crop_order(sliced)]

    def __call__(self, images: list[Image.Image], max_slices: int | None = None, **kwargs) -> BatchFeature:
        crops = [crop for image in images for crop in self.crops(image, max_slices)]
        if not crops:
            return BatchFeature({"pixel_values": torch.zeros(0, 3, self.size, self.size)})
        return BatchFeature(batch_crops(crops))


def batch_crops(crops: list[torch.Tensor]) -> dict:
    """Crops as model inputs: stacked when they share a size, else zero-padded plus their `crop_sizes`.

    The model cuts each crop back to its size before encoding, so padding never reaches a crop's features.
    """
    sizes = [tuple(crop.shape[-2:]) for crop in crops]
    if len(set(sizes)) == 1:
        return {"pixel_values": torch.stack(crops)}
    height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
    padded = crops[0].new_zeros(len(crops), crops[0].shape[0], height, width)
    for index, crop in enumerate(crops):
        padded[index, :, : crop.shape[-2], : crop.shape[-1]] = crop
    return {"pixel_values": padded, "crop_sizes": torch.tensor(sizes, dtype=torch.long)}


def unbatch_crops(inputs: dict) -> list[torch.Tensor]:
    """The crops of `batch_crops`' output (or of any dict with `pixel_values`), each at its own size."""
    pixel_values = inputs.get("pixel_values")
    if pixel_values is None:
        return []
    sizes = inputs.get("crop_sizes")
    if sizes is None:
        return list(pixel_values)
    return [crop[:, :h, :w] for crop, (h, w) in zip(pixel_values, sizes.tolist())]


def concat_image_inputs(items: list[dict]) -> dict:
    """The image inputs of several examples, in order, as one batch (empty when none has images)."""
    crops = [crop for item in items for crop in unbatch_crops(item)]
    return batch_crops(crops) if crops else {}
