"""The `vlmkit` command: one subcommand per pipeline step, each a thin layer over a module function.

Errors the user can fix (vlmkit.errors.VlmkitError) print as one message and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vlmkit.errors import VlmkitError


def _data_synth(args) -> None:
    from vlmkit.data.synth import DEFAULT_SIZES, synth

    sizes = {split: getattr(args, split) for split in DEFAULT_SIZES if getattr(args, split) is not None}
    paths = synth(Path(args.out), seed=args.seed, sizes=sizes, turns=args.turns, image_size=args.image_size,
                  workers=args.workers)  # fmt: skip
    for split, path in paths.items():
        print(f"{split}: {path}")


def _train(args) -> None:
    from vlmkit.config import load_config
    from vlmkit.train.run import run

    overrides = list(args.set or [])
    for flag, key in (("train_data", "data.train"), ("eval_data", "data.eval"), ("output_dir", "train.output_dir"),
                      ("max_steps", "train.max_steps"), ("seed", "train.seed")):  # fmt: skip
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={json.dumps(getattr(args, flag))}")
    if args.skip_bad:
        overrides.append("data.skip_bad=true")
    if args.resume:
        overrides.append("train.resume=true")
    run(load_config(args.config, overrides))


def _eval(args) -> None:
    from vlmkit.data.records import read_records
    from vlmkit.eval.vqa import evaluate, write_results
    from vlmkit.serve.generation import load_for_inference

    model, processor = load_for_inference(args.model)
    records, skipped = read_records(args.data, skip_bad=args.skip_bad)
    records = records[: args.limit] if args.limit else records
    metrics, rows = evaluate(model, processor, records, blind=args.blind, batch_size=args.batch_size,
                             max_new_tokens=args.max_new_tokens)  # fmt: skip
    output = Path(args.output or Path(args.model) / ("metrics_blind.json" if args.blind else "metrics.json"))
    predictions = write_results(metrics, rows, output)
    print(json.dumps(metrics, indent=2))
    print(f"wrote {output} and {predictions}" + (f"; skipped {len(skipped)} bad line(s)" if skipped else ""))


def _chat(args) -> None:
    from vlmkit.processing.images import open_image
    from vlmkit.serve.generation import GenerationSettings, load_for_inference, stream_reply, with_image_markers

    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                                  temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                  repetition_penalty=args.repetition_penalty, seed=args.seed)  # fmt: skip
    settings.check()
    images = [open_image(p) for p in args.image or []]
    model, processor = load_for_inference(args.model)
    if args.prompt is None:
        from vlmkit.serve.chat_cli import interactive

        interactive(model, processor, images, settings, image_paths=args.image or [])
        return
    messages = with_image_markers([{"role": "user", "content": args.prompt}], len(images))
    for piece in stream_reply(model, processor, messages, images, settings):
        print(piece, end="", flush=True)
    print()


def _demo(args) -> None:
    from vlmkit.demo import run_demo

    run_demo(Path(args.out), Path(args.data), quick=args.quick)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmkit", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = commands.add_parser("data", help="make or convert data").add_subparsers(dest="data_command", required=True)
    synth = data.add_parser("synth", help="write the built-in shapes-and-text VQA data (no download)")
    synth.add_argument("--out", default="data/synth", help="output folder (default: data/synth)")
    synth.add_argument("--seed", type=int, default=0)
    for split in ("train", "captions", "val", "test", "compositional"):
        synth.add_argument(f"--{split}", type=int, help=f"number of {split} records")
    synth.add_argument("--turns", type=int, default=5, help="question turns per train record (default: 5)")
    synth.add_argument("--image-size", type=int, default=64)
    synth.add_argument("--workers", type=int, help="processes (default: one per core)")
    synth.set_defaults(func=_data_synth)

    train = commands.add_parser("train", help="train a VLM (one stage: align or sft)")
    train.add_argument("config", nargs="?", help="YAML config; without it the tiny from-scratch recipe")
    train.add_argument("--train-data", help="JSONL of records")
    train.add_argument("--eval-data", help="JSONL of records for the eval loss")
    train.add_argument("--output-dir", help="where checkpoints and the final model go")
    train.add_argument("--max-steps", type=int)
    train.add_argument("--seed", type=int)
    train.add_argument("--skip-bad", action="store_true", help="skip bad records (and report them) instead of stopping")
    train.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the output dir")
    train.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="override config values, e.g. train.lr.lm=1e-4")
    train.set_defaults(func=_train)

    ev = commands.add_parser("eval", help="answer a JSONL split and score exact match per category")
    ev.add_argument("--model", required=True, help="saved model directory")
    ev.add_argument("--data", required=True, help="JSONL of records")
    ev.add_argument("--blind", action="store_true", help="replace every image by a blank one")
    ev.add_argument("--output", help="metrics JSON path (predictions go beside it)")
    ev.add_argument("--batch-size", type=int, default=32)
    ev.add_argument("--max-new-tokens", type=int, default=16)
    ev.add_argument("--limit", type=int, help="only the first N records")
    ev.add_argument("--skip-bad", action="store_true")
    ev.set_defaults(func=_eval)

    chat = commands.add_parser("chat", help="ask a model about images (interactive without a prompt)")
    chat.add_argument("prompt", nargs="?", help="the question; leave out for an interactive session")
    chat.add_argument("--model", required=True)
    chat.add_argument("--image", action="append", help="an image (repeat for several)")
    chat.add_argument("--max-new-tokens", type=int, default=128)
    chat.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    chat.add_argument("--temperature", type=float, default=0.7)
    chat.add_argument("--top-p", type=float, default=0.9)
    chat.add_argument("--top-k", type=int, default=50)
    chat.add_argument("--repetition-penalty", type=float, default=1.0)
    chat.add_argument("--seed", type=int)
    chat.set_defaults(func=_chat)

    demo = commands.add_parser("demo", help="the main job: data, align + SFT from scratch, eval, report")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--data", default="data/synth")
    demo.add_argument("--quick", action="store_true", help="a much smaller run, to check the pipeline")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except VlmkitError as err:
        print(f"vlmkit: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vlmkit: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
