"""Tokenizers: train a small byte-level BPE from scratch, or adapt a pretrained LM's tokenizer.

A from-scratch tokenizer gets ChatML (`vlmkit/templates/chatml.jinja`) and every special token
vlmkit's layouts use. A pretrained LM's tokenizer keeps its own chat template, BOS/EOS, pad
token and default system prompt -- the model was tuned to them -- and gains only the
placeholder tokens the image layout needs (`<image>`, and the crop boundaries when images
are sliced). Only an LM with no chat template at all (a base model) is given ChatML.
"""

from __future__ import annotations

from importlib import resources
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from vlmkit.processing.markers import IMAGE_MARKER

PAD_TOKEN = "<|endoftext|>"
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")
IMAGE_TOKEN = IMAGE_MARKER  # a record's image marker is the token itself
# Crop boundary and slice tokens, used by the high-resolution layouts; present from the start
# so that every tokenizer vlmkit makes can serve every layout.
LAYOUT_TOKENS = ("<img>", "</img>", "<slice>", "</slice>")
SPECIAL_TOKENS = (PAD_TOKEN, *CHAT_TOKENS, IMAGE_TOKEN, *LAYOUT_TOKENS)


def chat_template() -> str:
    return resources.files("vlmkit").joinpath("templates/chatml.jinja").read_text(encoding="utf-8")


def _finish(tokenizer) -> PreTrainedTokenizerFast:
    tokenizer.chat_template = chat_template()
    tokenizer.padding_side = "right"
    return tokenizer


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on `texts` (so it can still encode any string, byte by byte)."""
    model = Tokenizer(models.BPE())
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    model.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=model,
        pad_token=PAD_TOKEN,
        eos_token=CHAT_TOKENS[1],
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )
    return _finish(tokenizer)


def adapt_pretrained_tokenizer(tokenizer, sliced: bool = False):
    """A pretrained LM's tokenizer with the image placeholder tokens added (when missing).

    `sliced` adds the crop boundary tokens of the high-resolution layouts too. The LM's own chat
    template and special tokens are kept; a tokenizer with no chat template gets ChatML and its
    markers (then `<|im_end|>` ends a turn and becomes EOS). A missing pad token becomes EOS:
    padded positions are masked, so the id only has to exist.
    """
    if isinstance(tokenizer, str):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    chatml = not tokenizer.chat_template
    wanted = [IMAGE_TOKEN, *(LAYOUT_TOKENS if sliced else ()), *(CHAT_TOKENS if chatml else ())]
    missing = [t for t in wanted if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    if chatml:
        tokenizer.chat_template, tokenizer.eos_token = chat_template(), CHAT_TOKENS[1]
    tokenizer.image_token = IMAGE_TOKEN
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer
