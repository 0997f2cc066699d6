"""Exact search: queries/s and peak memory of vlmkit's exact top-k against faiss-cpu's IndexFlatIP.

    python benchmarks/search.py [--small] [--docs 1000000] [--queries 1000] [--dim 256] [--mv-docs 5000]

Single-vector: top-10 of 1,000 queries over 1,000,000 x 256 float32 page vectors. Multi-vector
(MaxSim, as ColPali scores): a smaller corpus, 5,000 pages of up to 64 token vectors of 128
dims (zero-padded, as vlmkit stores them) and 100 queries of 32 tokens. faiss has no exact
MaxSim index (and its `pairwise_distances` for inner products is numpy's `@`), so the
multi-vector reference is plain numpy: one BLAS product per block, per-page max, sum.

Measured: `vlmkit.eval.exact_search.search_topk` (what `vlmkit.eval.retrieval.search` and
`vlmkit retriever eval` use). Targets: within 1.2x of the reference's time (ratio of queries/s
>= 0.83), and single-vector search at >= 0.7 of the float32 matmul peak (its FLOPs: one
product, 2 x queries x pages x dim; the peak: the best 2048^3 torch.mm of probes before and after).

Vectors hold small integers (as int8/int9-quantised embeddings do): every score is then
exact in float32 whatever the order of summation, so any two correct implementations must
return the same pages, and the script asserts it. Equal scores are ordered by page index
(vlmkit's documented rule); faiss orders them the other way round within its top-k, so the
reference's runs of equal scores are re-sorted by index before comparing (the count of
rows this changed is reported).

Each implementation runs in its own process, with its resident-memory high-water mark
reset once the corpus is loaded (and faiss's index built): the memory figure is the peak
during search, corpus included. On a GPU, vlmkit's search runs there (the references stay
on the CPU) and the CUDA allocator's peak is added to the details. Expected time here:
3-4 minutes full size (faiss takes most), 1 minute small.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import common
import numpy as np
import torch

SINGLE_RANGE, MULTI_RANGE = 255, 63  # |value| bounds keeping every partial sum below 2^24 (exact in float32)
MV_DIM = 128  # multi-vector token size, as ColPali's


def make_data(out: Path, args) -> None:
    """Seeded corpora written as .npy files (the single-vector one in chunks, to keep memory low)."""
    g = torch.Generator().manual_seed(0)
    docs = np.lib.format.open_memmap(out / "docs.npy", mode="w+", dtype=np.float32, shape=(args.docs, args.dim))
    for s in range(0, args.docs, 100_000):
        n = min(100_000, args.docs - s)
        docs[s:s + n] = torch.randint(-SINGLE_RANGE, SINGLE_RANGE + 1, (n, args.dim), generator=g).float().numpy()
    docs.flush()
    del docs
    queries = torch.randint(-SINGLE_RANGE, SINGLE_RANGE + 1, (args.queries, args.dim), generator=g).float()
    np.save(out / "queries.npy", queries.numpy())
    mv = torch.randint(-MULTI_RANGE, MULTI_RANGE + 1, (args.mv_docs, args.mv_doc_tokens, MV_DIM), generator=g).float()
    lengths = torch.randint(args.mv_doc_tokens // 2, args.mv_doc_tokens + 1, (args.mv_docs,), generator=g)
    mv[torch.arange(args.mv_doc_tokens)[None, :] >= lengths[:, None]] = 0  # zero padding past each page's length
    np.save(out / "mv_docs.npy", mv.numpy())
    q = torch.randint(-MULTI_RANGE, MULTI_RANGE + 1, (args.mv_queries, args.mv_query_tokens, MV_DIM), generator=g)
    np.save(out / "mv_queries.npy", q.float().numpy())


def numpy_maxsim(queries: np.ndarray, docs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """MaxSim top-k in plain numpy (BLAS products, per-page max, sum); ties to the lower page index."""
    nq, lq, dim = queries.shape
    nd, ld, _ = docs.shape
    padding = ~docs.any(-1)  # (pages, tokens): an all-zero vector is padding, as vlmkit has it
    flat = queries.reshape(-1, dim)
    block = max(1, 2**24 // (nq * lq * ld))
    scores = np.empty((nq, nd), dtype=np.float32)
    for s in range(0, nd, block):
        part = docs[s:s + block]
        sims = (flat @ part.reshape(-1, dim).T).reshape(nq, lq, len(part), ld)
        np.putmask(sims, np.broadcast_to(padding[None, None, s:s + len(part)], sims.shape), -np.inf)
        scores[:, s:s + len(part)] = sims.max(-1).sum(1)
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, top, 1), top


def child(job: dict) -> dict:
    """One implementation on one corpus, in this fresh process: median time and peak memory."""
    import faiss

    from vlmkit.eval.exact_search import search_topk

    data, k, prefix = Path(job["data"]), job["k"], "mv_" if job["kind"] == "multi" else ""
    faiss.omp_set_num_threads(torch.get_num_threads())  # the same threads as torch
    docs, queries = np.load(data / f"{prefix}docs.npy"), np.load(data / f"{prefix}queries.npy")
    queries = queries[:job["n_queries"]]
    if job["impl"] == "reference" and job["kind"] == "single":
        index = faiss.IndexFlatIP(docs.shape[1])
        index.add(docs)  # faiss keeps its own copy; ours is dropped
        del docs
        run = lambda: index.search(queries, k)
    elif job["impl"] == "reference":
        run = lambda: numpy_maxsim(queries, docs, k)
    else:
        fn = search_topk
        dev = common.device()  # on a GPU, vlmkit's search runs there (the references stay on the CPU)
        q, d = torch.from_numpy(queries).to(dev), torch.from_numpy(docs).to(dev)
        run = lambda: tuple(t.cpu().numpy() for t in fn(q, d, k))
    before = common.rss_mib()
    common.reset_peak_rss()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    last = {}
    timing = common.timed(lambda: last.update(result=run()), warmup=job["warmup"], repeats=job["repeats"])
    peak = common.peak_rss_mib()
    if torch.cuda.is_available():
        timing["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    scores, ids = last["result"]
    np.save(data / f"ids-{job['impl']}-{job['kind']}.npy", ids.astype(np.int64))
    np.save(data / f"scores-{job['impl']}-{job['kind']}.npy", scores)
    return {**job, **timing, "queries_per_s": len(queries) / timing["median_s"], "peak_mib": peak,
            "working_mib": peak - before}


def compare(data: Path, kind: str, impls: list[str]) -> dict:
    """Assert that every implementation returns vlmkit's pages (the reference's equal scores put in index order)."""
    ids = {i: np.load(data / f"ids-{i}-{kind}.npy") for i in impls}
    scores = {i: np.load(data / f"scores-{i}-{kind}.npy") for i in impls}
    # Within equal scores faiss puts higher indices first, vlmkit lower: sort by (score, index).
    order = np.lexsort((ids["reference"], -scores["reference"]), axis=-1)
    fixed = np.take_along_axis(ids["reference"], order, 1)
    reordered = int((fixed != ids["reference"]).any(1).sum())
    ids["reference"] = fixed
    reference = ids["vlmkit"]
    for impl, got in ids.items():
        n = len(got)
        assert np.array_equal(got, reference[:n]), f"{kind}: {impl}'s top-k pages differ from vlmkit's exact search"
        assert np.array_equal(scores[impl], scores["vlmkit"][:n]), f"{kind}: {impl}'s scores differ"
    top = scores["vlmkit"]
    return {"ids_equal": True, "reference_rows_reordered": reordered,
            "queries_with_equal_scores_in_top_k": int((np.diff(top, axis=1) == 0).any(1).sum())}


def run_child(data: Path, kind: str, impl: str, args) -> dict:
    """One implementation's figures, from a fresh process."""
    n_queries = args.queries if kind == "single" else args.mv_queries
    job = {"impl": impl, "kind": kind, "data": str(data), "k": args.k, "n_queries": n_queries,
           "warmup": 1, "repeats": 2 if kind == "single" else 3}
    code, output, seconds = common.run_python([__file__, "--child", json.dumps(job)], timeout=1200)
    if code != 0:
        raise RuntimeError(f"{impl} {kind} failed:\n{output[-3000:]}")
    result = common.child_result(output)
    print(f"{kind} {impl}: {result['queries_per_s']:.1f} queries/s ({seconds:.0f} s)", flush=True)
    return result


def corpus_text(kind: str, args) -> str:
    if kind == "single":
        return f"{args.docs:,} pages x {args.dim}, {args.queries:,} queries"
    return (f"{args.mv_docs:,} pages x {args.mv_doc_tokens} tokens x {MV_DIM}, "
            f"{args.mv_queries} queries x {args.mv_query_tokens} tokens")


def main() -> None:
    parser = common.parser(__doc__, child_jobs=True)
    parser.add_argument("--docs", type=int, help="single-vector pages (default 1,000,000; small 50,000)")
    parser.add_argument("--queries", type=int, help="single-vector queries (default 1,000; small 200)")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--mv-docs", type=int, help="multi-vector pages (default 5,000; small 1,000)")
    parser.add_argument("--mv-doc-tokens", type=int, default=64)
    parser.add_argument("--mv-queries", type=int, default=100)
    parser.add_argument("--mv-query-tokens", type=int, default=32)
    args = parser.parse_args()
    if common.ran_child(args, child):
        return
    started = time.perf_counter()
    args.docs = args.docs or (50_000 if args.small else 1_000_000)
    args.queries = args.queries or (200 if args.small else 1000)
    args.mv_docs = args.mv_docs or (1000 if args.small else 5000)

    entries = []
    # The peak: the best of a probe before and one after the searches (one probe can run slow
    # while the kernel reclaims the memory a child just freed).
    peak = common.matmul_peak(common.device(), torch.float32, 2048)
    with tempfile.TemporaryDirectory(prefix="vlmkit-search-") as tmp:
        data = Path(tmp)
        make_data(data, args)
        for kind in ("single", "multi"):
            results = {impl: run_child(data, kind, impl, args) for impl in ("vlmkit", "reference")}
            details = {"corpus": corpus_text(kind, args), "k": args.k, **compare(data, kind, list(results))}
            ours, ref = results["vlmkit"], results["reference"]
            name = "faiss IndexFlatIP" if kind == "single" else "numpy MaxSim"
            entries.append(common.entry(f"search {kind} exact_search.search_topk", ours["queries_per_s"],
                                        "queries/s", ref["queries_per_s"], name, target_min=1 / 1.2, **details))
            if kind == "single":  # its work is one product: 2 x queries x pages x dim FLOPs
                flops = 2 * args.queries * args.docs * args.dim * ours["queries_per_s"] / args.queries
                peak = max(peak, common.matmul_peak(common.device(), torch.float32, 2048))
                entries.append(common.entry("search single vs matmul peak", flops / 1e9, "GFLOP/s", peak / 1e9,
                                            "float32 matmul peak (2048^3 torch.mm)", target_min=0.7, **details))
            entries += [
                common.entry(f"search {kind} peak memory", ours["peak_mib"], "MiB", ref["peak_mib"], f"{name}, MiB",
                             working_mib={k: r["working_mib"] for k, r in results.items()},
                             peak_mib={k: r["peak_mib"] for k, r in results.items()},
                             cuda_peak_mib=ours.get("cuda_peak_mib"), **details),
            ]
    common.save_entries(args.out, entries, started)


if __name__ == "__main__":
    main()
