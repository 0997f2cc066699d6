"""Exact top-k search at matrix-product speed (`vlmkit.eval.retrieval.search` is this function).

Scores are computed block by block, in one reused buffer (32 MB of scores by default: products
of a few thousand pages, which BLAS runs near its peak, in bounded memory). The first block goes
through `torch.topk` (a partial selection, not a sort); after it, only the queries whose best score in
a block beats their k-th best so far are selected from at all -- a few rows once the first
blocks are seen -- so the selection costs little beside the product. The contract: exact
scores, best first, and equal scores ordered by page index, lower first -- also across the
k-th place, where `torch.topk` alone would pick among equal scores arbitrarily.
benchmarks/search.py checks the ids against faiss's.
"""

from __future__ import annotations

import torch

ALIGN = 256  # pages per block, when a block holds more: a multiple of this


def block_scores(queries: torch.Tensor, docs: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """`vlmkit.model.retriever.score` for one block: dot products, or MaxSim for 3D embeddings.

    MaxSim is one matrix product of all query tokens with all page tokens, masked in place
    (padding page tokens are zero vectors) and reduced, where `score` builds its 4D tensor
    with einsum and a masked copy: the same scores, in about half the time. `out`, a flat
    float32 buffer of at least the products' size, is written instead of allocating.
    """
    flat_q = queries.reshape(-1, queries.shape[-1])
    flat_d = docs.reshape(-1, docs.shape[-1])
    shape = (flat_q.shape[0], flat_d.shape[0])
    products = torch.mm(flat_q, flat_d.T, out=None if out is None else out[: shape[0] * shape[1]].view(shape))
    if queries.dim() == 2:
        return products
    sims = products.view(queries.shape[0], queries.shape[1], docs.shape[0], docs.shape[1])
    sims.masked_fill_(docs.abs().sum(-1) == 0, float("-inf"))
    return sims.amax(dim=-1).sum(dim=1)  # each query token's best page token, summed


def _block_top_k(block: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k (scores, column indices) of each row; among equal scores at the cut, the lower columns."""
    if block.shape[1] <= k:
        # a copy: `block` is a view of the buffer the next block overwrites
        return block.clone(), torch.arange(block.shape[1], device=block.device).expand(block.shape[0], -1)
    values, columns = block.topk(k + 1, dim=1)  # one more, to see whether the k-th score is shared past the cut
    tied = torch.nonzero(values[:, k - 1] == values[:, k]).flatten().tolist()
    values, columns = values[:, :k].clone(), columns[:, :k].clone()
    for row in tied:  # rare with real embeddings: keep every higher score, then the lowest columns at the cut
        cut = values[row, k - 1]
        above = torch.nonzero(block[row] > cut).flatten()
        keep = torch.cat([above, torch.nonzero(block[row] == cut).flatten()[: k - above.numel()]])
        values[row], columns[row] = block[row, keep], keep
    return values, columns


def _best(scores: list[torch.Tensor], indices: list[torch.Tensor], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best of the candidate blocks, by score and then by index (lower first)."""
    scores, indices = torch.cat(scores, dim=1), torch.cat(indices, dim=1)
    by_index = indices.argsort(dim=1)  # then a stable sort by score keeps equal scores in index order
    scores, indices = scores.gather(1, by_index), indices.gather(1, by_index)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return scores.gather(1, order), indices.gather(1, order)


def search_topk(queries: torch.Tensor, docs: torch.Tensor, k: int, chunk_elements: int = 2**23):
    """Exact top-k (scores, page indices) per query, best first; ties go to the lower index.

    Same arguments and results as `vlmkit.eval.retrieval.search`: 2D embeddings are scored
    by dot product, 3D (multi-vector) ones by MaxSim; blocks hold at most `chunk_elements`
    token-pair scores, so memory is bounded by the block, never by the corpus.
    """
    k = min(k, docs.shape[0])
    if k == 0 or queries.shape[0] == 0:
        return torch.zeros(queries.shape[0], k), torch.zeros(queries.shape[0], k, dtype=torch.long)
    per_pair = 1 if queries.dim() == 2 else queries.shape[1] * docs.shape[1]
    # Fewer queries per block when pairs are large (multi-vector), so a block never exceeds the budget.
    query_chunk = max(1, min(queries.shape[0], 1024, chunk_elements // (per_pair * (k + 1))))
    doc_chunk = max(k + 1, chunk_elements // (query_chunk * per_pair))
    if doc_chunk > ALIGN:  # BLAS runs products of 4,096 columns a third faster than of 4,194
        doc_chunk = max(k + 1, doc_chunk - doc_chunk % ALIGN)  # never below k + 1: the first block fills the top k
    # One buffer for every block's products: allocating a block's worth each time makes the
    # allocator keep freed blocks around (several hundred MB of resident memory in a long search).
    buffer = torch.empty(query_chunk * doc_chunk * per_pair, device=queries.device)
    all_scores, all_indices = [], []
    for qs in range(0, queries.shape[0], query_chunk):
        q = queries[qs:qs + query_chunk].float()
        best_scores = best_indices = None
        for ds in range(0, docs.shape[0], doc_chunk):
            block = block_scores(q, docs[ds:ds + doc_chunk].float(), buffer)
            if best_scores is None:
                s, columns = _block_top_k(block, k)
                best_scores, best_indices = _best([s], [columns + ds], k)
                continue
            # Only a query whose best score in this block beats its k-th best so far can change:
            # after the first blocks that is a few rows, so the selection costs little beside the
            # product. Strictly beats: an equal score on a later page loses to the page held.
            rows = torch.nonzero(block.amax(dim=1) > best_scores[:, -1]).flatten()
            if rows.numel() == 0:
                continue
            s, columns = _block_top_k(block if rows.numel() == block.shape[0] else block[rows], k)
            merged = _best([best_scores[rows], s], [best_indices[rows], columns + ds], k)
            best_scores[rows], best_indices[rows] = merged
        all_scores.append(best_scores)
        all_indices.append(best_indices)
    return torch.cat(all_scores), torch.cat(all_indices)
