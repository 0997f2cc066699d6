"""Page search for the web UI's Retrieval tab and `vlmkit retriever search`: a page store queried
by text, densely (a retriever), lexically (BM25 over the pages' text layers) or both, fused.

The dense index is `vlmkit retriever index`'s file when one is given, else the store is encoded
once at start-up; dense search is `vlmkit.eval.retrieval.search`, exact, best first. Hybrid
search fuses the two rankings by reciprocal rank or by their normalised scores
(`vlmkit.eval.lexical`); a store with no text layer (images only) is searched densely alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from vlmkit.data.page_store import PageStore
from vlmkit.errors import ConfigError, DataError
from vlmkit.eval.lexical import LexicalIndex, check_fusion, fuse
from vlmkit.eval.retrieval import RUN_DEPTH, SEARCH_MODES, build_index, encode_queries, load_index, search

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
    """Top pages of a store for a text query. `mode`: "dense" (needs the retriever), "lexical" (no
    model) or "hybrid" (both, fused by `fusion`, "rrf" or "score"; `weights` are dense's and lexical's
    in the fusion)."""

    def __init__(self, model, processor, docs: str | Path, index: str | Path | None = None, mode: str = "dense",
                 weights: tuple[float, float] = (1.0, 1.0), fusion: str = "rrf"):
        if mode not in SEARCH_MODES:
            raise ConfigError(f"search mode {mode!r} is not one of {', '.join(SEARCH_MODES)}")
        check_fusion(fusion)
        self.fusion = fusion
        if mode != "lexical" and model is None:
            raise ConfigError(f"{mode} search needs a retriever")
        self.model, self.processor, self.store, self.weights = model, processor, PageStore(docs), weights
        self.lexical = LexicalIndex.of_store(self.store) if mode != "dense" else None
        if mode == "hybrid" and not len(self.lexical):
            mode, self.lexical = "dense", None  # images only: nothing for BM25 to read
        self.mode = mode
        if mode == "lexical":
            return
        if index:
            self.ids, self.embeddings = load_index(index)
        else:
            self.ids, self.embeddings = build_index(model, processor, self.store, progress=False)
        missing = [doc_id for doc_id in self.ids if doc_id not in self.store]
        if missing:
            raise DataError(f"{len(missing)} page(s) of the index are not in the store, e.g. {missing[0]!r}; "
                            "give the store the index was built from", index)

    def ranked(self, query: str, k: int) -> list[tuple[str, float]]:
        """The `k` best (page id, score) for `query`, best first (dense ties: the page first in the index)."""
        if not query.strip():
            raise ConfigError("type a query first")
        runs = []
        if self.mode != "lexical":
            depth = k if self.mode == "dense" else max(k, RUN_DEPTH)
            scores, indices = search(encode_queries(self.model, self.processor, [query.strip()]), self.embeddings,
                                     depth)
            runs.append([(self.ids[i], s) for i, s in zip(indices[0].tolist(), scores[0].tolist(), strict=True)])
        if self.lexical is not None:
            runs.append(self.lexical.search([query.strip()], k if self.mode == "lexical" else max(k, RUN_DEPTH))[0])
        if self.mode != "hybrid":
            return runs[0][:k]
        return fuse(runs, self.weights, k, self.fusion)

    def top(self, query: str, k: int) -> list[Hit]:
        """`ranked`, with each page's image."""
        return [Hit(doc_id, score, self.store.image(doc_id)) for doc_id, score in self.ranked(query, k)]
