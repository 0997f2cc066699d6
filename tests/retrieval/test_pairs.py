"""Pairs JSONL: checked reading, batches without false in-batch negatives, and the split by document."""

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vlmkit.data.pairs import Pair, PairBatches, build_batches, check_ids, document_of, read_pairs, split_pairs
from vlmkit.errors import DataError


def _write(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


@pytest.mark.parametrize(("line", "message"), [
    ({"query": "  ", "pos": ["a"]}, "empty or missing \"query\""),
    ({"query": "q", "pos": []}, '"pos" is empty'),
    ({"query": "q", "pos": ["a"], "neg": "b"}, '"neg" must be a list'),
    ("{not json", "not valid JSON"),
])
def test_bad_lines_name_file_and_line(tmp_path, line, message):
    path = _write(tmp_path / "pairs.jsonl", [{"query": "fine", "pos": ["a"]}, line])
    with pytest.raises(DataError, match=rf"pairs\.jsonl:2: .*{message}"):
        read_pairs(path)


def test_missing_page_names_file_line_and_id(tmp_path):
    lines = [{"query": "q1", "pos": ["a"]}, {"query": "q2", "pos": ["b"], "neg": ["zz"]}]
    path = _write(tmp_path / "pairs.jsonl", lines)
    with pytest.raises(DataError, match=r"pairs\.jsonl:2 \(id 'zz'\): page 'zz' is not in the page store"):
        check_ids(read_pairs(path), {"a", "b"}, path, "store.h5")


def _pairs_with_clashes(seed: int, n: int, n_pages: int, n_queries: int) -> list[Pair]:
    """Few distinct pages and query texts, so clashes are everywhere."""
    rng = random.Random(seed)
    pages = [f"p{i}" for i in range(n_pages)]
    return [Pair(f"q{rng.randrange(n_queries)}", [rng.choice(pages)], rng.sample(pages, 3), i) for i in range(n)]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**6), batch_size=st.integers(1, 8), hard=st.integers(0, 2))
def test_no_page_or_query_twice_in_a_batch(seed, batch_size, hard):
    pairs = _pairs_with_clashes(seed, 120, n_pages=30, n_queries=40)
    batches = build_batches(pairs, batch_size, hard_negatives=hard, seed=seed)
    assert batches, "clashes only delay items; full batches must still come out"
    for batch in batches:
        assert len(batch) == batch_size
        pages = [item.pos for item in batch] + [n for item in batch for n in item.neg]
        assert len(pages) == len(set(pages)) == batch_size * (1 + hard)
        assert len({item.query for item in batch}) == batch_size
        assert all(item.pos not in item.neg for item in batch)


def test_processes_get_consecutive_shares_of_one_global_batch():
    pairs = _pairs_with_clashes(0, 200, n_pages=120, n_queries=200)
    whole = PairBatches(pairs, batch_size=8, world_size=1, seed=3)
    split = PairBatches(pairs, batch_size=4, world_size=2, seed=3)
    assert len(split) == 2 * len(whole)
    for b in range(len(whole)):
        ranks = [split[2 * b + r] for r in range(2)]
        assert ranks[0]["queries"] + ranks[1]["queries"] == whole[b]["queries"]
    split.set_epoch(1)
    assert split[0]["queries"] != PairBatches(pairs, 4, 2, seed=3)[0]["queries"]  # a new shuffle per epoch


def test_too_few_distinct_pages_for_one_batch_is_an_error():
    with pytest.raises(DataError, match="lower the batch size"):
        PairBatches([Pair(f"q{i}", ["same"]) for i in range(10)], batch_size=2)


def test_split_by_page_never_shares_a_positive_page():
    pairs = _pairs_with_clashes(1, 300, n_pages=60, n_queries=300)
    train, test = split_pairs(pairs, 0.25, seed=0)
    train_pages = {d for p in train for d in p.pos + p.neg}
    test_pages = {d for p in test for d in p.pos + p.neg}
    assert train and test and not train_pages & test_pages
    assert len(train) + len(test) == len(pairs)  # one positive each: nothing is dropped


def test_split_by_document_keeps_each_document_on_one_side():
    negatives = lambda i: [f"doc{j}.pdf#9" for j in range(8) if j != i % 8]  # a page of every other document
    pairs = [Pair(f"q{i}", [f"doc{i % 8}.pdf#{i % 5 + 1}"], negatives(i)) for i in range(80)]
    train, test = split_pairs(pairs, 0.25, seed=0, by="document")
    documents = [{document_of(d) for p in side for d in p.pos + p.neg} for side in (train, test)]
    assert len(documents[1]) == 2 and not documents[0] & documents[1]
    assert len(train) + len(test) == len(pairs)
    # Each side keeps the negatives of its own documents: 1 other test document, 5 other training ones.
    assert {len(p.neg) for p in test} == {1} and {len(p.neg) for p in train} == {5}
