"""`recorder`: `run(cfg)` builds its VLMTrainer internally, so the tests swap in a subclass (same
behaviour) that remembers each trainer, its initial weights, the loss and inputs of every
micro-batch, and can carry extra callbacks."""

from types import SimpleNamespace

import pytest

from tests.train.helpers import run_module
from vlmkit.processing.processor import IGNORE_INDEX
from vlmkit.train.trainer import VLMTrainer


def _clone(state: dict) -> dict:
    return {k: v.detach().clone() for k, v in state.items()}


@pytest.fixture
def recorder(monkeypatch):
    rec = SimpleNamespace(trainers=[], callbacks=[])

    class RecordingTrainer(VLMTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.initial_state = _clone(self.model.state_dict())
            self.losses, self.num_items, self.samples, self.supervised = [], [], [], []
            for callback in rec.callbacks:
                self.add_callback(callback)
            rec.trainers.append(self)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            self.losses.append((out[0] if return_outputs else out).item())
            self.num_items.append(None if num_items_in_batch is None else int(num_items_in_batch))
            mask = inputs["attention_mask"].bool()
            self.samples.append([tuple(row[m].tolist()) for row, m in zip(inputs["input_ids"], mask)])
            self.supervised.append(int((inputs["labels"][:, 1:] != IGNORE_INDEX).sum()))
            return out

    monkeypatch.setattr(run_module, "VLMTrainer", RecordingTrainer)
    return rec
