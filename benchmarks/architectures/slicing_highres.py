"""What slicing buys: the same tiny model with and without MiniCPM-V slicing on the high-resolution task.

    python benchmarks/architectures/slicing_highres.py [--steps 1500] [--data data/synth-highres-1]

The data: `vlmkit data synth-highres --max-objects 1 --object-size 32 44` (one patterned object
per 256 px scene; the 5 px pattern blurs away in a 64 px view). The model and recipe:
src/vlmkit/configs/highres.yaml, trained from random weights for the same number of steps,
once with `model.slicing=null` (one 64 px view) and once with `model.slicing=minicpm`
(64 px whole view + 2x2 slices). Writes runs/bench/slicing_highres.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib import resources
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import table, train_and_score  # noqa: E402

from vlmkit.data.synth_highres import synth_highres  # noqa: E402

CONFIG = str(resources.files("vlmkit") / "configs" / "highres.yaml")
RUNS = {"no slicing (64 px view)": ["model.slicing=null"], "MiniCPM-V slicing (whole + 2x2)": ["model.slicing=minicpm"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--data", default="data/synth-highres-1", help="made when missing")
    parser.add_argument("--train", type=int, default=4000, help="train records when making the data")
    parser.add_argument("--test", type=int, default=400)
    parser.add_argument("--out", default="runs/bench/slicing_highres")
    args = parser.parse_args()
    data = Path(args.data)
    if not (data / "train.jsonl").is_file():
        synth_highres(data, sizes={"train": args.train, "val": 20, "test": args.test}, max_objects=1,
                      object_size=(32.0, 44.0))
    rows = []
    for name, overrides in RUNS.items():
        out = Path(args.out) / overrides[0].split("=")[1]
        rows.append(train_and_score(name, CONFIG, overrides, [str(data / "train.jsonl")], data / "test.jsonl", out,
                                    steps=args.steps, test_limit=args.test))
        print(json.dumps(rows[-1]), flush=True)
    baseline = json.loads((data / "info.json").read_text())["majority_baseline"]["test"]
    result = {"steps": args.steps, "majority_baseline": baseline, "rows": rows,
              "margin": round(rows[1]["accuracy"] - rows[0]["accuracy"], 4)}
    path = Path(args.out).parent / "slicing_highres.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(table(rows, ["name", "steps", "samples_per_second", "train_seconds", "accuracy"]))
    print(f"majority baseline {baseline:.3f}; slicing minus no slicing: {result['margin']:+.3f}")


if __name__ == "__main__":
    main()
