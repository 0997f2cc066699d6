"""Talking to a saved model: loading it for inference and streaming a reply (CLI, web UI and API share this).

Decoding is transformers' `generate` with its KV cache; streaming uses its
`TextIteratorStreamer`, with generation running in a worker thread. Many prompts answered at
once, without streaming (`vlmkit eval`, query generation): `vlmkit.model.generation`.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Iterator

import torch
from PIL import Image
from transformers import TextIteratorStreamer

from vlmkit.processing.markers import IMAGE_MARKER
from vlmkit.config import GenerationSettings
from vlmkit.errors import ConfigError


def load_for_inference(model_dir: str | Path, device: str | None = None, dtype: str | None = None):
    """Model (eval mode) and processor from a saved vlmkit model directory.

    A directory holding LoRA adapters alone is loaded onto its base model and merged, so
    eval, chat and serving run at the plain model's speed.
    """
    from vlmkit.model.build import DTYPES
    from vlmkit.model.modeling import VLMForConditionalGeneration
    from vlmkit.processing.processor import VLMProcessor
    from vlmkit.train import lora

    model_dir = Path(model_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if lora.is_adapter(model_dir):
        model, processor = lora.load(model_dir, merge=True)
        model = model.to(DTYPES[dtype]) if dtype else model
        return model.to(device).eval(), processor
    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"{model_dir} is not a saved vlmkit model (no config.json); train one with `vlmkit train`")
    kwargs = {"dtype": DTYPES[dtype]} if dtype else {}
    model = VLMForConditionalGeneration.from_pretrained(model_dir, **kwargs).to(device).eval()
    return model, VLMProcessor.from_pretrained(model_dir)


def with_image_markers(messages: list[dict], n_new_images: int) -> list[dict]:
    """Put markers for `n_new_images` images at the start of the last user message (if it has none)."""
    messages = [dict(m) for m in messages]
    last = messages[-1]
    if n_new_images and IMAGE_MARKER not in last["content"]:
        last["content"] = (IMAGE_MARKER + "\n") * n_new_images + last["content"]
    return messages


def stream_reply(model, processor, messages: list[dict], images: list[Image.Image],
                 settings: GenerationSettings) -> Iterator[str]:
    """Yield the reply to `messages` piece by piece; `images` match the markers in the messages, in order."""
    settings.check()
    plans = processor.plans(images, settings.max_slices)
    ids = processor.encode_text(messages, plans, add_generation_prompt=True)["input_ids"][None]
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    inputs |= processor.image_inputs(images, settings.max_slices)
    inputs = {key: value.to(model.device) for key, value in inputs.items()}
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)

    failure: list[BaseException] = []

    def work():
        try:
            if settings.seed is not None:
                torch.manual_seed(settings.seed)  # generate() samples with the global RNG
            with torch.no_grad():
                model.generate(**inputs, streamer=streamer, pad_token_id=processor.tokenizer.pad_token_id,
                               **settings.generate_kwargs())
        except BaseException as err:  # noqa: BLE001 -- handed to the caller below
            failure.append(err)
            streamer.end()  # otherwise the consumer would wait forever for more text

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    yield from streamer
    thread.join()
    if failure:
        raise failure[0]
