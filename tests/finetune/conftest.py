"""Fixtures for the fine-tuning tests: training runs whose trainers stay reachable afterwards."""

from __future__ import annotations

import pytest

from tests.finetune.helpers import run_module
from vlmkit.train.trainer import VLMTrainer


@pytest.fixture
def trainers(monkeypatch):
    """Every VLMTrainer that `run()` builds during the test, with the weights it started from."""
    seen = []

    class Remembering(VLMTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.initial_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            seen.append(self)

    monkeypatch.setattr(run_module, "VLMTrainer", Remembering)
    return seen
