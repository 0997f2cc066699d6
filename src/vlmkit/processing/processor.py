"""`VLMProcessor`: images + conversations -> model inputs (and labels), saved with the model.

Each `<image>` marker in the text is expanded to as many placeholder tokens as the image's
crops produce, counted by `vlmkit.model.tokens.num_image_tokens` -- the function the model
uses too. A sliced image's placeholders are laid out as MiniCPM-V does: the whole view in
`<img>...</img>`, each slice in `<slice>...</slice>`, a newline between rows of slices.
Only assistant tokens are supervised: the chat template's generation markers say which they are,
or, for a template without them, its rendering prefix by prefix (`processing/chat_template.py`).
"""

from __future__ import annotations

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoProcessor, ProcessorMixin
from transformers.image_processing_base import BatchFeature

from vlmkit.errors import DataError
from vlmkit.model.configuration import VLMConfig
from vlmkit.model.tokens import IGNORE_INDEX, num_image_tokens
from vlmkit.processing import slicing
from vlmkit.processing.chat_template import has_generation_markers, tokenize_with_assistant_mask
from vlmkit.processing.image_processing import ImagePlan, VLMImageProcessor, batch_crops
from vlmkit.processing.markers import IMAGE_MARKER


class VLMProcessor(ProcessorMixin):
    """Pairs a `VLMImageProcessor` with a tokenizer that has the `<image>` token and a chat template."""

    attributes = ["image_processor", "tokenizer"]

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, image_token_spec=None, **kwargs):
        self.image_token_spec = image_token_spec
        super().__init__(image_processor, tokenizer, chat_template=chat_template or tokenizer.chat_template)

    @property
    def tokens_per_crop(self) -> int:
        """Tokens of one crop at the encoder's native size."""
        return num_image_tokens(self.image_token_spec)

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(IMAGE_MARKER)

    def crop_tokens(self, height: int, width: int) -> int:
        """Tokens of one crop of `height` x `width` pixels (slices need not be the native square)."""
        spec = self.image_token_spec
        stride = spec.get("stride") or spec["input_size"] // spec["grid"][0]  # (processors saved before "stride")
        return num_image_tokens(spec, (height // stride, width // stride))

    def image_text(self, plan: ImagePlan | int) -> str:
        """The placeholder string of one image; an int stands for that many native-size crops."""
        if isinstance(plan, int):
            return IMAGE_MARKER * (plan * self.tokens_per_crop)
        counts = [self.crop_tokens(*size) for size in plan.crop_sizes]
        if not plan.boundaries:
            return IMAGE_MARKER * sum(counts)
        cols, rows = plan.grid or (0, 0)
        slice_rows = [counts[1 + row * cols: 1 + (row + 1) * cols] for row in range(rows)]
        return slicing.layout_text(counts[0], slice_rows, image_token=IMAGE_MARKER)

    def expand(self, texts: list[str], plans: list[ImagePlan | int]) -> list[str]:
        """Replace the `<image>` markers of `texts`, in order, by each image's placeholder string."""
        n_markers = sum(t.count(IMAGE_MARKER) for t in texts)
        if n_markers != len(plans):
            raise DataError(f"text has {n_markers} {IMAGE_MARKER} marker(s) but {len(plans)} image(s) "
                            "were given; use one marker per image")
        plans = iter(plans)
        out = []
        for text in texts:
            pieces = text.split(IMAGE_MARKER)
            out.append(pieces[0] + "".join(self.image_text(next(plans)) + piece for piece in pieces[1:]))
        return out

    def plans(self, images: list[Image.Image], max_slices: int | list | None = None) -> list[ImagePlan]:
        """Each image's plan; `max_slices` lowers the slice budget, for all images or per image (video frames)."""
        return [self.image_processor.plan(image.size, budget) for image, budget in _per_image(images, max_slices)]

    def image_inputs(self, images: list[Image.Image], max_slices: int | list | None = None) -> dict:
        """`pixel_values` (and `crop_sizes` when crops differ in size) of all images' crops, in order."""
        pairs = _per_image(images, max_slices)
        crops = [crop for image, budget in pairs for crop in self.image_processor.crops(image, budget)]
        return batch_crops(crops) if crops else {}

    def encode_conversation(self, conversations: list[dict], images: list[Image.Image],
                            add_generation_prompt: bool = False, max_slices: int | None = None) -> dict:
        """Token ids, labels (assistant tokens only, else -100) and image inputs of one conversation."""
        plans = self.plans(images, max_slices)
        return self.encode_text(conversations, plans, add_generation_prompt) | self.image_inputs(images, max_slices)

    def encode_text(self, conversations: list[dict], plans: list[ImagePlan | int],
                    add_generation_prompt: bool = False) -> dict:
        """The text half of `encode_conversation`, given each image's plan (or native crop count)."""
        return self.tokenize_turns([self.expand_turns(conversations, plans)], add_generation_prompt)[0]

    def expand_turns(self, conversations: list[dict], plans: list[ImagePlan | int]) -> list[dict]:
        """The turns with each `<image>` marker replaced by its image's placeholders (DataError on a count mismatch)."""
        contents = self.expand([turn["content"] for turn in conversations], plans)
        return [{"role": turn["role"], "content": c} for turn, c in zip(conversations, contents)]

    def tokenize_turns(self, expanded: list[list[dict]], add_generation_prompt: bool = False) -> list[dict]:
        """Token ids and labels of many expanded conversations, in one tokenizer call.

        One call for a whole data set's chunk rather than one per record: the tokenizer's
        per-call overhead was most of the time `vlmkit train` spent preparing 24,000 records.
        """
        if add_generation_prompt or has_generation_markers(self.chat_template):
            encoded = self.tokenizer.apply_chat_template(
                expanded, chat_template=self.chat_template, tokenize=True, return_dict=True,
                return_assistant_tokens_mask=not add_generation_prompt, add_generation_prompt=add_generation_prompt,
            )
        else:  # a pretrained LM's own template, without generation markers
            encoded = tokenize_with_assistant_mask(self.tokenizer, self.chat_template, expanded)
        out = []
        for i, ids in enumerate(encoded["input_ids"]):
            input_ids = torch.tensor(ids, dtype=torch.long)
            if add_generation_prompt:
                labels = torch.full_like(input_ids, IGNORE_INDEX)
            else:
                assistant = torch.tensor(encoded["assistant_masks"][i], dtype=torch.bool)
                labels = torch.where(assistant & (input_ids != self.image_token_id), input_ids, IGNORE_INDEX)
            out.append({"input_ids": input_ids, "labels": labels})
        return out

    def __call__(self, text: str | list[str] | None = None, images=None, padding: bool = True,
                 return_tensors: str = "pt", max_slices: int | None = None, **kwargs) -> BatchFeature:
        """transformers-style call: prompt text(s) with `<image>` markers and the images in order."""
        texts = [text] if isinstance(text, str) else list(text or [])
        images = [images] if isinstance(images, Image.Image) else list(images or [])
        if images and isinstance(images[0], (list, tuple)):
            images = [image for group in images for image in group]
        expanded = self.expand(texts, self.plans(images, max_slices))
        batch = self.tokenizer(expanded, padding=padding, return_tensors=return_tensors, add_special_tokens=False)
        return BatchFeature(dict(batch) | self.image_inputs(images, max_slices), tensor_type=return_tensors)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)


def _per_image(images: list, max_slices: int | list | None) -> list[tuple]:
    """(image, slice budget) pairs: one budget for all, or a list with one per image."""
    return list(zip(images, max_slices if isinstance(max_slices, list) else [max_slices] * len(images)))


# AutoProcessor (and the AutoImageProcessor it loads the image half with) read a saved vlmkit
# model's folder once this module is imported.
AutoImageProcessor.register(VLMConfig, image_processor_classes={"pil": VLMImageProcessor}, exist_ok=True)
AutoProcessor.register(VLMConfig, VLMProcessor, exist_ok=True)
