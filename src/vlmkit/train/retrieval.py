"""`vlmkit retriever train`: contrastive training of a page retriever, read top to bottom.

Set up (config, pairs, page store), build (a VLM from scratch or a trained one, wrapped as
a `VLMRetriever`), train (`RetrieverTrainer`: InfoNCE, optional GradCache), save (weights,
config and processor, loadable with `VLMRetriever.from_pretrained`).

The config (`RetrieverRunConfig` in vlmkit/config.py) has the sections of `vlmkit train` plus `retrieval`; the
`model` section says what VLM to start from (`model.init_from` for a trained one).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoTokenizer

from vlmkit.config import LearningRates, RetrievalConfig, RetrieverRunConfig, load_retriever_config
from vlmkit.data.page_store import PageStore
from vlmkit.data.pairs import PairBatches, check_ids, read_pairs
from vlmkit.errors import ConfigError
from vlmkit.files import write_text_atomic
from vlmkit.model.build import build
from vlmkit.model.retriever import (
    RETRIEVAL_FIELDS,
    RetrieverConfig,
    VLMRetriever,
    check_page_text_tokens,
    encode_inputs,
)
from vlmkit.processing.processor import VLMProcessor
from vlmkit.train import stage
from vlmkit.train.contrastive import RetrieverTrainer
from vlmkit.train.trainer import SUMMARY_FILE, freeze_and_cache, training_arguments

CONFIG_FILE = "vlmkit_retriever.yaml"


class PageBatchCollator:
    """A `PairBatches` item (query texts, page ids) -> model inputs; pages are read from the store here,
    in the DataLoader worker, which opens its own handle on the store."""

    def __init__(self, processor: VLMProcessor, config: RetrieverConfig, store: PageStore):
        self.processor, self.config, self.store = processor, config, store

    def __call__(self, items: list[dict]) -> dict:
        (item,) = items  # the DataLoader's batch size is 1: each item is a whole batch already
        images = [self.store.image(doc_id) for doc_id in item["doc_ids"]]
        texts = [self.store.text(doc_id) for doc_id in item["doc_ids"]] if self.config.page_text_tokens else None
        return {"query": encode_inputs(self.processor, self.config, queries=item["queries"]),
                "doc": encode_inputs(self.processor, self.config, images=images, page_texts=texts)}


def build_retriever(cfg: RetrieverRunConfig, training_texts,
                    tokenizer=None) -> tuple[VLMRetriever, VLMProcessor, frozenset[str]]:
    """The retriever to train, its processor, and which modules start from random weights."""
    r = cfg.retrieval
    if r.init_from:
        model = VLMRetriever.from_pretrained(r.init_from, attn_implementation=cfg.model.attn_implementation)
        # The saved retriever's settings hold; one set here to something else would be ignored without a word.
        default = RetrievalConfig()
        for name in RETRIEVAL_FIELDS:
            asked, saved = getattr(r, name), getattr(model.config, name)
            if asked != getattr(default, name) and asked != saved:
                raise ConfigError(f"retrieval.{name} is {asked!r}, but the retriever in {r.init_from} (retrieval.init_from)"
                                  f" was trained with {saved!r}; its settings hold: leave retrieval.{name} unset")
        return model, VLMProcessor.from_pretrained(r.init_from), frozenset()
    built = build(cfg.model, training_texts=training_texts, tokenizer=tokenizer)
    options = {name: getattr(r, name) for name in RETRIEVAL_FIELDS}
    return VLMRetriever.from_vlm(built.model, **options), built.processor, built.random_modules


def check_text_layers(cfg: RetrieverRunConfig, pairs, store: PageStore) -> None:
    """A retriever that reads text layers (`page_text_tokens`) trained on pages that have none would
    learn from the images alone while its config says otherwise."""
    if cfg.retrieval.page_text_tokens and not any(store.text(doc_id) for p in pairs for doc_id in p.pos + p.neg):
        raise ConfigError(f"retrieval.page_text_tokens is {cfg.retrieval.page_text_tokens}, but no page of the pairs"
                          f" in {cfg.data.docs} has a text layer (`vlmkit docs render` stores a PDF's); set it to 0")


def make_trainer(cfg: RetrieverRunConfig, model: VLMRetriever, processor: VLMProcessor, pairs, store: PageStore,
                 rates, trainer_class=RetrieverTrainer) -> RetrieverTrainer:
    """The Trainer for a built model; `trainer_class` lets tests record what it does."""
    args = training_arguments(cfg, rates, has_eval=False)
    args.per_device_train_batch_size = 1  # one dataset item is one whole (per-process) batch
    args.include_num_input_tokens_seen = "no"
    train_set = PairBatches(pairs, cfg.train.batch_size, world_size=args.world_size,
                            hard_negatives=cfg.retrieval.hard_negatives, seed=cfg.train.seed)
    r = cfg.retrieval
    return trainer_class(
        model=model,
        args=args,
        train_dataset=train_set,
        data_collator=PageBatchCollator(processor, model.config, store),
        processing_class=processor,
        learning_rates=rates,
        time_budget=cfg.train.time_budget,
        temperature=r.temperature,
        grad_cache_micro_batch_size=r.grad_cache_micro_batch_size if r.grad_cache else 0,
    )


def freeze_by_learning_rate(cfg: RetrieverRunConfig, model: VLMRetriever, random_modules: frozenset[str],
                            log=print) -> LearningRates:
    """Freeze the modules whose learning rate is 0 and cache a frozen encoder's features; returns the rates."""
    rates = cfg.train.learning_rates(random_modules)
    freeze_and_cache(model, model.vlm, rates, cfg.train, log)
    return rates


def run(cfg: RetrieverRunConfig, log=print) -> Path:
    """Train a retriever as configured; returns the directory of the saved model."""
    if not cfg.data.train or not cfg.data.docs:
        raise ConfigError("retriever training needs --train-data PAIRS.jsonl and --docs STORE.h5")
    if cfg.retrieval.grad_cache and cfg.retrieval.grad_cache_micro_batch_size < 1:
        raise ConfigError("retrieval.grad_cache_micro_batch_size must be at least 1")
    check_page_text_tokens(cfg.retrieval.page_text_tokens)  # before any weights are loaded
    out, checkpoint = stage.begin(cfg, "vlmkit retriever train", log)
    pairs = read_pairs(cfg.data.train)
    store = PageStore(cfg.data.docs)
    check_ids(pairs, store.index.keys(), cfg.data.train, cfg.data.docs)
    check_text_layers(cfg, pairs, store)
    # Resuming reuses the checkpoint's tokenizer, so the vocabulary cannot change under the weights.
    tokenizer = AutoTokenizer.from_pretrained(checkpoint) if checkpoint and not cfg.model.lm else None
    model, processor, random_modules = build_retriever(cfg, lambda: [p.query for p in pairs], tokenizer)
    rates = freeze_by_learning_rate(cfg, model, random_modules, log)
    trainer = make_trainer(cfg, model, processor, pairs, store, rates)
    result, seconds = stage.fit(trainer, checkpoint, log, cfg.train.peak_flops)
    summary = {"n_params": sum(p.numel() for p in model.parameters()), "n_pairs": len(pairs),
               "batches_per_epoch": len(trainer.train_dataset), "metrics": dict(result.metrics),
               "cuda": torch.cuda.is_available()}
    stage.finish(trainer, cfg, out, seconds, summary, log, what="retriever", config_file=CONFIG_FILE)
    return out


def run_demo(out: str | Path, data: str | Path, quick: bool = False, log=print) -> dict:
    """`make demo-retrieval`: built-in documents, the `retriever-tiny` recipe from scratch, held-out evaluation.

    Writes `out/metrics.json` (the evaluation metrics plus `train_seconds`) and returns it.
    """
    from importlib import resources

    from vlmkit.data.synth_docs import synth_docs
    from vlmkit.eval.retrieval import evaluate

    out, data = Path(out), Path(data)
    if not (data / "test_qrels.tsv").is_file():
        synth_docs(data)
    overrides = [f"data.train={data / 'train_pairs.jsonl'}", f"data.docs={data / 'train_docs.h5'}",
                 f"train.output_dir={out / 'model'}"]
    if quick:
        overrides += ["train.max_steps=20", "train.batch_size=8"]
    recipe = resources.files("vlmkit").joinpath("configs/retriever-tiny.yaml")
    model_dir = run(load_retriever_config(str(recipe), overrides), log=log)
    summary = json.loads((model_dir / SUMMARY_FILE).read_text())
    metrics = evaluate(model_dir, data / "test_docs.h5", data / "test_queries.jsonl", data / "test_qrels.tsv",
                       out / "eval" / "metrics.json")
    metrics["train_seconds"] = round(summary["train_seconds"], 1)
    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2))
    log(json.dumps(metrics, indent=2))
    return metrics
