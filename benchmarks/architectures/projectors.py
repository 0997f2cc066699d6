"""Each projector at one token budget: training throughput, and held-out accuracy after a fixed CPU time.

    python benchmarks/architectures/projectors.py [--seconds 120] [--data data/synth]

Every run trains the same tiny from-scratch model (a RegNet tower, the tiny Llama LM) on the
built-in questions and captions, with 16 image tokens per image reached the way each design
reaches it: linear and MLP projectors keep one token per feature of a 32 px image (4x4); the
pixel shuffle folds the 8x8 features of a 64 px image 2x2; the resampler and the Q-Former read
the 8x8 features with 16 learned queries. Writes runs/bench/projectors.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import table, train_and_score  # noqa: E402

from vlmkit.data.synth import synth  # noqa: E402

TOWER = ('model.vision_config={model_type: regnet, embedding_size: 32, hidden_sizes: [32, 64, 128], '
         'depths: [1, 1, 1], groups_width: 16, layer_type: y, downsample_in_first_stage: false}')  # stride 8
COMMON = [TOWER, "train.stage=sft", "train.lr={vision: 1.0e-3, projector: 1.0e-3, lm: 1.0e-3}", "train.batch_size=16"]
DESIGNS = {
    "linear": ["model.projector=linear", "model.image_size=32", "model.projector_args={pos_embed: true}"],
    "mlp": ["model.projector=mlp", "model.image_size=32", "model.projector_args={pos_embed: true}"],
    "layernorm_mlp": ["model.projector=layernorm_mlp", "model.image_size=32", "model.projector_args={pos_embed: true}"],
    "pixel_shuffle": ["model.projector=pixel_shuffle", "model.image_size=64",
                      "model.projector_args={factor: 2, pos_embed: true}"],
    "resampler": ["model.projector=resampler", "model.image_size=64", "model.projector_args={num_queries: 16}"],
    "qformer": ["model.projector=qformer", "model.image_size=64", "model.projector_args={num_queries: 16, depth: 2}"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=120.0, help="training time per projector")
    parser.add_argument("--data", default="data/synth", help="built-in data (made when missing)")
    parser.add_argument("--out", default="runs/bench/projectors")
    parser.add_argument("--only", nargs="*", choices=list(DESIGNS), help="a subset of the projectors")
    args = parser.parse_args()
    data = Path(args.data)
    if not (data / "train.jsonl").is_file():
        synth(data)
    rows = []
    for name in args.only or DESIGNS:
        row = train_and_score(name, None, [*COMMON, *DESIGNS[name]], [str(data / "train.jsonl"),
                              str(data / "captions.jsonl")], data / "test.jsonl", Path(args.out) / name,
                              seconds=args.seconds)
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = Path(args.out).parent / "projectors.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"seconds_per_run": args.seconds, "rows": rows}, indent=2))
    print(table(rows, ["name", "image_tokens", "params", "steps", "samples_per_second", "train_seconds",
                       "accuracy"]))


if __name__ == "__main__":
    main()
