"""`make demo` / `vlmkit demo`: the default pretrained composition, trained on built-in data on a CPU.

1. fetch the pretrained checkpoints (`vlmkit models fetch`: DINOv2-small, SmolLM2-135M-Instruct)
   and write the built-in data (`vlmkit data synth`), unless they are already there;
2. align: the projector alone learns to map DINOv2's features into SmolLM2 on the captions,
   both pretrained parts frozen (`configs/demo-align.yaml`, LLaVA's first stage);
3. SFT: the projector, then LoRA adapters on the LM with it (`train.lm_start`), learn to answer
   the questions (`configs/demo-sft.yaml`). Both stages run a fixed number of steps in float32,
   so a run gives the same model on a fast host and a slow one;
4. evaluate per category on the test split, the compositional split and, blind, on the test
   split with blank images;
5. check the language: perplexity of the trained model and of the base LM on held-out text,
   and their answers to a few text-only questions;
6. export the model to transformers' LLaVA format (`vlmkit export --format llava`);
7. write `metrics.json` and print a report with sample answers beside their questions.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from vlmkit.config import load_config
from vlmkit.data.records import read_records
from vlmkit.data.synth import DATA_VERSION, DEFAULT_SIZES, synth
from vlmkit.eval import language
from vlmkit.eval.vqa import evaluate, write_results
from vlmkit.export.llava import save_llava
from vlmkit.files import write_text_atomic
from vlmkit.model.build import checkpoint_dir
from vlmkit.model.pretrained import fetch
from vlmkit.serve.generation import load_for_inference
from vlmkit.train.run import run
from vlmkit.train.trainer import SUMMARY_FILE

# Evaluation runs the 135M LM on every question; these sizes keep it to a few minutes on 2 cores.
EVAL_SIZES = {"test": 800, "compositional": 400}
BLIND_RECORDS = 400  # the first records of the test split, with blank images
# `--quick` checks the pipeline in a few minutes; its accuracy means nothing.
QUICK_SIZES = {"train": 200, "captions": 100, "val": 16, "test": 48, "compositional": 24}
QUICK_OVERRIDES = ["train.max_steps=4", "train.batch_size=4", "train.save_steps=1000"]
SAMPLE_ANSWERS = 8


def ensure_data(data: Path, sizes: dict) -> None:
    info = data / "info.json"
    written = json.loads(info.read_text()) if info.is_file() else {}
    if written.get("version") == DATA_VERSION and written.get("sizes") == {**DEFAULT_SIZES, **sizes}:
        print(f"data: reusing {data}")
        return
    print(f"data: writing the built-in data set to {data}")
    synth(data, sizes=sizes)


def _train_stage(name: str, data: Path, out: Path, quick: bool, *overrides: str) -> dict:
    overrides = [f"train.output_dir={out}", *overrides, *(QUICK_OVERRIDES if quick else [])]
    cfg = load_config(f"demo-{name}", overrides)
    cfg.data.train = str(data / Path(cfg.data.train).name)  # the recipes name split files of the data folder
    run(cfg)
    return json.loads((out / SUMMARY_FILE).read_text())


def _evaluate(model, processor, data: Path, out: Path) -> dict:
    test = read_records(data / "test.jsonl")[0]
    runs = {"test": (test, False), "compositional": (read_records(data / "compositional.jsonl")[0], False),
            "test_blind": (test[:BLIND_RECORDS], True)}
    results = {}
    for name, (records, blind) in runs.items():
        metrics, rows = evaluate(model, processor, records, blind=blind)
        write_results(metrics, rows, out / "eval" / f"{name}.json")
        results[name] = (metrics, rows)
    return results


def _language_check(model, processor) -> dict:
    """Perplexity on held-out text and text-only answers, of the trained model and of its base LM."""
    base_dir = checkpoint_dir(load_config("demo-align").model.lm, "lm")
    base, base_tokenizer = AutoModelForCausalLM.from_pretrained(base_dir).eval(), AutoTokenizer.from_pretrained(base_dir)
    paragraphs = language.heldout_paragraphs()
    return {
        "text_perplexity": language.perplexity(model, processor.tokenizer, paragraphs),
        "base_text_perplexity": language.perplexity(base, base_tokenizer, paragraphs),
        "text_answers": language.text_answers(model, processor.tokenizer),
        "base_text_answers": language.text_answers(base, base_tokenizer),
    }


def _report(metrics: dict, rows: list[dict], text: dict) -> None:
    print("\n=== vlmkit demo ===")
    print(f"parameters {metrics['n_params']:,}; training {metrics['train_seconds']:.0f}s "
          f"(align {metrics['align_steps']} steps, SFT {metrics['sft_steps']} steps, float32)")
    print(f"test accuracy          {metrics['accuracy']:.3f}")
    print(f"compositional accuracy {metrics['compositional_accuracy']:.3f}")
    print(f"blind accuracy         {metrics['blind_accuracy']:.3f}  (majority baseline "
          f"{metrics['blind_majority_baseline']:.3f} on its {BLIND_RECORDS} records; test's "
          f"{metrics['majority_baseline']:.3f})")
    for name, value in sorted(metrics["by_category"].items()):
        print(f"  {name:<12} {value:.3f}")
    print(f"text perplexity        {metrics['text_perplexity']:.2f}  (base LM {metrics['base_text_perplexity']:.2f})")
    print("sample answers (question -> answer, reference):")
    for row in random.Random(0).sample(rows, min(SAMPLE_ANSWERS, len(rows))):
        mark = "ok" if row["correct"] else "NO"
        print(f"  {mark}  {row['question']!r} -> {row['prediction']!r}  ({row['answer']!r})")
    print("text-only answers (trained model | base LM):")
    for question, trained, base in zip(language.TEXT_QUESTIONS, text["text_answers"], text["base_text_answers"]):
        print(f"  {question}\n    trained: {trained!r}\n    base:    {base!r}")


def run_demo(out: Path, data: Path, quick: bool = False) -> dict:
    start = time.perf_counter()
    fetch()
    ensure_data(data, QUICK_SIZES if quick else EVAL_SIZES)
    stages = {"align": _train_stage("align", data, out / "align", quick),
              "sft": _train_stage("sft", data, out / "model", quick, f"model.init_from={out / 'align'}")}

    model, processor = load_for_inference(out / "model", device="cpu")
    results = _evaluate(model, processor, data, out)
    text = _language_check(model, processor)
    export = save_llava(model, processor, out / "llava")

    test, test_rows = results["test"]
    metrics = {
        "accuracy": test["accuracy"], "n": test["n"], "by_category": test["by_category"],
        "compositional_accuracy": results["compositional"][0]["accuracy"],
        "compositional_by_category": results["compositional"][0]["by_category"],
        "blind_accuracy": results["test_blind"][0]["accuracy"],
        "majority_baseline": test["majority_baseline"],
        "blind_majority_baseline": results["test_blind"][0]["majority_baseline"],
        "text_perplexity": text["text_perplexity"], "base_text_perplexity": text["base_text_perplexity"],
        "text_answers": dict(zip(language.TEXT_QUESTIONS, text["text_answers"])),
        "base_text_answers": dict(zip(language.TEXT_QUESTIONS, text["base_text_answers"])),
        "train_seconds": sum(stage["train_seconds"] for stage in stages.values()),
        "stage_seconds": {name: stage["train_seconds"] for name, stage in stages.items()},
        "stage_bf16": {name: stage["bf16"] for name, stage in stages.items()},
        "align_steps": stages["align"]["steps"], "sft_steps": stages["sft"]["steps"],
        "total_seconds": time.perf_counter() - start, "n_params": stages["sft"]["n_params"], "quick": quick,
        "llava_export": str(export),
    }
    path = out / "metrics.json"
    write_text_atomic(path, json.dumps(metrics, indent=2))
    _report(metrics, test_rows, text)
    print(f"\nwrote {path}; model in {out / 'model'}, its LLaVA export in {export}\n"
          f"try: vlmkit chat --model {out / 'model'} --image IMAGE 'What colour is the circle?'")
    return metrics
