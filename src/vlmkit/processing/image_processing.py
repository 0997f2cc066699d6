"""`VLMImageProcessor`: PIL images -> normalised square crops for the vision encoder.

Written on PIL and NumPy only (no torchvision): resize to the encoder's square input, either
by padding to a square with the mean colour first (LLaVA-1.5), centre-cropping (CLIP) or
squashing. Saves and loads as `preprocessor_config.json` like any transformers image processor.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from transformers.image_processing_base import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor

from vlmkit.errors import ConfigError

RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "lanczos": Image.LANCZOS, "nearest": Image.NEAREST}
RESIZE_MODES = ("pad", "crop", "squash")
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


class VLMImageProcessor(BaseImageProcessor):
    """Turns each image into one `size` x `size` crop (more with slicing, see `vlmkit.processing.slicing`)."""

    model_input_names = ["pixel_values"]

    def __init__(self, size: int = 224, image_mean=CLIP_MEAN, image_std=CLIP_STD, resample: str = "bicubic",
                 resize_mode: str = "pad", **kwargs):  # fmt: skip
        super().__init__(**kwargs)
        if resize_mode not in RESIZE_MODES:
            raise ConfigError(f"resize_mode {resize_mode!r} is not one of {', '.join(RESIZE_MODES)}")
        if resample not in RESAMPLE:
            raise ConfigError(f"resample {resample!r} is not one of {', '.join(RESAMPLE)}")
        self.size, self.resample, self.resize_mode = int(size), resample, resize_mode
        self.image_mean, self.image_std = list(image_mean), list(image_std)

    def to_square(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        if self.resize_mode == "pad" and w != h:
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

    def num_crops(self, image_size: tuple[int, int]) -> int:
        """How many crops an image of (width, height) becomes; known from the header alone."""
        return 1

    def crops(self, image: Image.Image) -> list[torch.Tensor]:
        """The normalised crops of one image, in the order their tokens appear in the text."""
        return [self.normalise(self.to_square(image))]

    def __call__(self, images: list[Image.Image], **kwargs) -> BatchFeature:
        crops = [crop for image in images for crop in self.crops(image)]
        pixel_values = torch.stack(crops) if crops else torch.zeros(0, 3, self.size, self.size)
        return BatchFeature({"pixel_values": pixel_values})
