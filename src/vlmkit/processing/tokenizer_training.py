"""Tokenizers: train a small byte-level BPE from scratch, or adapt a pretrained LM's tokenizer.

Either way the result has the special tokens the chat template and image layout need, and
the ChatML template (`vlmkit/templates/chatml.jinja`), whose generation markers give the
assistant-token mask used for the loss.
"""

from __future__ import annotations

from importlib import resources
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

PAD_TOKEN = "<|endoftext|>"
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")
IMAGE_TOKEN = "<image>"
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


def adapt_pretrained_tokenizer(path: str) -> PreTrainedTokenizerFast:
    """A local LM checkpoint's tokenizer with vlmkit's special tokens added (when missing) and ChatML."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    missing = [t for t in SPECIAL_TOKENS[1:] if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    tokenizer.image_token = IMAGE_TOKEN
    if tokenizer.pad_token is None:
        tokenizer.pad_token = PAD_TOKEN if PAD_TOKEN in tokenizer.get_vocab() else tokenizer.eos_token
    tokenizer.eos_token = CHAT_TOKENS[1]
    return _finish(tokenizer)
