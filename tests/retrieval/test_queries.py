"""Query generation and filtering run batched, append as they go and resume, with a VLM (page images)
or a plain causal LM (text layers, SmolLM2 here); pairs split by page."""

import json

import pytest
import torch

from tests.conftest import tiny_model_config
from vlmkit.data.page_store import PageStore
from vlmkit.data.pairs import read_pairs
from vlmkit.data.queries import filter_queries, generate_queries, make_pairs
from vlmkit.errors import DataError
from vlmkit.eval.retrieval import read_qrels, read_queries
from vlmkit.model.generation import ChatModel


@pytest.fixture(scope="module")
def vlm(pairs):
    from vlmkit.model.build import build

    torch.manual_seed(0)
    built = build(tiny_model_config(), training_texts=lambda: [p.query for p in pairs])
    return ChatModel(built.model.eval(), built.processor.tokenizer, built.processor)


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_generate_resumes_and_filter_decides_once(vlm, docs_dir, tmp_path):
    store = PageStore(docs_dir / "test_docs.h5")
    out = tmp_path / "queries.jsonl"
    first = store.ids[:5]
    out.write_text("".join(json.dumps({"id": f"{d}::q", "doc_id": d, "text": f"old {d}"}) + "\n" for d in first))
    written, empty, no_text = generate_queries(vlm, store, out, batch_size=4, max_new_tokens=6, progress=False)
    assert written + empty == len(store) - 5 and no_text == 0  # the 5 pages already done were skipped
    lines = _lines(out)
    assert [r["text"] for r in lines[:5]] == [f"old {d}" for d in first]
    assert len({r["doc_id"] for r in lines}) == len(lines) and all(r["text"] for r in lines)

    decided = tmp_path / "decided.jsonl"
    kept, dropped = filter_queries(vlm, out, decided, batch_size=5, progress=False)
    assert kept + dropped == len(lines)
    assert all(0 <= r["p_keep"] <= 1 and r["keep"] == (r["p_keep"] >= 0.5) for r in _lines(decided))
    assert filter_queries(vlm, out, decided, progress=False) == (0, 0)  # nothing left to decide


def test_filter_probability_does_not_depend_on_the_batch(vlm, tmp_path):
    queries = tmp_path / "q.jsonl"
    texts = ["red header", "a much longer query about a purple bar chart at the bottom right", "blue"]
    lines = [json.dumps({"id": str(i), "doc_id": "d", "text": t}) + "\n" for i, t in enumerate(texts)]
    queries.write_text("".join(lines))
    filter_queries(vlm, queries, tmp_path / "a.jsonl", batch_size=3, progress=False)
    filter_queries(vlm, queries, tmp_path / "b.jsonl", batch_size=1, progress=False)
    together, alone = _lines(tmp_path / "a.jsonl"), _lines(tmp_path / "b.jsonl")
    assert [r["p_keep"] for r in together] == pytest.approx([r["p_keep"] for r in alone], abs=1e-4)


def test_make_pairs_splits_by_page(tmp_path):
    records = [{"id": f"q{i}", "doc_id": f"d{i % 10}", "text": f"query {i}", "keep": i % 7 != 0} for i in range(40)]
    (tmp_path / "decided.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    paths = make_pairs(tmp_path / "decided.jsonl", tmp_path / "out", test_fraction=0.3)
    train_pages = {d for p in read_pairs(paths["train_pairs.jsonl"]) for d in p.pos}
    qrels = read_qrels(paths["test_qrels.tsv"])
    test_pages = {d for judged in qrels.values() for d in judged}
    assert train_pages and test_pages and not train_pages & test_pages
    assert set(read_queries(paths["test_queries.jsonl"])) == set(qrels)
    n_kept = sum(r["keep"] for r in records)
    assert len(read_pairs(paths["train_pairs.jsonl"])) + len(qrels) == n_kept
    two_documents = [{**r, "doc_id": f"doc{i % 2}.pdf#{i}"} for i, r in enumerate(records)]
    (tmp_path / "two.jsonl").write_text("".join(json.dumps(r) + "\n" for r in two_documents))
    with pytest.raises(DataError, match=r"the test split is empty: a fraction of 0.2 of 2 document\(s\)"):
        make_pairs(tmp_path / "two.jsonl", tmp_path / "out3", test_fraction=0.2, split_by="document")
    (tmp_path / "none.jsonl").write_text(json.dumps({**records[0], "keep": False}) + "\n")
    with pytest.raises(DataError, match="no kept queries"):
        make_pairs(tmp_path / "none.jsonl", tmp_path / "out2")


def test_text_layer_queries_are_unique_spans_of_each_page_and_resume(tmp_path):
    import io

    from PIL import Image

    from vlmkit.data.page_store import PageStoreWriter
    from vlmkit.data.queries import text_layer_queries

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    layers = {"a#1": "Installing the library\nRun make install to copy the shared library into place.",
              "a#2": "Installing the library\nThe parser reads abstract syntax notation from a file.",
              "b#1": "", "b#2": "short line"}
    with PageStoreWriter(tmp_path / "pages.h5") as writer:
        for doc_id, text in layers.items():
            writer.add(doc_id, buffer.getvalue(), {"text": text})
    store, out = PageStore(tmp_path / "pages.h5"), tmp_path / "queries.jsonl"
    written, bare = text_layer_queries(store, out, per_page=2, words=(3, 5))
    queries = _lines(out)
    assert bare == 2 and written == len(queries) and {q["doc_id"] for q in queries} == {"a#1", "a#2"}
    for q in queries:
        own = " ".join(layers[q["doc_id"]].split())
        assert q["text"] in own.replace(".", "")  # words of the page's own text, in order
        assert "Installing the library" not in q["text"]  # shared by both pages: names neither
    assert text_layer_queries(store, out, per_page=2, words=(3, 5)) == (0, 2)  # pages done are skipped
    assert _lines(out) == queries


def test_a_plain_language_model_writes_queries_from_text_layers_and_filters_them(pretrained_checkpoints, tmp_path):
    import io

    from PIL import Image

    from vlmkit.data.page_store import PageStoreWriter
    from vlmkit.model.generation import load_chat_model

    pages = {"guide.pdf#1": "Replacing the toner cartridge. Open the front cover, pull the old cartridge out and "
                            "slide the new one in until it clicks.",
             "guide.pdf#2": "Connecting to Wi-Fi. Press the wireless button for three seconds, then choose your "
                            "network on the touch screen and enter its password.",
             "scan.png": ""}
    store = tmp_path / "pages.h5"
    buffer = io.BytesIO()
    Image.new("RGB", (40, 50), "white").save(buffer, "PNG")
    with PageStoreWriter(store) as writer:
        for doc_id, text in pages.items():
            writer.add(doc_id, buffer.getvalue(), {"text": text} if text else {})
    chat = load_chat_model("HuggingFaceTB/SmolLM2-135M-Instruct")  # fetched by `vlmkit models fetch`
    assert not chat.sees_images
    out = tmp_path / "queries.jsonl"
    written, empty, no_text = generate_queries(chat, PageStore(store), out, batch_size=2, max_new_tokens=24,
                                               progress=False)
    assert (written + empty, no_text) == (2, 1)  # the page without a text layer is skipped, and counted
    lines = _lines(out)
    assert {r["doc_id"] for r in lines} <= {"guide.pdf#1", "guide.pdf#2"} and all(r["text"] for r in lines)
    decided = tmp_path / "decided.jsonl"
    kept, dropped = filter_queries(chat, out, decided, batch_size=2, progress=False)
    assert kept + dropped == written
    assert all(0 <= r["p_keep"] <= 1 for r in _lines(decided))
    with pytest.raises(DataError, match=r"must contain \{text\}"):
        prompt = tmp_path / "prompt.txt"
        prompt.write_text("Write a query.")
        generate_queries(chat, PageStore(store), tmp_path / "other.jsonl", prompt, progress=False)
