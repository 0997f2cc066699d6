"""Batched generation: greedy replies to many encoded prompts in one `generate` call.

`vlmkit eval` and query generation answer prompts in batches; interactive, streamed replies
are `vlmkit.serve.generation.stream_reply`. The model sees each prompt exactly as it would
alone: the tokenizer pads on the left and the attention mask hides the padding, so every
row's reply starts in the same column.
"""

from __future__ import annotations

import torch
from PIL import Image


def generate_batch(model, processor, prompts: list[torch.Tensor], images: list[Image.Image],
                   max_new_tokens: int) -> list[str]:
    """Greedy replies to prompts encoded by `processor.encode_text`; `images` are all the prompts' images, in order."""
    tokenizer = processor.tokenizer
    batch = tokenizer.pad({"input_ids": [p.tolist() for p in prompts]}, padding_side="left", return_tensors="pt")
    inputs = {**batch, **processor.image_inputs(images)}
    generated = model.generate(**{k: v.to(model.device) for k, v in inputs.items()}, do_sample=False,
                               max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.batch_decode(generated[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
