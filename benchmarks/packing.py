"""Training throughput on the built-in data with packing (`train.packing=true`) against without.

    python benchmarks/packing.py [--packing-length 0] [--steps 30] [--batch-size 16] [--repeats 2] [--data DIR]

Both settings train the tiny from-scratch defaults (vlmkit/configs/scratch.yaml) from the same
seed on the same batches -- the built-in data's SFT mix, multi-turn questions plus captions,
whose lengths vary a lot -- so the only difference is the padding a padded batch computes and a packed
one does not. Reported per setting (median over repeats, which alternate): seconds of
training, samples/s, and supervised tokens/s; and the padding share of the padded batches.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import tempfile
from pathlib import Path

import torch

from vlmkit.config import load_config
from vlmkit.data.synth import synth
from vlmkit.processing.processor import IGNORE_INDEX

run_module = importlib.import_module("vlmkit.train.run")


class Counting(run_module.VLMTrainer):
    """The ordinary trainer, counting the tokens (real and padding) of every batch it trains on."""

    latest = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tokens = self.real_tokens = self.supervised = 0
        Counting.latest = self

    def training_step(self, model, inputs, *args, **kwargs):
        ids = inputs["input_ids"]
        self.tokens += ids.numel()
        self.real_tokens += int((ids != self.processing_class.tokenizer.pad_token_id).sum())
        self.supervised += int((inputs["labels"] != IGNORE_INDEX).sum())
        return super().training_step(model, inputs, *args, **kwargs)


def train_once(data: Path, out: Path, packing: bool, length: int, steps: int, batch_size: int) -> dict:
    cfg = load_config(None, [f"train.packing={str(packing).lower()}", f"train.packing_length={length}",
                             f"train.max_steps={steps}",
                             f"train.batch_size={batch_size}", "train.report_to=[]", "train.save_steps=100000",
                             "train.logging_steps=100000", f"train.output_dir={out}"])
    cfg.data.train = [str(data / "train.jsonl"), str(data / "captions.jsonl")]
    run_module.run(cfg, log=lambda *args: None)
    trainer = Counting.latest
    seconds = trainer.state.log_history[-1]["train_runtime"]
    return {"seconds": seconds, "samples_per_s": steps * batch_size / seconds,
            "supervised_tokens_per_s": trainer.supervised / seconds,
            "padding_share": 1 - trainer.real_tokens / trainer.tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packing-length", type=int, default=0, help="tokens per packed row (0: the longest)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--data", help="built-in data folder (default: a small one, written now)")
    args = parser.parse_args()
    run_module.VLMTrainer = Counting  # run() builds its trainer from this name

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data) if args.data else Path(tmp) / "data"
        if not args.data:
            synth(data, sizes={"train": 600, "captions": 300, "val": 0, "test": 0, "compositional": 0}, workers=1,
                  progress=False)
        results = {False: [], True: []}
        for repeat in range(args.repeats):
            for packing in (False, True):
                out = Path(tmp) / f"run-{packing}-{repeat}"
                results[packing].append(train_once(data, out, packing, args.packing_length, args.steps, args.batch_size))

    print(f"{args.steps} steps of {args.batch_size} samples, tiny recipe, {torch.get_num_threads()} threads, "
          f"packing_length {args.packing_length}; median of {args.repeats}")
    medians = {}
    for packing, runs in results.items():
        medians[packing] = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        m = medians[packing]
        print(f"  {'packed' if packing else 'padded'}: {m['seconds']:.1f}s, {m['samples_per_s']:.1f} samples/s, "
              f"{m['supervised_tokens_per_s']:.0f} supervised tokens/s, padding {m['padding_share']:.0%}")
    print(f"  speed-up with packing: {medians[True]['samples_per_s'] / medians[False]['samples_per_s']:.2f}x")


if __name__ == "__main__":
    main()
