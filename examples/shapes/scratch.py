"""`make demo-scratch`: the shapes example, every part from random weights.

    python -m examples.shapes.scratch --out runs/demo-scratch --data data/synth-scratch [--quick]

1. write the built-in data (`vlmkit data synth`), unless the same data is already there;
2. train the tiny from-scratch model in three stages, with this folder's YAMLs: the vision
   tower alone on the captions' words (vision.yaml, `vision_tags.py`), then the LM and
   projector on the captions (align.yaml), then on the questions (sft.yaml, `--sft-steps`, a
   fixed count so that a run gives the same model on a fast host and a slow one);
3. evaluate on the test split, the compositional split and the test split with blank images;
4. write `metrics.json` and print a short report with sample answers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
from pathlib import Path

from PIL import Image

from examples.shapes.vision_tags import load_tag_config, run_vision_stage
from vlmkit.config import load_config
from vlmkit.data.records import read_records, write_records
from vlmkit.data.synth import DATA_VERSION, DEFAULT_SIZES, synth
from vlmkit.errors import VlmkitError
from vlmkit.eval.vqa import evaluate, write_results
from vlmkit.processing.images import blank_like
from vlmkit.processing.processor import VLMProcessor
from vlmkit.serve.generation import load_for_inference
from vlmkit.train.run import run
from vlmkit.train.trainer import SUMMARY_FILE

HERE = Path(__file__).parent

# `--quick` checks the pipeline in about a minute; its accuracy means nothing.
QUICK_SIZES = {"train": 400, "captions": 200, "val": 40, "test": 160, "compositional": 70}
QUICK_OVERRIDES = ["train.max_steps=30", "train.batch_size=8", "train.save_steps=1000"]

SFT_STEPS = 6000  # at 5,888 steps: test 0.974, compositional 0.900 (docs/results.md, `make demo-scratch`)
# The share of SFT records that show the blank image `vlmkit eval --blind` uses, answers kept: a
# blank image then tells the model nothing, and blind accuracy sits near the majority baseline
# instead of below it. 3% cost compositional accuracy 2-3 points (README.md).
BLANK_IMAGE_RATE = 0.01


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


def with_blank_images(source: Path, target: Path, rate: float, seed: int, image_mean: list[float]) -> Path:
    """A copy of the records at `source` in which a fixed share (drawn with `seed`) show blank
    images of their images' sizes in the processor's mean colour (`blank_like`), answers kept."""
    records, _ = read_records(source)
    draws = random.Random(seed)
    blanks: dict[tuple[int, int], str] = {}
    copied = []
    for record in records:
        if draws.random() < rate:
            paths = []
            for path in record.images:
                with Image.open(path) as image:
                    size = image.size
                if size not in blanks:
                    blanks[size] = str(target.parent / f"blank-{size[0]}x{size[1]}.png")
                    blank_like(Image.new("RGB", size), image_mean).save(blanks[size])
                paths.append(blanks[size])
            record = dataclasses.replace(record, images=paths)
        copied.append(record)
    write_records(target, copied)
    return target


def _train_stage(name: str, data: Path, out: Path, quick: bool, *overrides: str) -> dict:
    overrides = [f"train.output_dir={out}", "train.report_to=[tensorboard]", *overrides]
    overrides += QUICK_OVERRIDES if quick else []
    cfg = (load_tag_config if name == "vision" else load_config)(HERE / f"{name}.yaml", overrides)
    cfg.data.train = _in_data_dir(cfg.data.train, data)
    if cfg.data.tokenizer_data:
        cfg.data.tokenizer_data = _in_data_dir(cfg.data.tokenizer_data, data)
    if name == "sft":  # beside the model's folder, not in it
        copies = out.parent / "sft-data"
        copies.mkdir(parents=True, exist_ok=True)
        mean = VLMProcessor.from_pretrained(cfg.model.init_from).image_processor.image_mean
        cfg.data.train = [str(with_blank_images(Path(split), copies / Path(split).name, BLANK_IMAGE_RATE,
                                                cfg.train.seed, mean)) for split in cfg.data.train]
    (run_vision_stage if name == "vision" else run)(cfg)
    return json.loads((out / SUMMARY_FILE).read_text())


def _report(metrics: dict, rows: list[dict]) -> None:
    print("\n=== the shapes example, from scratch ===")
    print(f"parameters {metrics['n_params']:,}; training {metrics['train_seconds']:.0f}s")
    print(f"test accuracy          {metrics['accuracy']:.3f}")
    print(f"compositional accuracy {metrics['compositional_accuracy']:.3f}")
    print(f"blind accuracy         {metrics['blind_accuracy']:.3f}  (majority baseline "
          f"{metrics['majority_baseline']:.3f}; {BLANK_IMAGE_RATE:.0%} of the SFT "
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
        "sft_steps": stages[-1]["steps"], "sft_blank_image_rate": BLANK_IMAGE_RATE,
        "n_params": stages[-1]["n_params"], "quick": quick,
    }
    path = out / "metrics.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(metrics, indent=2))
    tmp.replace(path)
    _report(metrics, test_rows)
    print(f"\nwrote {path}; model in {out / 'model'} (try: vlmkit chat --model {out / 'model'} --image IMG 'question')")
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.shapes.scratch", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/demo-scratch")
    parser.add_argument("--data", default="data/synth-scratch")
    parser.add_argument("--quick", action="store_true", help="a much smaller run, to check the pipeline")
    parser.add_argument("--sft-steps", type=int, default=SFT_STEPS, metavar="N",
                        help=f"SFT steps (default: {SFT_STEPS}; --quick takes 30)")
    args = parser.parse_args(argv)
    try:
        run_demo(Path(args.out), Path(args.data), quick=args.quick, sft_steps=args.sft_steps)
    except VlmkitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
