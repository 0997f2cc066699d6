"""Retriever evaluation: search is exact, sharded indexing changes nothing, bad input is named (the metrics
themselves: tests/eval/test_retrieval.py)."""

import json

import pytest
import torch

from tests.retrieval.conftest import make_retriever
from vlmkit.data.page_store import PageStore
from vlmkit.errors import DataError
from vlmkit.eval import retrieval as ev
from vlmkit.model.retriever import score


def _brute_force(queries, docs, k):
    scores = score(queries.float(), docs.float())
    out = []
    for row in scores.tolist():
        out.append(sorted(range(len(row)), key=lambda i: (-row[i], i))[:k])
    return torch.tensor(out)


@pytest.mark.parametrize("multi_vector", [False, True])
def test_exact_search_matches_brute_force_with_ties(multi_vector):
    g = torch.Generator().manual_seed(0)
    shape = (7, 3, 4) if multi_vector else (7, 4)
    queries = torch.randint(-2, 3, shape, generator=g).float()
    docs = torch.randint(-2, 3, (50, *shape[1:]), generator=g).float()  # small integers: many exact ties
    if multi_vector:
        docs[::3, -1] = 0  # some padding tokens
    expected = _brute_force(queries, docs, 10)
    for chunk in (1, 24, 10**9):  # from one page per block to everything at once
        _, indices = ev.search(queries, docs, 10, chunk_elements=chunk)
        assert torch.equal(indices, expected)


@pytest.fixture(scope="module")
def untrained(pairs):
    model, processor = make_retriever([p.query for p in pairs])
    return model.eval(), processor


def test_sharded_index_is_identical_to_unsharded(untrained, docs_dir):
    model, processor = untrained
    store = PageStore(docs_dir / "test_docs.h5")
    ids, whole = ev.encode_pages(model, processor, store, batch_size=5, progress=False)
    for world in (2, 3):
        shares = [ev.encode_pages(model, processor, store, 5, rank, world, progress=False) for rank in range(world)]
        merged_ids, merged = ev.merge_shares(shares, batch_size=5)
        assert merged_ids == ids and torch.equal(merged, whole)


def test_evaluate_end_to_end_and_bad_inputs(untrained, docs_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(ev, "load_retriever", lambda directory: untrained)
    args = (docs_dir / "test_docs.h5", docs_dir / "test_queries.jsonl", docs_dir / "test_qrels.tsv")
    result = ev.evaluate("model", *args, output=tmp_path / "m.json", batch_size=8, progress=False)
    assert set(result) == {"ndcg@5", "ndcg@10", "recall@10", "mrr@10", "n_queries", "n_docs", "mode"}
    assert result["n_queries"] == result["n_docs"] == 24
    assert json.loads((tmp_path / "m.json").read_text()) == result
    run_lines = (tmp_path / "m.trec").read_text().splitlines()
    assert len(run_lines) == 24 * 24 and run_lines[0].split()[1:4:2] == ["Q0", "1"]

    ids, embeddings = ev.build_index(*untrained, PageStore(args[0]), batch_size=8, progress=False)
    ev.save_index(tmp_path / "index.safetensors", ids, embeddings)
    assert ev.evaluate("model", *args, batch_size=8, index=tmp_path / "index.safetensors") == result

    bad_qrels = tmp_path / "qrels.tsv"
    bad_qrels.write_text("query-id\tcorpus-id\tscore\nq00000\tno-such-page\t1\n")
    with pytest.raises(DataError, match=r"qrels\.tsv \(id 'no-such-page'\): page 'no-such-page' is not in"):
        ev.evaluate("model", args[0], args[1], bad_qrels)
    empty = tmp_path / "queries.jsonl"
    empty.write_text('{"id": "a", "text": "fine"}\n{"id": "b", "text": " "}\n')
    with pytest.raises(DataError, match=r"queries\.jsonl:2 \(id 'b'\): the query text is empty"):
        ev.read_queries(empty)


def test_exact_search_over_many_blocks_matches_brute_force():
    # Later blocks only update the queries whose block maximum beats their k-th best: ties
    # across blocks, and rows that change in one block but not the next, must all come out exact.
    g = torch.Generator().manual_seed(1)
    queries = torch.randint(-3, 4, (40, 6), generator=g).float()
    docs = torch.randint(-3, 4, (3000, 6), generator=g).float()
    expected = _brute_force(queries, docs, 10)
    for chunk in (40 * 11, 40 * 150, 2**22):
        scores, indices = ev.search(queries, docs, 10, chunk_elements=chunk)
        assert torch.equal(indices, expected)
        assert torch.equal(scores, score(queries, docs).gather(1, expected))
    # k above the block alignment (256 pages) with blocks of k + 1 pages: the first block must still fill the top k.
    _, indices = ev.search(queries, docs, 300, chunk_elements=40 * 301)
    assert torch.equal(indices, _brute_force(queries, docs, 300))
