"""The table of examples/real_pdfs/run.sh: BM25, the dense retriever and both fused, beside random ranking.

    python -m examples.real_pdfs.report OUT MODEL
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path


def random_floor(n_docs: int, k: int = 10) -> dict:
    """Expected nDCG@k and recall@k of a uniformly random ranking, one relevant page per query."""
    ndcg = sum(1 / n_docs / math.log2(rank + 1) for rank in range(1, min(k, n_docs) + 1))
    return {"ndcg@10": ndcg, "recall@10": min(k, n_docs) / n_docs}


def main(out: Path, model: Path) -> None:
    hybrid = json.loads((model / "hybrid.json").read_text())
    fusion = {"rrf": "reciprocal rank", "score": "scores"}[hybrid["fusion"]]
    rows = {"BM25 (text layer)": json.loads((out / "bm25.json").read_text()),
            "dense retriever": json.loads((model / "dense.json").read_text()),
            f"hybrid ({fusion}, {hybrid['weights'][0]:g}:{hybrid['weights'][1]:g})": hybrid}
    n_docs = rows["BM25 (text layer)"]["n_docs"]
    rows = {"random ranking": random_floor(n_docs), **rows}
    queries = sum(1 for line in (out / "test" / "test_queries.jsonl").open() if line.strip())
    print(f"held-out documents: {n_docs} pages, {queries} queries; retriever {model}")
    width = max(len(name) for name in rows)
    print(f"| {'search':<{width}} | nDCG@10 | recall@10 |\n|{'-' * (width + 2)}|---------|-----------|")
    for name, metrics in rows.items():
        print(f"| {name:<{width}} | {metrics['ndcg@10']:.3f}   | {metrics['recall@10']:.3f}     |")
    print(f"hybrid: the fusion and weights chosen on the validation documents ({model / 'valid_sweep.json'})")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
