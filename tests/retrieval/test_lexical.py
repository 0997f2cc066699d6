"""Lexical and hybrid page search: BM25 over the text layers, reciprocal rank and score fusion, and
both through `evaluate` and `PageSearch` (image-only stores fall back to dense search)."""

import io
import json

import pytest
import pytrec_eval
from PIL import Image

from tests.retrieval.conftest import make_retriever
from vlmkit.data.page_store import PageStoreWriter
from vlmkit.errors import ConfigError
from vlmkit.eval import retrieval as ev
from vlmkit.eval.lexical import FUSIONS, RRF_K, LexicalIndex, fuse, min_max, reciprocal_rank_fusion, score_fusion
from vlmkit.serve.page_search import PageSearch

TEXTS = {
    "manual.pdf#1": "Installing the printer driver: run setup and choose the network port.",
    "manual.pdf#2": "Paper jams: open tray 2 and remove the crumpled sheet.",
    "report.pdf#1": "Quarterly revenue grew 12 percent in the northern region.",
    "report.pdf#2": "Headcount and hiring plans for the next fiscal year.",
    "scan.png": "",  # an image page without a text layer
}
QUERIES = {"q1": "printer driver network", "q2": "paper jam tray", "q3": "revenue northern region",
           "q4": "hiring plans"}
QRELS = {"q1": {"manual.pdf#1": 1}, "q2": {"manual.pdf#2": 1}, "q3": {"report.pdf#1": 1}, "q4": {"report.pdf#2": 1}}


def png(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (48, 64), colour).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture
def corpus(tmp_path):
    store = tmp_path / "pages.h5"
    with PageStoreWriter(store) as writer:
        for n, (doc_id, text) in enumerate(TEXTS.items()):
            writer.add(doc_id, png(("red", "green", "blue", "white", "black")[n]), {"text": text} if text else {})
    queries = tmp_path / "queries.jsonl"
    queries.write_text("".join(f'{{"id": "{q}", "text": "{t}"}}\n' for q, t in QUERIES.items()))
    qrels = tmp_path / "qrels.tsv"
    qrels.write_text("query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t1\n" for q, j in QRELS.items() for d in j))
    return store, queries, qrels


def test_bm25_finds_the_page_with_the_words_and_skips_pages_without_text():
    index = LexicalIndex(list(TEXTS), list(TEXTS.values()))
    assert len(index) == 4 and "scan.png" not in index.ids
    for query, page in (("printer driver", "manual.pdf#1"), ("crumpled sheet in tray", "manual.pdf#2")):
        ranked = index.search([query], 10)[0]
        assert ranked[0][0] == page and all(score > 0 for _, score in ranked)
    assert index.search(["zebra xylophone"], 10) == [[]]  # no word in common: nothing listed
    assert LexicalIndex(["a"], [""]).search(["anything"], 3) == [[]]


def test_reciprocal_rank_fusion_adds_weighted_inverse_ranks():
    fused = dict(reciprocal_rank_fusion([["a", "b", "c"], ["c", "a"]], [1.0, 2.0]))
    assert fused["a"] == pytest.approx(1 / (RRF_K + 1) + 2 / (RRF_K + 2))
    assert fused["c"] == pytest.approx(1 / (RRF_K + 3) + 2 / (RRF_K + 1))
    assert fused["b"] == pytest.approx(1 / (RRF_K + 2))
    assert [doc for doc, _ in reciprocal_rank_fusion([["a", "b", "c"], ["c", "a"]], [1.0, 2.0])] == ["c", "a", "b"]
    # A ranking weighted 0 is left out: its pages are not listed after the others.
    assert reciprocal_rank_fusion([["a", "b"], ["c"]], [0.0, 1.0]) == [("c", 1 / (RRF_K + 1))]
    # Equal scores keep the order in which pages were first met.
    assert [d for d, _ in reciprocal_rank_fusion([["x", "y"], ["y", "x"]], [1.0, 1.0])] == ["x", "y"]


def test_score_fusion_adds_weighted_min_max_normalised_scores():
    runs = [[("a", 3.0), ("b", 2.0), ("c", 1.0)], [("c", 10.0), ("a", 6.0)]]
    assert score_fusion(runs, [1.0, 2.0]) == [("c", 2.0), ("a", 1.0), ("b", 0.5)]
    # Each ranking is normalised over its own list: its scale and offset do not matter.
    rescaled = [runs[0], [(doc, 100.0 * score - 7.0) for doc, score in runs[1]]]
    assert [(doc, pytest.approx(score)) for doc, score in score_fusion(rescaled, [1.0, 2.0])] == score_fusion(
        runs, [1.0, 2.0])
    assert score_fusion([[("a", 5.0), ("b", 5.0)], []], [1.0, 1.0]) == [("a", 1.0), ("b", 1.0)]  # equal: all 1
    assert score_fusion([[("a", 2.0), ("b", 1.0)], [("c", 1.0)]], [0.0, 1.0]) == [("c", 1.0)]  # weight 0: left out


def test_min_max_keeps_infinite_and_missing_scores_in_range():
    assert min_max([2.0, 1.0, float("-inf")]) == [1.0, 0.0, 0.0]  # -inf: a page with no token vectors
    assert min_max([2.0, float("nan"), 0.0]) == [1.0, 0.0, 0.0]
    assert min_max([3.0]) == [1.0] and min_max([float("-inf")]) == [0.0] and min_max([]) == []
    fused = score_fusion([[("a", 1.0), ("b", float("-inf"))], [("c", 2.0)]], [1.0, 1.0])
    assert fused == [("a", 1.0), ("c", 1.0), ("b", 0.0)]  # no NaN to scramble the order


def test_score_fusion_lets_a_weak_ranking_break_the_strong_ones_near_ties_where_rrf_does_not():
    bm25 = [("x", 10.0), ("y", 9.9), ("z", 1.0)]  # x and y nearly tied
    dense = [("y", 0.5), ("z", 0.45), ("x", 0.1)]
    assert [doc for doc, _ in fuse([dense, bm25], (0.2, 0.8), 3, "score")] == ["y", "x", "z"]
    assert [doc for doc, _ in fuse([dense, bm25], (0.2, 0.8), 3, "rrf")] == ["x", "y", "z"]
    with pytest.raises(ConfigError, match="fusion 'max' is not one of rrf, score"):
        fuse([dense, bm25], (1.0, 1.0), 3, "max")


def test_lexical_evaluation_equals_pytrec_eval_on_its_run_file(corpus, tmp_path):
    store, queries, qrels = corpus
    result = ev.evaluate(None, store, queries, qrels, output=tmp_path / "lexical.json", mode="lexical")
    assert result["mode"] == "lexical" and result["ndcg@10"] == 1.0  # each query names its page's words
    run = {}
    for line in (tmp_path / "lexical.trec").read_text().splitlines():
        qid, _, doc_id, _, score, _ = line.split()
        run.setdefault(qid, {})[doc_id] = float(score)
    trec = pytrec_eval.RelevanceEvaluator(QRELS, {"ndcg_cut.10"}).evaluate(run)
    assert result["ndcg@10"] == pytest.approx(sum(m["ndcg_cut_10"] for m in trec.values()) / len(trec))
    with pytest.raises(ConfigError, match="hybrid search needs a retriever"):
        ev.evaluate(None, store, queries, qrels, mode="hybrid")


def test_hybrid_fuses_the_dense_and_lexical_rankings(corpus, tmp_path, monkeypatch):
    store, queries, qrels = corpus
    model, processor = make_retriever(list(QUERIES.values()))
    model.eval()
    monkeypatch.setattr(ev, "load_retriever", lambda directory: (model, processor))
    runs = {}
    for mode in ("dense", "lexical", "hybrid"):
        ev.evaluate("model", store, queries, qrels, output=tmp_path / f"{mode}.json", mode=mode, weights=(1.0, 3.0))
        runs[mode] = {}
        for line in (tmp_path / f"{mode}.trec").read_text().splitlines():
            qid, _, doc_id, _, _, _ = line.split()
            runs[mode].setdefault(qid, []).append(doc_id)
    for qid in QUERIES:
        expected = reciprocal_rank_fusion([runs["dense"][qid], runs["lexical"][qid]], [1.0, 3.0])
        assert runs["hybrid"][qid] == [doc_id for doc_id, _ in expected]
    search = PageSearch(model, processor, store, mode="hybrid", weights=(1.0, 3.0))
    assert [doc for doc, _ in search.ranked(QUERIES["q3"], 3)] == runs["hybrid"]["q3"][:3]
    assert search.top(QUERIES["q3"], 1)[0].image.size == (48, 64)


def test_hybrid_score_fusion_fuses_the_two_rankings_scores(corpus, tmp_path, monkeypatch):
    store, queries, qrels = corpus
    model, processor = make_retriever(list(QUERIES.values()))
    model.eval()
    monkeypatch.setattr(ev, "load_retriever", lambda directory: (model, processor))
    result = ev.evaluate("model", store, queries, qrels, output=tmp_path / "score.json", mode="hybrid",
                         weights=(1.0, 3.0), fusion="score")
    assert (result["fusion"], result["weights"]) == ("score", [1.0, 3.0])
    fused = {}
    for line in (tmp_path / "score.trec").read_text().splitlines():
        qid, _, doc_id, _, _, _ = line.split()
        fused.setdefault(qid, []).append(doc_id)
    dense = PageSearch(model, processor, store, mode="dense")
    lexical = PageSearch(None, None, store, mode="lexical")
    hybrid = PageSearch(model, processor, store, mode="hybrid", weights=(1.0, 3.0), fusion="score")
    for qid, text in QUERIES.items():
        expected = score_fusion([dense.ranked(text, ev.RUN_DEPTH), lexical.ranked(text, ev.RUN_DEPTH)], [1.0, 3.0])
        assert fused[qid] == [doc_id for doc_id, _ in expected]
        assert hybrid.ranked(text, 3) == [(doc, pytest.approx(score)) for doc, score in expected[:3]]
    with pytest.raises(ConfigError, match="fusion 'mean' is not one of"):
        ev.evaluate("model", store, queries, qrels, mode="hybrid", fusion="mean")
    with pytest.raises(ConfigError, match="fusion 'mean' is not one of"):
        PageSearch(model, processor, store, mode="hybrid", fusion="mean")


def test_the_cli_passes_the_fusion_and_weights_through(corpus, tmp_path, monkeypatch):
    from vlmkit.cli import build_parser, main

    store, queries, qrels = corpus
    model, processor = make_retriever(list(QUERIES.values()))
    model.eval()
    monkeypatch.setattr(ev, "load_retriever", lambda directory: (model, processor))
    out = tmp_path / "cli.json"
    assert main(["retriever", "eval", "--model", "model", "--docs", str(store), "--queries", str(queries),
                 "--qrels", str(qrels), "--mode", "hybrid", "--fusion", "score", "--weights", "1", "3",
                 "--output", str(out)]) == 0
    direct = ev.evaluate("model", store, queries, qrels, mode="hybrid", weights=(1.0, 3.0), fusion="score")
    assert json.loads(out.read_text()) == direct
    # The flag's choices are written out in the CLI (importing bm25s would slow `--help`): every fusion is one.
    for fusion in FUSIONS:
        assert build_parser().parse_args(["retriever", "search", "query", "--fusion", fusion]).fusion == fusion
    with pytest.raises(SystemExit):
        build_parser().parse_args(["retriever", "search", "query", "--fusion", "mean"])


def test_a_fusion_sweep_runs_from_dense_alone_to_bm25_alone_and_names_the_best(corpus, tmp_path, monkeypatch):
    store, queries, qrels = corpus
    model, processor = make_retriever(list(QUERIES.values()))  # random weights: a poor dense ranking
    model.eval()
    monkeypatch.setattr(ev, "load_retriever", lambda directory: (model, processor))
    dense = ev.evaluate("model", store, queries, qrels, mode="dense")
    result = ev.evaluate("model", store, queries, qrels, output=tmp_path / "hybrid.json", mode="hybrid", sweep=True)
    table = result["sweep"]
    shares = [[round(1 - i / 10, 6), i / 10] for i in range(11)]
    assert [(row["fusion"], row["weights"]) for row in table] == [(f, w) for f in ("rrf", "score") for w in shares]
    for fusion in ("rrf", "score"):  # both fusions end in dense alone and BM25 alone
        rows = [row for row in table if row["fusion"] == fusion]
        assert rows[0]["ndcg@10"] == pytest.approx(dense["ndcg@10"]) and dense["ndcg@10"] < 1.0
        assert rows[-1]["ndcg@10"] == 1.0  # BM25 alone finds every page (test_lexical_evaluation_...)
    best = max(row["ndcg@10"] for row in table)
    first_best = next(row for row in table if row["ndcg@10"] == best)
    assert (result["best_fusion"], result["best_weights"]) == (first_best["fusion"], first_best["weights"])
    # The fusion the run itself scores is still the one of `weights`.
    assert result["ndcg@10"] == pytest.approx(
        next(row for row in table if row["weights"] == [0.5, 0.5] and row["fusion"] == "rrf")["ndcg@10"])
    assert json.loads((tmp_path / "hybrid.json").read_text())["best_weights"] == result["best_weights"]
    with pytest.raises(ConfigError, match="needs --mode hybrid"):
        ev.evaluate("model", store, queries, qrels, mode="dense", sweep=True)


def test_a_store_without_text_layers_is_searched_densely(tmp_path):
    store = tmp_path / "images.h5"
    with PageStoreWriter(store) as writer:
        for n, colour in enumerate(["red", "green", "blue"]):
            writer.add(f"img-{n}", png(colour))
    model, processor = make_retriever(["a red page", "a blue page"])
    hybrid = PageSearch(model.eval(), processor, store, mode="hybrid")
    dense = PageSearch(model, processor, store, mode="dense")
    assert hybrid.mode == "dense" and hybrid.ranked("a red page", 3) == dense.ranked("a red page", 3)
    with pytest.raises(ConfigError, match="dense search needs a retriever"):
        PageSearch(None, None, store, mode="dense")


def test_mined_negatives_come_from_bm25_and_skip_the_positives_documents(corpus, tmp_path):
    from vlmkit.cli import main
    from vlmkit.data.page_store import PageStore
    from vlmkit.data.pairs import Pair, build_batches, mine_negatives, read_pairs, write_pairs

    store, _, _ = corpus
    pairs = [Pair("printer network plans for the region", ["manual.pdf#1"]),
             Pair("revenue and hiring", ["report.pdf#1"]),
             Pair("printer driver and paper tray", ["manual.pdf#1"], ["scan.png"])]
    write_pairs(pairs, tmp_path / "pairs.jsonl")
    assert main(["docs", "mine-negatives", "--pairs", str(tmp_path / "pairs.jsonl"), "--docs", str(store),
                 "--out", str(tmp_path / "mined.jsonl"), "--per-query", "2"]) == 0
    # BM25's best pages, without the positive's document (the default rule), existing negatives first.
    assert [p.neg for p in read_pairs(tmp_path / "mined.jsonl")] == [["report.pdf#2", "report.pdf#1"], [],
                                                                     ["scan.png"]]
    # With only the positive page barred, the page beside it is the hardest negative.
    index = LexicalIndex.of_store(PageStore(store))
    by_bm25 = lambda query: [d for d, _ in index.search([query], 10)[0]]  # noqa: E731
    same_page = mine_negatives(pairs, by_bm25, 2, skip="same-page")
    assert [p.neg for p in same_page] == [["report.pdf#2", "report.pdf#1"], ["report.pdf#2"],
                                          ["scan.png", "manual.pdf#2"]]
    batches = build_batches(same_page, 1, hard_negatives=1)  # every pair now has a negative to draw
    assert len(batches) == 3 and all(len(item.neg) == 1 for (item,) in batches)
    with pytest.raises(ConfigError, match="skip rule 'nearby'"):
        mine_negatives(pairs, by_bm25, 1, skip="nearby")


def test_a_beir_style_folder_evaluates_as_pytrec_eval_scores_its_run(tmp_path):
    from vlmkit.cli import main

    folder = tmp_path / "beir"
    (folder / "images").mkdir(parents=True)
    (folder / "qrels").mkdir()
    rows = []
    for n, (doc_id, text) in enumerate(TEXTS.items()):
        name = f"images/{n}.png"
        (folder / name).write_bytes(png(("red", "green", "blue", "white", "black")[n]))
        rows.append({"_id": doc_id, "image": name} | ({"text": text} if text else {}))
    (folder / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "queries.jsonl").write_text("".join(f'{{"_id": "{q}", "text": "{t}"}}\n' for q, t in QUERIES.items()))
    (folder / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t1\n" for q, j in QRELS.items() for d in j))
    out = tmp_path / "metrics.json"
    assert main(["retriever", "eval", "--beir", str(folder), "--mode", "lexical", "--output", str(out)]) == 0
    assert (folder / "corpus.h5").is_file()  # the corpus as a page store, reused next time
    result = json.loads(out.read_text())
    run = {}
    for line in out.with_suffix(".trec").read_text().splitlines():
        qid, _, doc_id, _, score, _ = line.split()
        run.setdefault(qid, {})[doc_id] = float(score)
    trec = pytrec_eval.RelevanceEvaluator(QRELS, {"ndcg_cut.10"}).evaluate(run)
    assert result["ndcg@10"] == pytest.approx(sum(m["ndcg_cut_10"] for m in trec.values()) / len(trec))
    assert result["n_docs"] == len(TEXTS) and result["n_queries"] == len(QUERIES)
    # A row naming a missing image is an error naming the corpus file, line and id.
    from vlmkit.data.beir import beir_paths
    from vlmkit.errors import DataError

    (folder / "corpus.jsonl").write_text('{"_id": "ok", "image": "images/0.png"}\n{"_id": "lost", "image": "x.png"}\n')
    with pytest.raises(DataError, match=r"corpus\.jsonl:2 \(id 'lost'\): image .*x\.png: image file not found"):
        beir_paths(folder)
    assert main(["retriever", "eval", "--beir", str(folder), "--mode", "lexical", "--output", str(out)]) == 2


def test_same_page_bars_only_the_positive_even_for_ids_without_a_page_number():
    from vlmkit.data.pairs import Pair, mine_negatives

    ranked = lambda query: ["report", "report#2", "report#3"]  # noqa: E731 -- a positive named without "#"
    assert mine_negatives([Pair("q", ["report"])], ranked, 2, skip="same-page")[0].neg == ["report#2", "report#3"]
    assert mine_negatives([Pair("q", ["report"])], ranked, 2, skip="same-document")[0].neg == []
