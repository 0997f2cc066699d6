"""Lexical page search: BM25 over the pages' text layers (bm25s), and its fusion with dense search.

The text layer is what `vlmkit docs render` stores with each PDF page (its `text` metadata);
pages without one (scans, `docs add-images`) are absent from the lexical index and found by
the dense retriever alone. What people run on their own PDFs is hybrid: BM25 finds the rare
exact words (names, codes, numbers) a small dense model blurs, the dense model finds pages by
meaning and by what only the image shows. Two ways to fuse the two rankings:
- "rrf", reciprocal rank (Cormack et al., 2009): ranks only, no calibration of the scores against
  each other; a page's place in one list counts the same however close its score came to the next.
- "score", a convex combination of each ranking's scores, min-max normalised over its own list
  (Bruch et al., 2023, "An Analysis of Fusion Functions for Hybrid Retrieval", found it beat RRF
  in and out of domain once its weight was set on a few held-out queries): a weak ranking can
  still reorder pages the strong one scores nearly alike, without moving a clear winner.
"""

from __future__ import annotations

import math
from collections import defaultdict

import bm25s

from vlmkit.data.page_store import PageStore
from vlmkit.errors import ConfigError

STOPWORDS = "en"
RRF_K = 60  # the constant of reciprocal rank fusion: 1 / (RRF_K + rank); 60 as in its paper
FUSIONS = ("rrf", "score")


class LexicalIndex:
    """BM25 over page texts; pages with an empty text are left out."""

    def __init__(self, ids: list[str], texts: list[str]):
        kept = [(doc_id, text) for doc_id, text in zip(ids, texts, strict=True) if text.strip()]
        self.ids = [doc_id for doc_id, _ in kept]
        self.bm25 = bm25s.BM25()
        if kept:
            self.bm25.index(bm25s.tokenize([text for _, text in kept], stopwords=STOPWORDS, show_progress=False),
                            show_progress=False)

    @classmethod
    def of_store(cls, store: PageStore) -> LexicalIndex:
        return cls(store.ids, [store.text(doc_id) for doc_id in store.ids])

    def __len__(self) -> int:
        return len(self.ids)

    def search(self, queries: list[str], k: int) -> list[list[tuple[str, float]]]:
        """The `k` best pages for each query, best first, as (page id, BM25 score); pages that share
        no word with the query are not listed."""
        if not self.ids:
            return [[] for _ in queries]
        tokens = bm25s.tokenize(queries, stopwords=STOPWORDS, show_progress=False)
        found, scores = self.bm25.retrieve(tokens, k=min(k, len(self.ids)), show_progress=False, n_threads=1)
        return [[(self.ids[int(i)], float(s)) for i, s in zip(row, row_scores) if s > 0]
                for row, row_scores in zip(found, scores)]


def reciprocal_rank_fusion(rankings: list[list[str]], weights: list[float], k: int = RRF_K) -> list[tuple[str, float]]:
    """One ranking from several: each page scores the sum over rankings of weight / (k + rank).
    Ties keep the order in which the pages were first met. Hand-written: five lines, where ranx's
    fusion would bring numba (a JIT compiler) for them."""
    scores: dict[str, float] = defaultdict(float)
    for ranking, weight in zip(rankings, weights, strict=True):
        if weight == 0:
            continue  # a ranking weighted 0 is left out, not listed after the others at score 0
        for rank, doc_id in enumerate(ranking, 1):
            scores[doc_id] += weight / (k + rank)
    return sorted(scores.items(), key=lambda item: -item[1])  # sorted() is stable


def min_max(values: list[float]) -> list[float]:
    """`values` mapped onto [0, 1] by their finite minimum and maximum (all 1 if those are equal):
    -inf (a multi-vector page with no token vectors) is the worst, 0, and NaN counts as 0 too."""
    finite = [value for value in values if math.isfinite(value)]
    low, high = (min(finite), max(finite)) if finite else (0.0, 0.0)
    if high == low:
        return [0.0 if math.isnan(value) or value < low else 1.0 for value in values]
    return [0.0 if math.isnan(value) else min(1.0, max(0.0, (value - low) / (high - low))) for value in values]


def score_fusion(runs: list[list[tuple[str, float]]], weights: list[float]) -> list[tuple[str, float]]:
    """One ranking from several (page, score) rankings: each page scores the weighted sum of its
    min-max normalised scores (`min_max`: the best a ranking lists 1, the last 0, as a page it does
    not list). Ties keep the order in which the pages were first met. Hand-written for the same
    reason as `reciprocal_rank_fusion`."""
    scores: dict[str, float] = defaultdict(float)
    for run, weight in zip(runs, weights, strict=True):
        if weight == 0:
            continue  # a ranking weighted 0 is left out, as in reciprocal_rank_fusion
        for (doc_id, _), value in zip(run, min_max([score for _, score in run]), strict=True):
            scores[doc_id] += weight * value
    return sorted(scores.items(), key=lambda item: -item[1])


def check_fusion(fusion: str) -> None:
    if fusion not in FUSIONS:
        raise ConfigError(f"fusion {fusion!r} is not one of {', '.join(FUSIONS)}")


def fuse(runs: list[list[tuple[str, float]]], weights, depth: int, fusion: str = "rrf") -> list[tuple[str, float]]:
    """The best `depth` pages of several (page, score) rankings fused by `fusion`: "rrf" (reciprocal
    rank) or "score" (min-max normalised scores)."""
    check_fusion(fusion)
    if fusion == "score":
        return score_fusion(runs, list(weights))[:depth]
    return reciprocal_rank_fusion([[doc_id for doc_id, _ in run] for run in runs], list(weights))[:depth]
