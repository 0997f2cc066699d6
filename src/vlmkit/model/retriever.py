"""`VLMRetriever`: a vlmkit VLM turned into an embedding model for text-to-page retrieval.

Queries (text) and pages (an image) go through the same VLM; the LM's last hidden states
are pooled into one L2-normalised vector (as DSE and VisRAG-Ret do), or, in multi-vector
mode, every token is projected to a small vector and pages are scored by late interaction
(MaxSim, as ColPali). The VLM is kept whole inside (`self.vlm`), so a trained vlmkit VLM
becomes a retriever without any weight conversion, and parameter names still contain
`vision_tower` / `projector` / `language_model` for per-module learning rates.

Multi-vector embeddings are zero-padded (batch, tokens, dim) tensors: a real token's vector
has norm 1 and a padding vector is exactly zero, so scoring finds the padding by itself and
batches of different lengths concatenate by padding with zeros.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig
from transformers.masking_utils import create_bidirectional_mask

from vlmkit.processing.markers import IMAGE_MARKER
from vlmkit.errors import ConfigError
from vlmkit.model.configuration import VLMConfig
from vlmkit.model.modeling import VLMForConditionalGeneration, VLMPreTrainedModel
from vlmkit.model.pooling import get_pooling

BIDIRECTIONAL_ATTENTION = ("sdpa", "eager")  # implementations that take the 4D mask we build


@strict
class RetrieverConfig(VLMConfig):
    r"""
    A `VLMConfig` plus how to turn hidden states into embeddings.

    Args:
        pooling: key of `vlmkit.model.pooling.POOLINGS` (single-vector mode).
        normalize: L2-normalise embeddings (scores are then cosine similarities).
        query_prefix, doc_prefix: instruction text put before every query / page.
        bidirectional: let every token attend to every other (the LM must use sdpa or eager attention).
        multi_vector_dim: 0 for one vector per input; else the size of one vector per token (MaxSim scoring).
        page_text_tokens: 0 for pages seen as images only; else a page's input carries, after its image,
            the first this many tokens of its text layer (the store's `text`; none for a page without one).
    """

    model_type = "vlmkit_retriever"

    pooling: str = "last"
    normalize: bool = True
    query_prefix: str = "query: "
    doc_prefix: str = "page: "
    bidirectional: bool = False
    multi_vector_dim: int = 0
    page_text_tokens: int = 0


RETRIEVAL_FIELDS = ("pooling", "normalize", "query_prefix", "doc_prefix", "bidirectional", "multi_vector_dim",
                    "page_text_tokens")


class VLMRetriever(VLMPreTrainedModel):
    """Embeds queries and pages (`score` compares them). Saves and loads like any transformers model."""

    config: RetrieverConfig
    config_class = RetrieverConfig

    def __init__(self, config: RetrieverConfig, vlm: VLMForConditionalGeneration | None = None):
        super().__init__(config)
        get_pooling(config.pooling)  # fail on a bad name now, not at the first batch
        check_page_text_tokens(config.page_text_tokens)
        self.vlm = vlm if vlm is not None else VLMForConditionalGeneration(_vlm_config(config))
        attention = self.vlm.language_model.config._attn_implementation
        if config.bidirectional and attention not in BIDIRECTIONAL_ATTENTION:
            raise ConfigError(f"bidirectional attention needs the LM to use one of {', '.join(BIDIRECTIONAL_ATTENTION)}"
                              f" attention, not {attention!r}")
        hidden = self.vlm.config.text_config.hidden_size
        self.multi_vector_proj = nn.Linear(hidden, config.multi_vector_dim) if config.multi_vector_dim else None
        lm = self.vlm.language_model
        head = lm.get_output_embeddings()
        if head is not None and head.weight is not lm.get_input_embeddings().weight:
            head.requires_grad_(False)  # an untied LM head never sees a gradient here; DDP would wait for it
        self.post_init()

    @classmethod
    def from_vlm(cls, vlm: VLMForConditionalGeneration, **options) -> VLMRetriever:
        """Wrap a built or trained VLM (its weights are kept as they are); `options` are RETRIEVAL_FIELDS."""
        unknown = sorted(set(options) - set(RETRIEVAL_FIELDS))
        if unknown:
            raise ConfigError(f"unknown retriever option(s) {', '.join(unknown)}; known: {', '.join(RETRIEVAL_FIELDS)}")
        values = vlm.config.to_dict()
        for key in ("model_type", "transformers_version", "architectures"):
            values.pop(key, None)
        # post_init leaves the VLM's weights alone: its modules are already flagged as initialised.
        return cls(RetrieverConfig(**values, **options), vlm=vlm).to(vlm.dtype)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      pixel_values: torch.Tensor | None = None, crop_sizes: torch.Tensor | None = None) -> torch.Tensor:
        """The LM's last hidden states (after its final norm) for a padded batch."""
        embeds = self.vlm.get_input_embeddings()(input_ids)
        embeds = self.vlm.merge_image_features(input_ids, embeds, pixel_values, crop_sizes)
        lm = self.vlm.language_model.base_model  # the decoder without its LM head: no vocabulary logits
        mask, kwargs = attention_mask, {}
        if self.config.bidirectional:
            # A ready 4D mask is used as is by the LM; is_causal=False stops sdpa adding causality back.
            mask = create_bidirectional_mask(lm.config, embeds, attention_mask, allow_is_bidirectional_skip=False)
            kwargs["is_causal"] = False
        return lm(inputs_embeds=embeds, attention_mask=mask, use_cache=False, **kwargs).last_hidden_state

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                pixel_values: torch.Tensor | None = None, crop_sizes: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings: (batch, dim), or zero-padded (batch, tokens, dim) in multi-vector mode."""
        hidden = self.hidden_states(input_ids, attention_mask, pixel_values, crop_sizes)
        if self.multi_vector_proj is None:
            pooled = get_pooling(self.config.pooling)(hidden, attention_mask)
            return F.normalize(pooled, dim=-1) if self.config.normalize else pooled
        vectors = self.multi_vector_proj(hidden)
        vectors = F.normalize(vectors, dim=-1) if self.config.normalize else vectors
        return vectors * attention_mask.unsqueeze(-1).to(vectors.dtype)


def check_page_text_tokens(tokens) -> None:
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0:
        raise ConfigError(f"retrieval.page_text_tokens must be a whole number >= 0, not {tokens!r}")


def _vlm_config(config: RetrieverConfig) -> VLMConfig:
    values = {k: v for k, v in config.to_dict().items() if k not in RETRIEVAL_FIELDS and k != "model_type"}
    vlm_config = VLMConfig(**values)
    # Only the LM is told the attention asked for: set on the composite config, it would also
    # reach a convolutional vision tower, which has no attention and refuses any choice.
    vlm_config.text_config._attn_implementation = config.text_config._attn_implementation or config._attn_implementation
    return vlm_config


def score(queries: torch.Tensor, docs: torch.Tensor) -> torch.Tensor:
    """(n_queries, n_docs) scores: dot products, or MaxSim for multi-vector (3D) embeddings."""
    if queries.dim() == 2:
        return queries @ docs.T
    token_scores = torch.einsum("qid,pjd->qpij", queries, docs)
    is_padding = docs.abs().sum(-1) == 0  # (n_docs, doc_tokens); see the module docstring
    token_scores = token_scores.masked_fill(is_padding[None, :, None, :], float("-inf"))
    best = token_scores.max(dim=-1).values  # each query token's best page token
    # Padding query tokens are zero vectors: their best score is 0, so they add nothing.
    return best.sum(dim=-1)


def concat(embeddings: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate along the batch, zero-padding multi-vector embeddings to the longest."""
    if embeddings[0].dim() == 2:
        return torch.cat(embeddings)
    longest = max(e.shape[1] for e in embeddings)
    return torch.cat([F.pad(e, (0, 0, 0, longest - e.shape[1])) for e in embeddings])


def query_texts(config: RetrieverConfig, texts: list[str], eos: str) -> list[str]:
    """What the tokenizer sees for queries: prefix, text and EOS, the last token that pooling reads."""
    return [f"{config.query_prefix}{text}{eos}" for text in texts]


def doc_texts(config: RetrieverConfig, n: int, tokenizer, page_texts: list[str] | None = None) -> list[str]:
    """The text of `n` pages: prefix, the page image, the start of its text layer when
    `config.page_text_tokens` asks for it, and EOS."""
    eos = tokenizer.eos_token
    if not config.page_text_tokens:
        return [f"{config.doc_prefix}{IMAGE_MARKER}{eos}"] * n
    if page_texts is None or len(page_texts) != n:
        raise ConfigError(f"this retriever reads each page's text layer (page_text_tokens={config.page_text_tokens}): "
                          f"pass the {n} pages' texts with their images")
    clipped = [clip_to_tokens(plain_text(t, tokenizer), tokenizer, config.page_text_tokens) for t in page_texts]
    return [f"{config.doc_prefix}{IMAGE_MARKER}\n{text}{eos}" if text else f"{config.doc_prefix}{IMAGE_MARKER}{eos}"
            for text in clipped]


def plain_text(text: str, tokenizer) -> str:
    """A text layer as plain words: the image marker and the tokenizer's special tokens taken out
    (a PDF's "<image>" or "<|im_end|>" must not become a placeholder or an end of turn), and
    every run of white space one space (PDF layouts pad with them; they would use up the budget)."""
    for control in (IMAGE_MARKER, *(t.content for t in tokenizer.added_tokens_decoder.values() if t.special)):
        text = text.replace(control, " ")
    return " ".join(text.split())


def clip_to_tokens(text: str, tokenizer, n: int) -> str:
    """The longest start of `text` made of its first `n` tokens or fewer, cut in the original
    string at a token that ends a character: decoding n tokens could end inside a character (a
    byte-level BPE gives one character several tokens) and leave a U+FFFD."""
    text = text[:n * 32]  # no token is longer; tokenising a whole long page each batch would be waste
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    k = min(n, len(offsets))
    while 0 < k < len(offsets) and offsets[k][0] < offsets[k - 1][1]:  # token k is the same character's
        k -= 1
    return text[:offsets[k - 1][1]] if k else ""


def encode_inputs(processor, config: RetrieverConfig, queries: list[str] | None = None, images=None,
                  page_texts: list[str] | None = None) -> dict:
    """Model inputs for a batch of query texts or of page images (exactly one of the two); a
    retriever with `page_text_tokens` also takes the pages' text layers (`page_texts`, "" for none).

    Page inputs also carry `crops_per_row`, which micro-batching needs and the model does not take.
    """
    eos = processor.tokenizer.eos_token
    if images is not None:
        images = list(images)
        batch = processor(text=doc_texts(config, len(images), processor.tokenizer, page_texts), images=images)
        crops = [len(plan.crop_sizes) for plan in processor.plans(images)]
        images = {key: batch[key] for key in ("pixel_values", "crop_sizes") if key in batch}
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], **images,
                "crops_per_row": torch.tensor(crops)}
    texts = query_texts(config, queries, eos)
    batch = processor.tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


AutoConfig.register(RetrieverConfig.model_type, RetrieverConfig, exist_ok=True)

__all__ = ["RetrieverConfig", "VLMRetriever", "concat", "encode_inputs", "score"]
