"""Did fine-tuning on images cost the LM its language? Perplexity on held-out text, and text-only answers.

LoRA on a small LM can still drift: answering "red" to every question is easy to learn and
forgets how to write. The check compares the trained model with the base LM it started from
on text neither saw in vlmkit's training (`heldout_text.txt`, plain English paragraphs
shipped with vlmkit), and shows their answers to a few text-only questions side by side.
"""

from __future__ import annotations

import math
from importlib import resources

import torch
from torch import nn

TEXT_QUESTIONS = ("What is the capital of France?", "Name three colours of the rainbow.",
                  "Write one sentence about the sea.")


def heldout_paragraphs() -> list[str]:
    text = resources.files("vlmkit").joinpath("eval/heldout_text.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


@torch.no_grad()
def perplexity(model, tokenizer, texts: list[str]) -> float:
    """exp(mean negative log-likelihood per predicted token) over `texts`, each scored on its own.

    `model` is a causal LM or a vlmkit VLM (text-only input takes the same path through its LM).
    """
    total, count = 0.0, 0
    for text in texts:
        ids = tokenizer(text, return_tensors="pt")["input_ids"].to(model.device)
        logits = model(input_ids=ids).logits[0, :-1].float()
        total += nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
    return math.exp(total / count)


@torch.no_grad()
def text_answers(model, tokenizer, questions=TEXT_QUESTIONS, max_new_tokens: int = 40) -> list[str]:
    """Greedy answers to text-only questions, each in the tokenizer's own chat template."""
    answers = []
    for question in questions:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"].to(model.device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
        answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return answers
