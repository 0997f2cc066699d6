"""GradCache is exact: its gradients equal those of the batch back-propagated at once (float64).

With dropout active, a forward over the whole batch draws different masks than forwards over
micro-batches, so there the reference is the same micro-batch forwards kept in one graph
(what GradCache must reproduce by replaying the random state); without dropout the
reference is one forward over the whole batch.
"""

import contextlib
import random

import pytest
import torch

from tests.retrieval.conftest import make_retriever
from vlmkit.data.page_store import PageStore
from vlmkit.data.pairs import Pair, PairBatches
from vlmkit.model.retriever import concat
from vlmkit.train import gradcache
from vlmkit.train.contrastive import info_nce, model_inputs
from vlmkit.train.gradcache import grad_cache_step, split_batch
from vlmkit.train.retrieval import PageBatchCollator
from vlmkit.config import TrainConfig
from vlmkit.train.trainer import cache_frozen_vision

TEMPERATURE = 0.05


def _batch(model, processor, docs_dir, pairs, batch_size=6, hard_negatives=1):
    store = PageStore(docs_dir / "train_docs.h5")
    rng = random.Random(0)
    with_negs = [Pair(p.query, p.pos, rng.sample([d for d in store.ids if d not in p.pos], 3), p.line) for p in pairs]
    item = PairBatches(with_negs, batch_size, hard_negatives=hard_negatives, seed=1)[0]
    batch = PageBatchCollator(processor, model.config, store)([item])
    batch["doc"]["pixel_values"] = batch["doc"]["pixel_values"].double()
    return batch


def _loss(reps, n_queries, n_docs):
    return info_nce(reps[0], reps[1], TEMPERATURE, n_queries, n_docs)


def _grads(model) -> dict:
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _grad_cache(model, batch, micro):
    n_q, n_d = batch["query"]["input_ids"].shape[0], batch["doc"]["input_ids"].shape[0]
    loss = grad_cache_step(lambda b: model(**b), [batch["query"], batch["doc"]],
                           lambda reps: _loss(reps, n_q, n_d), micro)
    return loss, _grads(model)


def _chunked_reference(model, batch, micro):
    reps = [concat([model(**m) for m in split_batch(batch[t], micro)]) for t in ("query", "doc")]
    loss = _loss(reps, reps[0].shape[0], reps[1].shape[0])
    loss.backward()
    return loss.detach(), _grads(model)


def _full_reference(model, batch):
    reps = [model(**model_inputs(batch[t])) for t in ("query", "doc")]
    loss = _loss(reps, reps[0].shape[0], reps[1].shape[0])
    loss.backward()
    return loss.detach(), _grads(model)


@pytest.fixture(scope="module")
def dropout_setup(docs_dir, pairs):
    model, processor = make_retriever([p.query for p in pairs], dropout=0.3)
    model = model.double().train()
    return model, _batch(model, processor, docs_dir, pairs)


@pytest.mark.parametrize("micro", [1, 4, 6])  # 4 divides neither the 6 queries nor the 12 pages
def test_grad_cache_replays_dropout_exactly(dropout_setup, micro):
    model, batch = dropout_setup
    state = torch.get_rng_state()
    ref_loss, ref = _chunked_reference(model, batch, micro)
    torch.set_rng_state(state)
    loss, got = _grad_cache(model, batch, micro)
    assert abs(float(loss - ref_loss)) < 1e-12
    assert _max_diff(got, ref) < 1e-10
    # The random generator ends where the reference left it, so later steps stay in step too.
    after_gc = torch.rand(1)
    torch.set_rng_state(state)
    _chunked_reference(model, batch, micro)
    assert torch.equal(after_gc, torch.rand(1))


def test_without_replay_dropout_breaks_exactness(dropout_setup, monkeypatch):
    """The check above can fail: skip the replay and the gradients are visibly wrong."""
    model, batch = dropout_setup
    state = torch.get_rng_state()
    _, ref = _chunked_reference(model, batch, 4)
    torch.set_rng_state(state)
    monkeypatch.setattr(gradcache.RandomState, "replay", lambda self: contextlib.nullcontext())
    _, got = _grad_cache(model, batch, 4)
    assert _max_diff(got, ref) > 1e-6


def test_a_frozen_encoder_runs_once_per_page_and_gradcache_stays_exact(docs_dir, pairs, monkeypatch):
    """With the encoder frozen, training caches its features: GradCache's replay takes the pages'
    features from the cache instead of running the encoder a second time, and the gradients do not change."""
    model, processor = make_retriever([p.query for p in pairs], dropout=0.3)
    model = model.double()
    model.vlm.vision_tower.requires_grad_(False)
    model.train()  # the frozen tower stays in eval mode: it draws no dropout masks
    batch = _batch(model, processor, docs_dir, pairs)
    pages = batch["doc"]["pixel_values"].shape[0]
    state = torch.get_rng_state()
    ref_loss, ref = _chunked_reference(model, batch, 4)
    torch.set_rng_state(state)
    cache_frozen_vision(model.vlm, {"vision": 0}, TrainConfig(vision_feature_cache_gb=1.0), log=lambda _: None)
    encoded = []
    forward = model.vlm.vision_tower.forward
    monkeypatch.setattr(model.vlm.vision_tower, "forward",
                        lambda pixel_values, **k: encoded.append(len(pixel_values)) or forward(pixel_values, **k))
    loss, got = _grad_cache(model, batch, 4)
    assert sum(encoded) == pages  # without the cache: twice as many
    assert abs(float(loss - ref_loss)) < 1e-12
    assert _max_diff(got, ref) < 1e-10


@pytest.mark.parametrize(("options", "micros"), [({}, (1, 4, 12)), ({"pooling": "mean", "bidirectional": True}, (5,)),
                                                 ({"multi_vector_dim": 8}, (5,))],
                         ids=["last", "mean-bidirectional", "multi-vector"])
def test_grad_cache_equals_one_full_batch_forward(docs_dir, pairs, options, micros):
    model, processor = make_retriever([p.query for p in pairs], **options)
    model = model.double().train()
    batch = _batch(model, processor, docs_dir, pairs)
    ref_loss, ref = _full_reference(model, batch)
    for micro in micros:
        loss, got = _grad_cache(model, batch, micro)
        assert abs(float(loss - ref_loss)) < 1e-12, micro
        assert _max_diff(got, ref) < 1e-10, micro


def test_split_batch_keeps_crops_with_their_rows():
    batch = {"input_ids": torch.arange(12).reshape(4, 3), "attention_mask": torch.tensor([[1, 1, 0]] * 3 + [[1, 1, 1]]),
             "pixel_values": torch.arange(6.0).reshape(6, 1), "crops_per_row": torch.tensor([1, 2, 1, 2])}
    parts = split_batch(batch, 3)
    assert [p["pixel_values"].flatten().tolist() for p in parts] == [[0, 1, 2, 3], [4, 5]]
    assert parts[0]["input_ids"].shape == (3, 2)  # trimmed to its own longest row
    assert parts[1]["input_ids"].shape == (1, 3)
