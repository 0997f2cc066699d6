"""`make demo-scratch` / `vlmkit demo --scratch`: the shapes example, every part from random weights.

1. write the built-in data (`vlmkit data synth`), unless the same data is already there;
2. train the tiny from-scratch model in three stages, with `vlmkit/configs/shapes-*.yaml`: the
   vision tower alone on the captions' words (vision), then the LM and projector on the
   captions (align), then on the questions (SFT, `--sft-steps`, a fixed count so that a run
   gives the same model on a fast host and a slow one);
3. evaluate on the test split, the compositional split and the test split with blank images;
4. write `metrics.json` and print a short report with sample answers.
"""

from __future__ import annotations

import json
import random
import time
from importlib import resources
from pathlib import Path

from vlmkit.config import load_config
from vlmkit.data.records import read_records
from vlmkit.data.synth import DATA_VERSION, DEFAULT_SIZES, synth
from vlmkit.eval.vqa import evaluate, write_results
from vlmkit.serve.generation import load_for_inference
from vlmkit.train.run import run
from vlmkit.train.trainer import SUMMARY_FILE

# `--quick` checks the pipeline in about a minute; its accuracy means nothing.
QUICK_SIZES = {"train": 400, "captions": 200, "val": 40, "test": 160, "compositional": 70}
QUICK_OVERRIDES = ["train.max_steps=30", "train.batch_size=8", "train.save_steps=1000"]

SFT_STEPS = 6000  # at 5,888 steps: test 0.974, compositional 0.900 (docs/results.md, `make demo-scratch`)


def recipe(name: str) -> Path:
    """Path of a recipe shipped with vlmkit (vlmkit/configs/NAME.yaml)."""
    return Path(str(resources.files("vlmkit") / "configs" / f"{name}.yaml"))


def _ensure_data(data: Path, sizes: dict | None) -> None:
    info = data / "info.json"
    written = json.loads(info.read_text()) if info.is_file() else {}
    if written.get("version") == DATA_VERSION and written.get("sizes") == {**DEFAULT_SIZES, **(sizes or {})}:
        print(f"data: reusing {data}")
        return
    print(f"data: writing the built-in data set to {data}")
    synth(data, sizes=sizes)


def _in_data_dir(splits: str | list, data: Path) -> list[str]:
    """The recipes name split files only; they live in the demo's data directory."""
    return [str(data / Path(split).name) for split in ([splits] if isinstance(splits, str) else splits)]


def _train_stage(name: str, data: Path, out: Path, quick: bool, *overrides: str) -> dict:
    overrides = [f"train.output_dir={out}", "train.report_to=[tensorboard]", *overrides]
    overrides += QUICK_OVERRIDES if quick else []
    cfg = load_config(recipe(f"shapes-{name}"), overrides)
    cfg.data.train = _in_data_dir(cfg.data.train, data)
    if cfg.data.tokenizer_data:
        cfg.data.tokenizer_data = _in_data_dir(cfg.data.tokenizer_data, data)
    run(cfg)
    return {**json.loads((out / SUMMARY_FILE).read_text()), "blank_image_rate": cfg.data.blank_image_rate}


def _report(metrics: dict, rows: list[dict]) -> None:
    print("\n=== vlmkit demo --scratch ===")
    print(f"parameters {metrics['n_params']:,}; training {metrics['train_seconds']:.0f}s")
    print(f"test accuracy          {metrics['accuracy']:.3f}")
    print(f"compositional accuracy {metrics['compositional_accuracy']:.3f}")
    print(f"blind accuracy         {metrics['blind_accuracy']:.3f}  (majority baseline "
          f"{metrics['majority_baseline']:.3f}; {metrics['sft_blank_image_rate']:.0%} of the SFT "
          f"records had blank images)")
    for name, value in sorted(metrics["by_category"].items()):
        print(f"  {name:<12} {value:.3f}")
    print("sample answers:")
    for row in random.Random(0).sample(rows, min(6, len(rows))):
        mark = "ok " if row["correct"] else "NO "
        print(f"  {mark} {row['question']!r} -> {row['prediction']!r} (reference {row['answer']!r})")


def run_demo(out: Path, data: Path, quick: bool = False, sft_steps: int = SFT_STEPS) -> dict:
    start = time.perf_counter()
    _ensure_data(data, QUICK_SIZES if quick else None)
    stages = [_train_stage("vision", data, out / "vision", quick),
              _train_stage("align", data, out / "align", quick, f"model.vision={out / 'vision'}")]
    sft = [f"model.init_from={out / 'align'}"] + ([] if quick else [f"train.max_steps={sft_steps}"])
    stages.append(_train_stage("sft", data, out / "model", quick, *sft))

    model, processor = load_for_inference(out / "model")
    results = {}
    for split, blind in (("test", False), ("compositional", False), ("test", True)):
        records, _ = read_records(data / f"{split}.jsonl")
        metrics, rows = evaluate(model, processor, records, blind=blind)
        name = split + ("_blind" if blind else "")
        write_results(metrics, rows, out / "eval" / f"{name}.json")
        results[name] = (metrics, rows)

    test, test_rows = results["test"]
    metrics = {
        "accuracy": test["accuracy"], "n": test["n"], "by_category": test["by_category"],
        "compositional_accuracy": results["compositional"][0]["accuracy"],
        "blind_accuracy": results["test_blind"][0]["accuracy"],
        "majority_baseline": test["majority_baseline"],
        "train_seconds": sum(stage["train_seconds"] for stage in stages),
        "stage_seconds": {name: stage["train_seconds"] for name, stage in zip(("vision", "align", "sft"), stages)},
        "stage_bf16": {name: stage["bf16"] for name, stage in zip(("vision", "align", "sft"), stages)},
        "total_seconds": time.perf_counter() - start,
        "sft_steps": stages[-1]["steps"], "sft_blank_image_rate": stages[-1]["blank_image_rate"],
        "n_params": stages[-1]["n_params"], "quick": quick,
    }
    path = out / "metrics.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(metrics, indent=2))
    tmp.replace(path)
    _report(metrics, test_rows)
    print(f"\nwrote {path}; model in {out / 'model'} (try: vlmkit chat --model {out / 'model'} --image IMG 'question')")
    return metrics
