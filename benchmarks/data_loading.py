"""Data loading: samples/s of the training data pipeline alone, against the model's training samples/s.

    python benchmarks/data_loading.py [--small] [--records 2000] [--batch-size 16]

The pipeline is what `vlmkit train` feeds the Trainer: ConversationDataset (image decoding
and pixel processing per item; text is tokenised once, up front, when the dataset is built)
and Collator, in a torch DataLoader with shuffling, on the built-in data (`vlmkit data
synth`, the SFT split), with 0 worker processes (the default, `data.num_workers`) and with
2. One whole epoch is timed. The reference is the training samples/s of the tiny recipe at
the same batch size, measured now as in train_throughput.py (the tiny model is the
fastest, so the most easily starved): a ratio above 1 means loading outpaces training.
With 0 workers loading and training take turns, so loading's share of each step is also
reported. On a GPU the `gpu` model (and its processor) is measured too.
Expected time here: about 15 s full size (once the data exist), 15 s small.
"""

from __future__ import annotations

import time

import common
import torch
from torch.utils.data import DataLoader
from train_throughput import build_for_training, measure


def loader_rate(dataset, collator, batch_size: int, workers: int) -> float:
    """Samples/s over one shuffled epoch."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, collate_fn=collator, num_workers=workers,
                        generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    n = sum(batch["input_ids"].shape[0] for batch in loader)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--records", type=int, help="SFT records, one epoch (default 2000; small 300)")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    started = time.perf_counter()
    data = common.synth_train_data(args.records or (300 if args.small else 2000))
    entries = []
    for model in ["tiny", "gpu"] if torch.cuda.is_available() else ["tiny"]:
        _, dataset, collator = build_for_training(model, data)  # the model's own processor (image size)
        loading = {w: loader_rate(dataset, collator, args.batch_size, w) for w in (0, 2)}
        result = measure(model, "eager", [args.batch_size], repeats=2 if args.small else 3)
        train = args.batch_size / result["points"][0]["median_s"]
        print(f"{model} training: {train:.1f} samples/s; loading: "
              + ", ".join(f"{w} workers {r:.1f}" for w, r in loading.items()), flush=True)
        for workers, rate in loading.items():
            entries.append(common.entry(
                f"data loading {workers} workers vs {model} training", rate, "samples/s", train,
                f"{model} training samples/s", records=len(dataset), batch_size=args.batch_size,
                loading_share_of_step_0_workers=train / (train + loading[0])))
    common.save_entries(args.out, entries, started)


if __name__ == "__main__":
    main()
