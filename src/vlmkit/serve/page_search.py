"""Page search for the web UI's Retrieval tab: a retriever, a page store and its index, queried by text.

The index is `vlmkit retriever index`'s file when one is given, else the store is encoded
once at start-up. Search is `vlmkit.eval.retrieval.search`: exact, best first.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from vlmkit.data.page_store import PageStore
from vlmkit.errors import ConfigError, DataError
from vlmkit.eval.retrieval import build_index, encode_queries, load_index, search

RETRIEVER_TYPE = "vlmkit_retriever"  # config.json model_type of a saved VLMRetriever


def is_retriever(model_dir: str | Path) -> bool:
    """Whether `model_dir` holds a retriever (embeddings) rather than a chat model, from its config.json.

    A folder of LoRA adapters alone (`lora.save: adapter`) is a chat model: retrievers train without LoRA."""
    from vlmkit.train import lora

    if lora.is_adapter(model_dir):
        return False
    config = Path(model_dir) / "config.json"
    if not config.is_file():
        raise ConfigError(f"{model_dir} is not a saved vlmkit model (no config.json, nor the {lora.ADAPTER_CONFIG} "
                          "of LoRA adapters)")
    return json.loads(config.read_text()).get("model_type") == RETRIEVER_TYPE


@dataclass
class Hit:
    doc_id: str
    score: float
    image: Image.Image


class PageSearch:
    """Top pages of a store for a text query."""

    def __init__(self, model, processor, docs: str | Path, index: str | Path | None = None):
        self.model, self.processor, self.store = model, processor, PageStore(docs)
        if index:
            self.ids, self.embeddings = load_index(index)
        else:
            self.ids, self.embeddings = build_index(model, processor, self.store, progress=False)
        missing = [doc_id for doc_id in self.ids if doc_id not in self.store]
        if missing:
            raise DataError(f"{len(missing)} page(s) of the index are not in the store, e.g. {missing[0]!r}; "
                            "give the store the index was built from", index)

    def top(self, query: str, k: int) -> list[Hit]:
        """The `k` best pages for `query`, best first (ties: the page first in the index)."""
        if not query.strip():
            raise ConfigError("type a query first")
        scores, indices = search(encode_queries(self.model, self.processor, [query.strip()]), self.embeddings, k)
        hits = zip(indices[0].tolist(), scores[0].tolist(), strict=True)
        return [Hit(self.ids[i], score, self.store.image(self.ids[i])) for i, score in hits]
