"""Exact top-k search with the results of `vlmkit.eval.retrieval.search`, at matrix-product speed.

`retrieval.search` merges every block of scores into the running top-k with a full stable
sort of the block, so sorting, not scoring, takes most of its time on a large corpus (about
7x the time of faiss's IndexFlatIP at 100,000 x 256). Here each block goes through
`torch.topk` (a partial selection), only the few candidates are sorted, and blocks are
smaller (16 MB of scores by default), so they stay in cache between the product and the
selection. The contract is unchanged: exact scores, best first, and equal scores ordered by
page index, lower first -- also across the k-th place, where `torch.topk` alone would pick
among equal scores arbitrarily. Scores match `search`'s to float rounding (a different block
shape may sum a dot product in another order); with integer-valued vectors, bit for bit.
"""

from __future__ import annotations

import torch


def block_scores(queries: torch.Tensor, docs: torch.Tensor) -> torch.Tensor:
    """`vlmkit.model.retriever.score` for one block: dot products, or MaxSim for 3D embeddings.

    MaxSim is one matrix product of all query tokens with all page tokens, masked in place
    (padding page tokens are zero vectors) and reduced, where `score` builds its 4D tensor
    with einsum and a masked copy: the same scores, in about half the time.
    """
    if queries.dim() == 2:
        return queries @ docs.T
    (n_queries, query_tokens, dim), (n_docs, doc_tokens) = queries.shape, docs.shape[:2]
    sims = (queries.reshape(-1, dim) @ docs.reshape(-1, dim).T).view(n_queries, query_tokens, n_docs, doc_tokens)
    sims.masked_fill_(docs.abs().sum(-1) == 0, float("-inf"))
    return sims.amax(dim=-1).sum(dim=1)  # each query token's best page token, summed


def _block_top_k(block: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k (scores, column indices) of each row; among equal scores at the cut, the lower columns."""
    if block.shape[1] <= k:
        return block, torch.arange(block.shape[1]).expand(block.shape[0], -1)
    values, columns = block.topk(k + 1, dim=1)  # one more, to see whether the k-th score is shared past the cut
    tied = torch.nonzero(values[:, k - 1] == values[:, k]).flatten().tolist()
    values, columns = values[:, :k].clone(), columns[:, :k].clone()
    for row in tied:  # rare with real embeddings: keep every higher score, then the lowest columns at the cut
        cut = values[row, k - 1]
        above = torch.nonzero(block[row] > cut).flatten()
        keep = torch.cat([above, torch.nonzero(block[row] == cut).flatten()[: k - above.numel()]])
        values[row], columns[row] = block[row, keep], keep
    return values, columns


def search_topk(queries: torch.Tensor, docs: torch.Tensor, k: int, chunk_elements: int = 2**22):
    """Exact top-k (scores, page indices) per query, best first; ties go to the lower index.

    Same arguments and results as `vlmkit.eval.retrieval.search`: 2D embeddings are scored
    by dot product, 3D (multi-vector) ones by MaxSim; blocks hold at most `chunk_elements`
    token-pair scores, so memory is bounded by the block, never by the corpus.
    """
    k = min(k, docs.shape[0])
    per_pair = 1 if queries.dim() == 2 else queries.shape[1] * docs.shape[1]
    query_chunk = max(1, min(queries.shape[0], 1024))
    doc_chunk = max(k + 1, chunk_elements // (query_chunk * per_pair))
    all_scores, all_indices = [], []
    for qs in range(0, queries.shape[0], query_chunk):
        q = queries[qs:qs + query_chunk].float()
        scores, indices = [], []
        for ds in range(0, docs.shape[0], doc_chunk):
            s, columns = _block_top_k(block_scores(q, docs[ds:ds + doc_chunk].float()), k)
            scores.append(s)
            indices.append(columns + ds)
        scores, indices = torch.cat(scores, dim=1), torch.cat(indices, dim=1)
        # The candidates, ordered by index and then (stable) by score: equal scores keep index order.
        by_index = indices.argsort(dim=1)
        scores, indices = scores.gather(1, by_index), indices.gather(1, by_index)
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
        all_scores.append(scores.gather(1, order))
        all_indices.append(indices.gather(1, order))
    return torch.cat(all_scores), torch.cat(all_indices)
