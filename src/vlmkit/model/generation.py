"""Batched generation: greedy replies to many encoded prompts in one `generate` call.

`vlmkit eval` and query generation answer prompts in batches; interactive, streamed replies
are `vlmkit.serve.generation.stream_reply`. The model sees each prompt exactly as it would
alone: the tokenizer pads on the left and the attention mask hides the padding, so every
row's reply starts in the same column.

`ChatModel` gives query generation and filtering one interface over a vlmkit VLM (images
allowed) and any instruction-tuned causal LM (text only, through its own chat template).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

VLM_TYPE = "vlmkit"  # config.json model_type of a saved vlmkit VLM


def generate_batch(model, tokenizer, prompts: list[torch.Tensor], max_new_tokens: int,
                   image_inputs: dict | None = None) -> list[str]:
    """Greedy replies to encoded prompts; `image_inputs` are the processor's for all their images, in order."""
    batch = tokenizer.pad({"input_ids": [p.tolist() for p in prompts]}, padding_side="left", return_tensors="pt")
    inputs = {**batch, **(image_inputs or {})}
    generated = model.generate(**{k: v.to(model.device) for k, v in inputs.items()}, do_sample=False,
                               max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.batch_decode(generated[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)


class ChatModel:
    """A model answering chat messages: a vlmkit VLM with its processor, or a causal LM with its tokenizer."""

    def __init__(self, model, tokenizer, processor=None):
        self.model, self.tokenizer, self.processor = model, tokenizer, processor
        if self.tokenizer.pad_token_id is None:  # many LMs have none; left padding is masked anyway
            self.tokenizer.pad_token = self.tokenizer.eos_token

    @property
    def sees_images(self) -> bool:
        return self.processor is not None

    def encode(self, messages: list[dict], images: list[Image.Image] = ()) -> torch.Tensor:
        """The prompt's token ids, ready for the assistant's reply."""
        if self.processor is not None:
            plans = self.processor.plans(list(images))
            return self.processor.encode_text(messages, plans, add_generation_prompt=True)["input_ids"]
        if images:
            raise ValueError("a language model without a vision tower takes no images")
        encoded = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return torch.tensor(encoded["input_ids"])

    def replies(self, prompts: list[torch.Tensor], max_new_tokens: int, images: list[Image.Image] = ()) -> list[str]:
        """Greedy replies to `encode`d prompts; `images` are all the prompts' images, in order."""
        inputs = self.processor.image_inputs(list(images)) if self.processor is not None and images else None
        return generate_batch(self.model, self.tokenizer, prompts, max_new_tokens, inputs)


def load_chat_model(name: str | Path, device: str | None = None) -> ChatModel:
    """A saved vlmkit VLM, or any causal LM: a folder, a GGUF file, or an id `vlmkit models fetch` stores."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vlmkit.model.build import checkpoint_dir
    from vlmkit.serve.generation import load_for_inference

    path = Path(name).expanduser()
    config = path / "config.json"
    if config.is_file() and json.loads(config.read_text()).get("model_type") == VLM_TYPE:
        model, processor = load_for_inference(path, device=device)
        return ChatModel(model, processor.tokenizer, processor)
    if path.suffix == ".gguf":
        from vlmkit.model.convert import load_gguf_causal_lm

        model, tokenizer = load_gguf_causal_lm(path, torch.float32)
    else:
        directory = checkpoint_dir(str(name), "model")
        model, tokenizer = AutoModelForCausalLM.from_pretrained(directory), AutoTokenizer.from_pretrained(directory)
    return ChatModel(model.to(device or "cpu").eval(), tokenizer)
