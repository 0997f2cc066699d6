"""Exact top-k search at matrix-product speed (`vlmkit.eval.retrieval.search` is this function).

A first version merged every block of scores into the running top-k with a full stable sort,
so sorting, not scoring, took most of its time on a large corpus (top-10 of 1,000 queries over
1,000,000 x 256: about 15x this function's time, 6x faiss's IndexFlatIP's). Here each block
goes through `torch.topk` (a partial selection), only the few candidates are sorted, and
blocks are smaller (16 MB of scores by default), so they stay in cache between the product and
the selection. The contract: exact scores, best first, and equal scores ordered by page index,
lower first -- also across the k-th place, where `torch.topk` alone would pick among equal
scores arbitrarily. benchmarks/search.py checks the ids against faiss's.
"""

from __future__ import annotations

import torch


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


def search_topk(queries: torch.Tensor, docs: torch.Tensor, k: int, chunk_elements: int = 2**22):
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
    # One buffer for every block's products: allocating a block's worth each time makes the
    # allocator keep freed blocks around (several hundred MB of resident memory in a long search).
    buffer = torch.empty(query_chunk * doc_chunk * per_pair, device=queries.device)
    all_scores, all_indices = [], []
    for qs in range(0, queries.shape[0], query_chunk):
        q = queries[qs:qs + query_chunk].float()
        scores, indices = [], []
        for ds in range(0, docs.shape[0], doc_chunk):
            s, columns = _block_top_k(block_scores(q, docs[ds:ds + doc_chunk].float(), buffer), k)
            scores.append(s)
            indices.append(columns + ds)
            if len(scores) == 64:  # keep the candidates few
                best_scores, best_indices = _best(scores, indices, k)
                scores, indices = [best_scores], [best_indices]
        best_scores, best_indices = _best(scores, indices, k)
        all_scores.append(best_scores)
        all_indices.append(best_indices)
    return torch.cat(all_scores), torch.cat(all_indices)
