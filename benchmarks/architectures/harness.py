"""Train one configuration on built-in data, then score it on a held-out split: the shared step of
the architecture comparisons in this folder (projectors, slicing).

A run gets a fixed CPU time: a few timed steps estimate the step time, and the run is given the
number of steps that fits, so its learning-rate schedule completes (a run stopped mid-schedule
would be judged unfairly). The seconds actually spent are reported next to the accuracy.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from vlmkit.config import load_config
from vlmkit.data.records import read_records
from vlmkit.eval.vqa import evaluate
from vlmkit.serve.generation import load_for_inference
from vlmkit.train.run import run

QUIET = ["train.report_to=[]", "train.logging_steps=1000", "train.save_steps=1000000", "train.warmup=0.03"]


def _train(config: str, overrides: list[str], data: list[str], out: Path, steps: int) -> dict:
    cfg = load_config(config, [*QUIET, *overrides, f"train.max_steps={steps}", f"train.output_dir={out}"])
    cfg.data.train = data if len(data) > 1 else data[0]
    run(cfg, log=lambda *a: None)
    return json.loads((out / "train_summary.json").read_text())


def seconds_per_step(config: str, overrides: list[str], data: list[str], out: Path, probe_steps: int = 8) -> float:
    summary = _train(config, overrides, data, out, probe_steps)
    return summary["train_seconds"] / probe_steps


def train_and_score(name: str, config: str, overrides: list[str], data: list[str], test: Path, out: Path,
                    seconds: float | None = None, steps: int | None = None, test_limit: int = 400) -> dict:
    """Train for `steps` (or as many as fit in `seconds`), then exact-match accuracy on `test`."""
    torch.manual_seed(0)
    if steps is None:
        steps = max(1, int(seconds / seconds_per_step(config, overrides, data, out / "probe")))
    summary = _train(config, overrides, data, out / "model", steps)
    model, processor = load_for_inference(out / "model", device="cpu")
    records = read_records(test)[0][:test_limit]
    started = time.perf_counter()
    metrics, _ = evaluate(model, processor, records, progress=False)
    samples = steps * load_config(config, overrides).train.batch_size
    return {"name": name, "steps": steps, "train_seconds": round(summary["train_seconds"], 1),
            "samples_per_second": round(samples / summary["train_seconds"], 2),
            "params": summary["n_params"], "image_tokens": processor.tokens_per_crop,
            "accuracy": round(metrics["accuracy"], 4), "n_test": len(records),
            "eval_seconds": round(time.perf_counter() - started, 1)}


def table(rows: list[dict], columns: list[str]) -> str:
    """A Markdown table of `rows` (for the docs and the terminal alike)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)
