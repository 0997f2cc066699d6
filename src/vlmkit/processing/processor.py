"""`VLMProcessor`: images + conversations -> model inputs (and labels), saved with the model.

Each `<image>` marker in the text is expanded to as many placeholder tokens as the image's
crops produce, counted by `vlmkit.model.tokens.num_image_tokens` -- the function the model
uses too. Labels come from the chat template's generation markers: only assistant tokens
are supervised.
"""

from __future__ import annotations

import torch
from PIL import Image
from transformers import ProcessorMixin
from transformers.image_processing_base import BatchFeature

from vlmkit.data.records import IMAGE_MARKER
from vlmkit.errors import DataError
from vlmkit.model.tokens import num_image_tokens

IGNORE_INDEX = -100


class VLMProcessor(ProcessorMixin):
    """Pairs a `VLMImageProcessor` with a tokenizer that has the `<image>` token and a chat template."""

    attributes = ["image_processor", "tokenizer"]

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, image_token_spec=None, **kwargs):
        self.image_token_spec = image_token_spec
        super().__init__(image_processor, tokenizer, chat_template=chat_template or tokenizer.chat_template)

    @property
    def tokens_per_crop(self) -> int:
        return num_image_tokens(self.image_token_spec)

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(IMAGE_MARKER)

    def image_text(self, n_crops: int) -> str:
        """The placeholder string one image with `n_crops` crops becomes."""
        return IMAGE_MARKER * (n_crops * self.tokens_per_crop)

    def expand(self, texts: list[str], crops_per_image: list[int]) -> list[str]:
        """Replace the `<image>` markers of `texts`, in order, by each image's placeholder string."""
        n_markers = sum(t.count(IMAGE_MARKER) for t in texts)
        if n_markers != len(crops_per_image):
            raise DataError(f"text has {n_markers} {IMAGE_MARKER} marker(s) but {len(crops_per_image)} image(s) "
                            "were given; use one marker per image")  # fmt: skip
        crops = iter(crops_per_image)
        out = []
        for text in texts:
            pieces = text.split(IMAGE_MARKER)
            out.append(pieces[0] + "".join(self.image_text(next(crops)) + piece for piece in pieces[1:]))
        return out

    def pixel_values(self, images: list[Image.Image]) -> tuple[torch.Tensor | None, list[int]]:
        """Stacked crops of all images in order, and the crop count of each image."""
        per_image = [self.image_processor.crops(image) for image in images]
        crops = [c for image_crops in per_image for c in image_crops]
        return (torch.stack(crops) if crops else None), [len(c) for c in per_image]

    def encode_conversation(self, conversations: list[dict], images: list[Image.Image],
                            add_generation_prompt: bool = False) -> dict:  # fmt: skip
        """Token ids, labels (assistant tokens only, else -100) and pixel values of one conversation."""
        pixel_values, crops_per_image = self.pixel_values(images)
        return self.encode_text(conversations, crops_per_image, add_generation_prompt) | {"pixel_values": pixel_values}

    def encode_text(self, conversations: list[dict], crops_per_image: list[int],
                    add_generation_prompt: bool = False) -> dict:  # fmt: skip
        """The text half of `encode_conversation`, given how many crops each image has."""
        contents = self.expand([turn["content"] for turn in conversations], crops_per_image)
        expanded = [{"role": turn["role"], "content": c} for turn, c in zip(conversations, contents)]
        encoded = self.tokenizer.apply_chat_template(
            expanded, chat_template=self.chat_template, tokenize=True, return_dict=True,
            return_assistant_tokens_mask=not add_generation_prompt, add_generation_prompt=add_generation_prompt,
        )  # fmt: skip
        input_ids = torch.tensor(encoded["input_ids"], dtype=torch.long)
        if add_generation_prompt:
            labels = torch.full_like(input_ids, IGNORE_INDEX)
        else:
            mask = torch.tensor(encoded["assistant_masks"], dtype=torch.bool) & (input_ids != self.image_token_id)
            labels = torch.where(mask, input_ids, IGNORE_INDEX)
        return {"input_ids": input_ids, "labels": labels}

    def __call__(self, text: str | list[str] | None = None, images=None, padding: bool = True,
                 return_tensors: str = "pt", **kwargs) -> BatchFeature:  # fmt: skip
        """transformers-style call: prompt text(s) with `<image>` markers and the images in order."""
        texts = [text] if isinstance(text, str) else list(text or [])
        images = [images] if isinstance(images, Image.Image) else list(images or [])
        if images and isinstance(images[0], (list, tuple)):
            images = [image for group in images for image in group]
        pixel_values, crops_per_image = self.pixel_values(images)
        expanded = self.expand(texts, crops_per_image)
        batch = self.tokenizer(expanded, padding=padding, return_tensors=return_tensors, add_special_tokens=False)
        data = dict(batch)
        if pixel_values is not None:
            data["pixel_values"] = pixel_values
        return BatchFeature(data, tensor_type=return_tensors)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)
