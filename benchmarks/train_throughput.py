"""Training throughput and MFU of the tiny recipe and a larger model, eager and with torch.compile.

    python benchmarks/train_throughput.py [--small] [--models tiny,larger] [--no-compile] [--compile-timeout S]

A training step is what vlmkit's Trainer runs per batch, without the Trainer around it:
forward with the loss on assistant tokens, backward, gradient clipping at 1.0, AdamW. The
batch is a real one (the first B records of the built-in SFT data, collated by vlmkit's
Collator), reused every step so that torch.compile sees one shape. Reported, per model:

- samples/s and tokens/s (LM positions, image tokens included, padding not), median of
  the timed steps, against what the same model would reach at the matmul peak;
- MFU: the FLOPs of one forward+backward, counted by torch.utils.flop_counter.FlopCounterMode
  (vision encoder, projector and LM alike; attention is counted through SDPA's math path,
  which the counter sees), per second, over the float32 matmul peak measured now
  (the best of five 4096^3 torch.mm). Target: MFU >= 30%.
- torch.compile: each model is compiled in its own process, with a fresh inductor cache (a
  cold compile, the same on every run) and a time limit (240 s, building the model and the
  timed steps included); its first step's time is reported as the compile time, and a
  failure or a time-out is an entry that says so.

Each (model, mode) runs in a fresh process; --small compiles the tiny model only. On a GPU
the models are `tiny` and `gpu` (a ViT-B-sized tower and a 0.3B LM) under bfloat16
autocast, against the bfloat16 matmul peak. Expected time here (2 cores): about 4 minutes
full size (compiling is half of it; 10.5 at most with the time limits), 3 small.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import common
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

MAIN_BATCH = 16  # the recipe's train.batch_size
DATA_RECORDS = 128  # built-in SFT records: batches are the first B, and the tokenizer is trained on them all
MODELS = {
    "tiny": [],  # vlmkit.config's defaults, which configs/tiny.yaml spells out
    # About 6x the tiny model's parameters: still a few seconds per step on a 2-core CPU.
    "larger": ["model.vision_config.hidden_size=256", "model.vision_config.intermediate_size=1024",
               "model.vision_config.num_hidden_layers=4", "model.vision_config.num_attention_heads=4",
               "model.text_config.hidden_size=384", "model.text_config.intermediate_size=1024",
               "model.text_config.num_hidden_layers=6", "model.text_config.num_attention_heads=6",
               "model.text_config.num_key_value_heads=6"],
    # The default recipe's pretrained parts (`vlmkit models fetch`): DINOv2-small at 224 px, SmolLM2-135M.
    "default": ["model.vision=facebook/dinov2-small", "model.lm=HuggingFaceTB/SmolLM2-135M-Instruct",
                "model.vision_feature_layer=-2", "model.image_size=224"],
    # GPU only: a ViT-B/16-sized tower at 224 px and a 0.3B-parameter LM.
    "gpu": ["model.vision_config.hidden_size=768", "model.vision_config.intermediate_size=3072",
            "model.vision_config.num_hidden_layers=12", "model.vision_config.num_attention_heads=12",
            "model.vision_config.image_size=224", "model.vision_config.patch_size=16",
            "model.text_config.hidden_size=1024", "model.text_config.intermediate_size=2816",
            "model.text_config.num_hidden_layers=24", "model.text_config.num_attention_heads=16",
            "model.text_config.num_key_value_heads=16"],
}
MODULES = ("vision_tower", "projector", "language_model")


def build_for_training(model_name: str, data: Path):
    """(model, dataset, collator) as `vlmkit train` builds them for the named model on `data`."""
    from vlmkit.config import load_config
    from vlmkit.data.dataset import Collator, ConversationDataset
    from vlmkit.data.records import read_record_files
    from vlmkit.model.build import build
    from vlmkit.train.run import _texts

    cfg = load_config(None, MODELS[model_name])
    records, _ = read_record_files([str(data)], False)
    torch.manual_seed(0)
    built = build(cfg.model, training_texts=lambda: _texts(records))
    dataset = ConversationDataset(records, built.processor, cfg.data.max_length)
    return built.model, dataset, Collator(built.processor.tokenizer.pad_token_id)


def count_flops(model, batch: dict) -> dict:
    """FLOPs of one forward+backward, and of the forward per top-level module.

    Per-module figures come from a separate forward: the counter's module attribution is
    reliable there, not in backward. The total is every op of forward+backward, whatever module.
    """
    with sdpa_kernel(SDPBackend.MATH):  # the CPU's fused attention kernel is invisible to the counter
        with FlopCounterMode(display=False) as counter:
            model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)
        with FlopCounterMode(display=False) as forward, torch.no_grad():
            model(**batch)
    counts = {k.split(".")[-1]: sum(v.values()) for k, v in forward.get_flop_counts().items() if k.count(".") == 1}
    return {"total": counter.get_total_flops(), "forward": forward.get_total_flops(),
            "forward_by_module": {m: counts.get(m, 0) for m in MODULES}}


def measure(model_name: str, mode: str, batch_sizes: list[int], repeats: int) -> dict:
    """Child process: time training steps of one model in one mode at each batch size."""
    dev = common.device()
    model, dataset, collator = build_for_training(model_name, common.synth_train_data(DATA_RECORDS))
    model = model.to(dev).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast = torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda")
    runner = torch.compile(model) if mode == "compile" else model
    result = {"model": model_name, "mode": mode, "n_params": sum(p.numel() for p in model.parameters()), "points": []}
    for size in batch_sizes:
        batch = {k: v.to(dev) for k, v in collator([dataset[i] for i in range(size)]).items()}

        def step(batch=batch):
            with autocast:
                loss = runner(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        if size == MAIN_BATCH and mode == "eager":  # the compiled model computes the same FLOPs
            with autocast:
                result["flops"] = count_flops(model, batch)
        first = time.perf_counter()
        step()  # the first step compiles (in compile mode)
        common.sync()
        first = time.perf_counter() - first
        timing = common.timed(step, warmup=1 if mode == "compile" else 0, repeats=repeats)
        result["points"].append({"batch": size, "tokens": int(batch["attention_mask"].sum()),
                                 "first_step_s": first, **timing})
        print(f"  {model_name} {mode} batch {size}: {timing['median_s']:.3f} s/step", file=sys.stderr, flush=True)
    return result


def entries_for(result: dict, peak: float, peak_name: str, eager: dict | None) -> list[dict]:
    """samples/s, tokens/s and MFU at the main batch size (and the compile speed-up)."""
    name = f"train {result['model']} {result['mode']}"
    main = next(p for p in result["points"] if p["batch"] == MAIN_BATCH)
    flops, step_s = (eager or result)["flops"]["total"], main["median_s"]
    at_peak = peak / flops  # steps/s if every FLOP ran at the matmul peak
    details = {"batch": MAIN_BATCH, "step_s": step_s, "flops_per_step": flops, "n_params": result["n_params"],
               "forward_flops_by_module": (eager or result)["flops"]["forward_by_module"],
               "first_step_s": main["first_step_s"],
               "sweep": [{"batch": p["batch"], "samples_per_s": p["batch"] / p["median_s"],
                          "tokens_per_s": p["tokens"] / p["median_s"]} for p in result["points"]]}
    out = [
        common.entry(f"{name} MFU", flops / step_s / 1e9, "GFLOP/s", peak / 1e9, peak_name, target_min=0.30,
                     **details),
        common.entry(f"{name} samples/s", MAIN_BATCH / step_s, "samples/s", MAIN_BATCH * at_peak,
                     "samples/s at the matmul peak"),
        common.entry(f"{name} tokens/s", main["tokens"] / step_s, "tokens/s", main["tokens"] * at_peak,
                     "tokens/s at the matmul peak"),
    ]
    if eager is not None:
        eager_main = next(p for p in eager["points"] if p["batch"] == MAIN_BATCH)
        out.append(common.entry(f"{name} speed-up", MAIN_BATCH / step_s, "samples/s", MAIN_BATCH / eager_main["median_s"],
                                "eager samples/s", compile_s=main["first_step_s"]))
    return out


def failed_compile(model: str, code: int | None, output: str, limit: float) -> dict:
    why = (f"torch.compile did not finish within {limit:.0f} s on this machine (compile plus steps)" if code is None
           else f"torch.compile failed: {output.strip().splitlines()[-1] if output.strip() else f'exit {code}'}")
    return common.entry(f"train {model} compile samples/s", None, "samples/s", None, "eager samples/s", note=why)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        xs = [p["batch"] for p in r["points"]]
        ax.plot(xs, [p["batch"] / p["median_s"] for p in r["points"]], marker="o", label=f"{r['model']} {r['mode']}")
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("batch size (samples)")
    ax.set_ylabel("training samples/s")
    ax.set_title(f"Training throughput ({common.machine_line()})", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--models", help="comma-separated, from: " + ", ".join(MODELS))
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile runs")
    parser.add_argument("--compile-timeout", type=float, default=240, help="seconds per compiled model, all in")
    parser.add_argument("--plot", type=Path, default=common.OUT_DIR / "bench_throughput.png")
    parser.add_argument("--child", help="internal: MODEL:MODE:BATCHES:REPEATS, one measurement in this process")
    args = parser.parse_args()
    if args.child:
        model, mode, sizes, repeats = args.child.split(":")
        common.emit(measure(model, mode, [int(s) for s in sizes.split(",")], int(repeats)))
        return
    started = time.perf_counter()
    cuda = torch.cuda.is_available()
    models = args.models.split(",") if args.models else (["tiny", "gpu"] if cuda else ["tiny", "larger"])
    sweep = {"tiny": [1, 4, 16], "larger": [1, 16], "gpu": [8, 16]} if args.small else \
        {"tiny": [1, 2, 4, 8, 16, 32], "larger": [1, 4, 16], "gpu": [1, 4, 16, 32, 64]}
    repeats = 2 if args.small else 3

    dtype, n = (torch.bfloat16, 8192) if cuda else (torch.float32, 2048 if args.small else 4096)
    peak = common.matmul_peak(common.device(), dtype, n)
    peak_name = f"{str(dtype).removeprefix('torch.')} matmul peak ({n}^3 torch.mm)"
    print(f"matmul peak: {peak / 1e9:.1f} GFLOP/s", flush=True)

    entries, results = [], []
    for model in models:
        eager = None
        compiled = not args.no_compile and (model == "tiny" or not args.small)  # small: compile the tiny one only
        for mode in ("eager", "compile") if compiled else ("eager",):
            sizes = sweep[model] if mode == "eager" else [MAIN_BATCH]
            child = f"{model}:{mode}:{','.join(map(str, sizes))}:{repeats}"
            timeout = args.compile_timeout if mode == "compile" else 1800
            with tempfile.TemporaryDirectory(prefix="vlmkit-inductor-") as cache:
                code, output, seconds = common.run_python([__file__, "--child", child], timeout,
                                                          env={"TORCHINDUCTOR_CACHE_DIR": cache})
            print(f"{model} {mode}: {seconds:.0f} s", flush=True)
            if code != 0:
                if mode == "eager":
                    raise RuntimeError(f"{model} eager failed:\n{output[-3000:]}")
                entries.append(failed_compile(model, code, output, args.compile_timeout))
                continue
            result = common.child_result(output)
            results.append(result)
            entries += entries_for(result, peak, peak_name, eager)
            eager = eager or result
    plot(results, args.plot)
    common.save_entries(args.out, entries, started)


if __name__ == "__main__":
    main()
