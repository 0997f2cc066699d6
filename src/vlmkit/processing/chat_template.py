"""Which tokens of a chat are the assistant's: the mask that decides where the loss is taken.

A template with `{% generation %}` markers (vlmkit's ChatML) says so itself, through
transformers' `return_assistant_tokens_mask`. A pretrained LM's own template usually has no
such markers, and vlmkit keeps that template rather than replacing it, so the assistant's
characters are found by rendering the conversation prefix by prefix: turn i's reply spans
from the end of `messages[:i]` rendered with the generation prompt to the end of
`messages[:i+1]`. Tokens whose first character lies in such a span are supervised; the span
ends before trailing whitespace, so the newline some templates write after the end-of-turn
token is not learnt (generation stops at that token anyway).

transformers offers no mask for templates without markers, and TRL's `assistant_only_loss`
requires them too, hence this module.
"""

from __future__ import annotations

import re

from vlmkit.errors import ConfigError

GENERATION_MARKER = re.compile(r"{%-?\s*generation\s*-?%}")


def has_generation_markers(template: str) -> bool:
    return GENERATION_MARKER.search(template) is not None


def _render(tokenizer, template: str, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, template: str, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the (start, end) character spans of its assistant replies."""
    text = _render(tokenizer, template, messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, template, messages[:i], True)
        through = _render(tokenizer, template, messages[: i + 1], False)
        if not (text.startswith(through) and through.startswith(prompt)):
            raise ConfigError("the chat template does not render a conversation as a growing prefix of itself, "
                              "so vlmkit cannot tell which tokens are the assistant's; give the LM a template "
                              "with {% generation %} markers (transformers' convention)")
        spans.append((len(prompt), len(through.rstrip())))
    return text, spans


def tokenize_with_assistant_mask(tokenizer, template: str, conversations: list[list[dict]]) -> dict:
    """`input_ids` and `assistant_masks` (lists of lists) of many conversations, tokenised in one call."""
    rendered = [assistant_spans(tokenizer, template, messages) for messages in conversations]
    encoded = tokenizer([text for text, _ in rendered], add_special_tokens=False, return_offsets_mapping=True)
    masks = []
    for (_, spans), offsets in zip(rendered, encoded["offset_mapping"]):
        masks.append([int(any(start <= first < end for start, end in spans)) for first, _ in offsets])
    return {"input_ids": encoded["input_ids"], "assistant_masks": masks}
