"""Token pooling: fewer vectors per page in a multi-vector (ColPali-style) index.

A multi-vector page costs one vector per token in memory and in every MaxSim product, and
many of its tokens are near copies (blank margins, repeated texture). Hierarchical token
pooling (Clavié, Chaffin and Adams, "Reducing the Footprint of Multi-Vector Retrieval with
Minimal Performance Impact via Token Pooling", 2024; colpali-engine's
`HierarchicalTokenPooler`) clusters a page's token vectors by Ward linkage into
max(1, tokens // pool_factor) groups and keeps each group's mean, so the index shrinks by
about the pool factor. Queries are never pooled: their tokens are few and each one asks for
something.

One difference from colpali-engine: it hands scipy the rows of the cosine-distance matrix as
the points to cluster (n x n numbers a page); here the token vectors themselves are the
points, which is what Ward's criterion is defined on (for unit vectors, Euclidean distance
grows with cosine distance) and costs n x dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.cluster.hierarchy import fcluster, linkage
from torch.nn.utils.rnn import pad_sequence

from vlmkit.errors import ConfigError


def pool_page_tokens(embeddings: torch.Tensor, pool_factor: int, normalize: bool) -> torch.Tensor:
    """Pool each page of a zero-padded (pages, tokens, dim) index to about tokens // pool_factor vectors.

    Padding (all-zero) rows are not tokens: they are left out of the clustering and the count.
    `normalize`: the model L2-normalises its embeddings, so each mean is put back on the unit
    sphere. The result is zero-padded to its longest page; `pool_factor` 1 returns `embeddings`
    itself.
    """
    check_pool_factor(pool_factor)
    if pool_factor == 1:
        return embeddings
    if embeddings.dim() != 3:
        raise ConfigError(f"--pool-factor {pool_factor} needs multi-vector page embeddings (a retriever with "
                          f"retrieval.multi_vector_dim > 0); these are one vector a page, shape "
                          f"{tuple(embeddings.shape)}; use --pool-factor 1")
    pages = [_pool_one_page(page[page.abs().sum(-1) != 0], pool_factor, normalize) for page in embeddings]
    return pad_sequence(pages, batch_first=True)


def check_pool_factor(pool_factor: int) -> None:
    """Refuse a pool factor below 1 before any page is encoded."""
    if pool_factor < 1:
        raise ConfigError(f"--pool-factor {pool_factor} must be at least 1 (1: no pooling)")


def _pool_one_page(tokens: torch.Tensor, pool_factor: int, normalize: bool) -> torch.Tensor:
    """The cluster means of one page's (tokens, dim) real vectors."""
    if len(tokens) <= 1:  # nothing to merge (and linkage needs two points)
        return tokens
    n_clusters = max(1, len(tokens) // pool_factor)
    tree = linkage(tokens.double().cpu().numpy(), method="ward")
    labels = torch.from_numpy(fcluster(tree, t=n_clusters, criterion="maxclust"))
    # fcluster numbers clusters 1..k; with exact ties it may make fewer than n_clusters.
    means = torch.stack([tokens[labels == label].mean(dim=0) for label in labels.unique()])
    return F.normalize(means, dim=-1) if normalize else means
