"""Retrieval metrics: trec_eval's numbers, on the order vlmkit ranked, over the queries that have a relevant page."""

import math
import random

import pytest

from vlmkit.errors import DataError
from vlmkit.eval import retrieval as ev


def test_query_metrics_by_hand():
    m = ev.query_metrics(["a", "b", "c"], {"b": 1, "z": 1})
    assert m["mrr@10"] == 0.5 and m["recall@10"] == 0.5
    assert m["ndcg@5"] == pytest.approx((1 / math.log2(3)) / (1 + 1 / math.log2(3)))


def test_metrics_agree_with_pytrec_eval_on_random_runs():
    pytrec_eval = pytest.importorskip("pytrec_eval")
    rng = random.Random(0)
    docs = [f"d{i}" for i in range(60)]
    qrels = {f"q{i}": {d: rng.choice([1, 1, 2, 3]) for d in rng.sample(docs, rng.randint(1, 6))} for i in range(50)}
    scores = {q: {d: rng.random() for d in docs} for q in qrels}  # continuous scores: no ties to break
    run = {q: sorted(s, key=s.get, reverse=True) for q, s in scores.items()}
    ours = ev.metrics(run, qrels)
    top10 = {q: {d: scores[q][d] for d in run[q][:10]} for q in qrels}  # recip_rank on the top 10 is MRR@10
    full = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.5,10", "recall.10"}).evaluate(scores)
    cut = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(top10)
    reference = {"ndcg@5": "ndcg_cut_5", "ndcg@10": "ndcg_cut_10", "recall@10": "recall_10"}
    for ours_key, trec_key in reference.items():
        assert ours[ours_key] == pytest.approx(sum(full[q][trec_key] for q in qrels) / len(qrels), abs=1e-9)
    assert ours["mrr@10"] == pytest.approx(sum(cut[q]["recip_rank"] for q in qrels) / len(qrels), abs=1e-9)


def test_metrics_score_the_given_order_and_only_the_top_10():
    # trec_eval alone would reorder pages of equal score by id ("b" before "a"); the run's order must hold.
    assert ev.query_metrics(["a", "b"], {"a": 1})["mrr@10"] == 1.0
    late = ev.query_metrics([f"d{i}" for i in range(10)] + ["hit"], {"hit": 1})
    assert late == {"ndcg@5": 0.0, "ndcg@10": 0.0, "recall@10": 0.0, "mrr@10": 0.0}


def test_metrics_skip_queries_without_a_relevant_page():
    run = {"q1": ["a", "b"], "q2": ["a", "b"], "q3": ["a"], "unjudged": ["a"]}
    qrels = {"q1": {"a": 1}, "q2": {"b": 2, "a": 0}, "q3": {"a": 0}}
    m = ev.metrics(run, qrels)
    assert m["n_queries"] == 2 and m["mrr@10"] == pytest.approx((1 + 0.5) / 2)
    assert m["recall@10"] == 1.0
    with pytest.raises(DataError, match="no query has a relevant page"):
        ev.metrics({"q3": ["a"]}, qrels)
