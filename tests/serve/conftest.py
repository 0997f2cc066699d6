"""Fixtures for the serving tests: the tiny test model, saved once and loaded once."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Run the serving tests on one intra-op thread: a tiny model decodes faster that way (measured
    about 10x while another process kept the second core busy), and the server's worker, the
    test's client threads and a browser share two cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, train_records):
    """The `tiny` model of tests/conftest.py, saved as a model directory, with its weights redrawn
    from N(0, 0.5): the default initialisation answers every prompt with the same newlines, and
    these tests need greedy answers that differ from one prompt or image to the next."""
    from tests.conftest import tiny_model_config  # noqa: I001 -- pytest has imported it under this name

    from vlmkit.model.build import build
    from vlmkit.train.run import _texts

    torch.manual_seed(0)
    built = build(tiny_model_config(), training_texts=lambda: _texts(train_records))
    with torch.no_grad():
        for name, parameter in built.model.named_parameters():
            if "norm" not in name:
                parameter.normal_(0, 0.5)
    out = tmp_path_factory.mktemp("tiny-model")
    built.model.save_pretrained(out)
    built.processor.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def loaded(model_dir):
    """(model, processor) loaded from `model_dir` for inference, shared by the serving tests."""
    from vlmkit.serve.generation import load_for_inference

    return load_for_inference(model_dir, device="cpu")
