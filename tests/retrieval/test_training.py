"""Contrastive training through the Trainer: GradCache steps give the same weights as plain steps,
with and without gradient accumulation; resuming is exact; bad inputs fail before training starts."""

import json

import pytest
from safetensors.torch import load_file

from tests.conftest import TEST_TEXT, TEST_VISION
from tests.retrieval.conftest import make_retriever
from vlmkit.data.page_store import PageStore
from vlmkit.errors import ConfigError, DataError
from vlmkit.train import retrieval as retrieval_run
from vlmkit.train.contrastive import RetrieverTrainer
from vlmkit.config import load_retriever_config
from vlmkit.train.retrieval import make_trainer
from vlmkit.train.trainer import apply_learning_rates


def _train(docs_dir, pairs, out, train=(), **retrieval) -> tuple[dict, list[float]]:
    """Three optimizer steps of a float64 tiny retriever (same initial weights every call)."""
    overrides = ["train.report_to=[]", "train.warmup=0", "train.logging_steps=1", "train.batch_size=6",
                 "train.max_steps=3", f"train.output_dir={out}", "train.save_steps=1000"]
    overrides += [f"train.{k}={json.dumps(v)}" for k, v in dict(train).items()]
    cfg = load_retriever_config(None, overrides + [f"retrieval.{k}={json.dumps(v)}" for k, v in retrieval.items()])
    model, processor = make_retriever([p.query for p in pairs])
    model = model.double()
    rates = cfg.train.learning_rates(frozenset({"vision", "projector", "lm"}))
    apply_learning_rates(model, rates)
    trainer = make_trainer(cfg, model, processor, pairs, PageStore(docs_dir / "train_docs.h5"), rates)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, losses


def test_grad_cache_training_matches_plain_training(docs_dir, pairs, tmp_path):
    plain, plain_losses = _train(docs_dir, pairs, tmp_path / "plain")
    cached, cached_losses = _train(docs_dir, pairs, tmp_path / "gc", grad_cache=True, grad_cache_micro_batch_size=4)
    initial = make_retriever([p.query for p in pairs])[0].double().state_dict()
    assert max(float((plain[k] - initial[k]).abs().max()) for k in plain) > 1e-4  # the steps did change weights
    assert max(float((plain[k] - cached[k]).abs().max()) for k in plain) < 1e-10
    assert cached_losses == pytest.approx(plain_losses, abs=1e-12) and len(plain_losses) == 3


def test_grad_cache_with_gradient_accumulation(docs_dir, pairs, tmp_path):
    accumulate = {"grad_accum": 2, "max_steps": 2}
    plain, plain_losses = _train(docs_dir, pairs, tmp_path / "plain", train=accumulate, temperature=0.1)
    cached, cached_losses = _train(docs_dir, pairs, tmp_path / "gc", train=accumulate, temperature=0.1,
                                   grad_cache=True, grad_cache_micro_batch_size=5)
    assert max(float((plain[k] - cached[k]).abs().max()) for k in plain) < 1e-10
    assert cached_losses == pytest.approx(plain_losses, abs=1e-12) and len(plain_losses) == 2


def test_missing_page_in_pairs_stops_before_training(docs_dir, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"query": "a red page", "pos": ["train-00000"]}\n{"query": "b", "pos": ["gone-7"]}\n')
    cfg = load_retriever_config(None, [f"data.train={pairs}", f"data.docs={docs_dir / 'train_docs.h5'}",
                                       f"train.output_dir={tmp_path / 'out'}"])
    with pytest.raises(DataError, match=r"pairs\.jsonl:2 \(id 'gone-7'\): page 'gone-7' is not in the page store"):
        retrieval_run.run(cfg, log=lambda *a: None)
    assert not (tmp_path / "out").exists()


def test_resume_gives_the_weights_of_an_uninterrupted_run(docs_dir, tmp_path, monkeypatch):
    def config(out, *extra):
        small = [f"model.{part}_config={json.dumps(c)}" for part, c in (("vision", TEST_VISION), ("text", TEST_TEXT))]
        return load_retriever_config(None, [
            f"data.train={docs_dir / 'train_pairs.jsonl'}", f"data.docs={docs_dir / 'train_docs.h5'}",
            f"train.output_dir={out}", "train.report_to=[]", "train.batch_size=4", "train.save_steps=2",
            "model.vocab_size=400", "train.warmup=0", "train.scheduler=constant", *small, *extra])

    retrieval_run.run(config(tmp_path / "whole", "train.max_steps=4"), log=lambda *a: None)
    retrieval_run.run(config(tmp_path / "parts", "train.max_steps=2"), log=lambda *a: None)  # "interrupted"
    steps = []
    original = RetrieverTrainer.training_step
    monkeypatch.setattr(RetrieverTrainer, "training_step",
                        lambda self, *a, **k: steps.append(1) or original(self, *a, **k))
    retrieval_run.run(config(tmp_path / "parts", "train.max_steps=4", "train.resume=true"), log=lambda *a: None)
    assert len(steps) == 2  # it went on from step 2 rather than starting again
    assert json.loads((tmp_path / "parts" / "train_summary.json").read_text())["steps"] == 4
    whole = load_file(tmp_path / "whole" / "model.safetensors")
    parts = load_file(tmp_path / "parts" / "model.safetensors")
    assert max(float((whole[k] - parts[k]).abs().max()) for k in whole) < 1e-6


@pytest.mark.parametrize("name", ["retriever-tiny", "retriever-from-vlm", "retriever-pretrained"])
def test_packaged_recipes_load(name):
    from importlib import resources

    cfg = load_retriever_config(str(resources.files("vlmkit").joinpath(f"configs/{name}.yaml")))
    assert cfg.train.batch_size >= 32 and cfg.retrieval.temperature < 0.1
    with pytest.raises(ConfigError, match="unknown key"):
        load_retriever_config(None, ["retrieval.poolin=mean"])


def test_the_pretrained_recipe_trains_a_step_on_the_real_weights(pretrained_checkpoints, docs_dir, pairs, tmp_path):
    # The recipe as shipped (DINOv2-small + SmolLM2, slicing, pixel shuffle, GradCache), one step of
    # 4 pairs in micro-batches of 2: what it builds, that it trains, and that its pages fit 5 x 64 tokens.
    small = tmp_path / "pairs.jsonl"
    distinct = list({p.pos[0]: p for p in pairs}.values())[:4]  # four pages, one query each
    small.write_text("".join(json.dumps({"query": p.query, "pos": p.pos}) + "\n" for p in distinct))
    cfg = load_retriever_config("retriever-pretrained", [
        f"data.train={small}", f"data.docs={docs_dir / 'train_docs.h5'}", f"train.output_dir={tmp_path / 'r'}",
        "train.batch_size=4", "train.max_steps=1", "retrieval.grad_cache_micro_batch_size=2", "train.report_to=[]"])
    logged = []
    out = retrieval_run.run(cfg, log=logged.append)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 1 and summary["metrics"]["train_loss"] > 0
    assert any(line.startswith("vision encoder frozen") for line in logged)  # the recipe's encoder rate is 0
    from vlmkit.eval.retrieval import load_retriever
    from vlmkit.model.tokens import image_token_spec, num_image_tokens

    model, processor = load_retriever(out)
    assert model.config.vision_config.model_type == "dinov2" and processor.image_processor.slicing == "minicpm"
    assert num_image_tokens(image_token_spec(model.config)) == 64  # per view: 16x16 patches folded 2x2


def test_a_text_reading_retriever_needs_text_layers_and_init_from_keeps_the_saved_settings(docs_dir, tmp_path):
    from vlmkit.train.retrieval import build_retriever

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"query": "a red page", "pos": ["train-00000"]}\n')
    base = [f"data.train={pairs}", f"data.docs={docs_dir / 'train_docs.h5'}", f"train.output_dir={tmp_path / 'out'}"]
    # The built-in pages are images without a text layer.
    with pytest.raises(ConfigError, match="page_text_tokens is 64, but no page of the pairs.*has a text layer"):
        retrieval_run.run(load_retriever_config(None, base + ["retrieval.page_text_tokens=64"]), log=lambda *a: None)
    assert not (tmp_path / "out").exists()

    model, processor = make_retriever(["a red page"], page_text_tokens=16)
    model.save_pretrained(tmp_path / "saved")
    processor.save_pretrained(tmp_path / "saved")
    init = [f"retrieval.init_from={tmp_path / 'saved'}"]
    loaded, _, _ = build_retriever(load_retriever_config(None, base + init), lambda: [])
    assert loaded.config.page_text_tokens == 16  # unset here: the saved value holds
    with pytest.raises(ConfigError, match="retrieval.page_text_tokens is 128, but the retriever in .* was trained with 16"):
        build_retriever(load_retriever_config(None, base + init + ["retrieval.page_text_tokens=128"]), lambda: [])
