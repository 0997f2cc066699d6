"""Fixtures of the data tests: a tiny model's processor and good records to mix bad ones into."""

import pytest
import torch

from tests.conftest import tiny_model_config


@pytest.fixture(scope="module")
def processor(train_records):
    from vlmkit.model.build import build
    from vlmkit.train.run import _texts

    torch.manual_seed(0)
    return build(tiny_model_config(), training_texts=lambda: _texts(train_records)).processor


@pytest.fixture
def good(train_records):
    """Three single-image synth records as JSON objects, image paths absolute, all under 200 tokens."""
    return [r.to_json() for r in train_records if len(r.images) == 1][:3]
