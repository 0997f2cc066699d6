"""Fixtures for the retrieval tests: a small built-in document set and tiny retrievers (no downloads)."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import TEST_TEXT, TEST_VISION, tiny_model_config


@pytest.fixture(scope="session")
def docs_dir(tmp_path_factory):
    from vlmkit.data.synth_docs import synth_docs

    out = tmp_path_factory.mktemp("docs")
    synth_docs(out, n_train=40, n_test=24, queries_per_page=2, size=32)
    return out


@pytest.fixture(scope="session")
def pairs(docs_dir):
    from vlmkit.data.pairs import read_pairs

    return read_pairs(docs_dir / "train_pairs.jsonl")


def make_retriever(texts: list[str], dropout: float = 0.0, seed: int = 0, **options):
    """A tiny retriever with random weights and a BPE tokenizer trained on `texts`; returns (model, processor)."""
    from vlmkit.model.build import build
    from vlmkit.model.retriever import VLMRetriever

    torch.manual_seed(seed)
    cfg = tiny_model_config(text_config={**TEST_TEXT, "attention_dropout": dropout},
                            vision_config={**TEST_VISION, "attention_dropout": dropout})
    built = build(cfg, training_texts=lambda: texts)
    return VLMRetriever.from_vlm(built.model, **options), built.processor
