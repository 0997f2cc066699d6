"""Shared fixtures: a small built-in data set and tiny models, made on the spot (no downloads)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)

TEST_VISION = {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
               "num_attention_heads": 2, "image_size": 32, "patch_size": 8}
TEST_TEXT = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 512,
             "tie_word_embeddings": True}


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    from vlmkit.data.synth import synth

    out = tmp_path_factory.mktemp("synth")
    synth(out, seed=0, sizes={"train": 48, "captions": 16, "val": 8, "test": 24, "compositional": 14}, turns=3,
          image_size=32, workers=1, progress=False)
    return out


def tiny_model_config(**overrides):
    from vlmkit.config import ModelConfig

    return ModelConfig(**{"vision_config": dict(TEST_VISION), "text_config": dict(TEST_TEXT), "vocab_size": 400,
                          **overrides})


@pytest.fixture(scope="session")
def train_records(synth_dir):
    from vlmkit.data.records import read_records

    return read_records(synth_dir / "train.jsonl")[0]


@pytest.fixture
def tiny(train_records):
    """A freshly built tiny model + processor (random weights, BPE trained on the train split)."""
    from vlmkit.model.build import build
    from vlmkit.train.run import _texts

    torch.manual_seed(0)
    return build(tiny_model_config(), training_texts=lambda: _texts(train_records))


@pytest.fixture(scope="session")
def pretrained_checkpoints():
    """The real checkpoints `vlmkit models fetch` provides, by id (fetched and converted on the first run only)."""
    from vlmkit.model.pretrained import fetch

    return fetch(log=lambda line: None)
