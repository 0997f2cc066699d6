"""The retrieval commands end to end on the built-in documents: synth -> train -> index -> search -> eval."""

import json

import yaml

from tests.conftest import TEST_TEXT, TEST_VISION
from vlmkit.cli import main


def test_docs_synth_train_index_search_eval(tmp_path, capsys):
    data, model = tmp_path / "docs", tmp_path / "model"
    assert main(["docs", "synth", "--out", str(data), "--train", "40", "--test", "12", "--size", "32"]) == 0
    config = tmp_path / "retriever.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"vision_config": TEST_VISION, "text_config": TEST_TEXT, "vocab_size": 400},
        "train": {"batch_size": 8, "report_to": [], "logging_steps": 1, "save_steps": 1000},
    }))
    assert main(["retriever", "train", str(config), "--train-data", str(data / "train_pairs.jsonl"), "--docs",
                 str(data / "train_docs.h5"), "--output-dir", str(model), "--max-steps", "2", "--grad-cache",
                 "--grad-cache-micro-batch-size", "3", "--set", "retrieval.pooling=mean"]) == 0
    saved = json.loads((model / "config.json").read_text())
    assert saved["model_type"] == "vlmkit_retriever" and saved["pooling"] == "mean"
    assert json.loads((model / "train_summary.json").read_text())["steps"] == 2

    index = tmp_path / "index.safetensors"
    assert main(["retriever", "index", "--model", str(model), "--docs", str(data / "test_docs.h5"),
                 "--out", str(index)]) == 0
    capsys.readouterr()
    assert main(["retriever", "search", "a red header", "--model", str(model), "--index", str(index), "--k", "3"]) == 0
    hits = capsys.readouterr().out.splitlines()
    assert len(hits) == 3 and all(line.split()[-1].startswith("test-") for line in hits)

    metrics_path = tmp_path / "metrics.json"
    assert main(["retriever", "eval", "--model", str(model), "--docs", str(data / "test_docs.h5"), "--queries",
                 str(data / "test_queries.jsonl"), "--qrels", str(data / "test_qrels.tsv"), "--output",
                 str(metrics_path)]) == 0
    metrics = json.loads(metrics_path.read_text())
    assert metrics["n_queries"] == metrics["n_docs"] == 12 and 0 <= metrics["ndcg@10"] <= 1
    assert main(["retriever", "search", " ", "--model", str(model), "--index", str(index)]) == 2  # empty query


def test_data_synth_docs_is_the_same_command_as_docs_synth(tmp_path):
    for command, out in ((["data", "synth-docs"], tmp_path / "a"), (["docs", "synth"], tmp_path / "b")):
        assert main([*command, "--out", str(out), "--train", "6", "--test", "3", "--size", "32"]) == 0
    for name in ("train_pairs.jsonl", "test_queries.jsonl", "test_qrels.tsv"):
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text()
