"""Training speed of the default recipe's step, and where its time goes, on this machine.

    python benchmarks/train_composition.py [--steps 3] [--out FILE]

The step is `vlmkit train`'s with the default recipe once the LM has joined (`train.lm_start`):
DINOv2-small (frozen) + MLP projector + SmolLM2-135M-Instruct with LoRA r 16, built by the
same code (`train.run.prepare_model`), in float32; a batch of 8 samples, each one 224 px image
(256 image tokens) and a short question and answer, packed as the recipe packs them. It needs
the checkpoints of `vlmkit models fetch`. It prints and writes:

- samples/s and tokens/s;
- MFU: FLOPs counted by torch's FlopCounterMode over one whole step (forward, backward,
  optimizer; every module's work), over the float32 matmul peak measured in the same run;
- each module's share of the FLOPs, and of the forward time (hooks around each module);
- the effect of the frozen tower's feature cache: a first epoch encodes every image, later
  epochs reuse the features (`train.vision_feature_cache_gb`).
"""

from __future__ import annotations

import time

import torch
from PIL import Image, ImageDraw
from torch.utils.flop_counter import FlopCounterMode

import common
from vlmkit.config import load_config
from vlmkit.data.dataset import ConversationDataset
from vlmkit.data.packing import PackedCollator
from vlmkit.data.records import normalise
from vlmkit.train.run import prepare_model
from vlmkit.train.trainer import apply_learning_rates

MODULES = ("vision_tower", "projector", "language_model")


def records(n: int, folder) -> list:
    made = []
    for i in range(n):
        image = Image.new("RGB", (224, 224), "white")
        ImageDraw.Draw(image).ellipse((20 + 7 * i, 30, 120 + 5 * i, 150), fill=("red", "blue", "green")[i % 3])
        path = folder / f"{i}.png"
        image.save(path)
        turns = [{"role": "user", "content": "<image>\nWhat colour is the circle, and where is it?"},
                 {"role": "assistant", "content": f"It is {('red', 'blue', 'green')[i % 3]}, near the top left."}]
        made.append(normalise({"id": str(i), "images": [str(path)], "conversations": turns}, folder))
    return made


def base_of(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per setting")
    args = parser.parse_args()
    started = time.perf_counter()
    torch.manual_seed(0)
    import tempfile
    from pathlib import Path

    folder = Path(tempfile.mkdtemp(prefix="vlmkit-bench-"))
    cfg = load_config("default", [f"train.output_dir={folder / 'run'}", "train.lm_start=0", "train.bf16=false"])
    batch_records = records(8, folder)
    model, processor, rates = prepare_model(cfg, batch_records, None, log=lambda *a: None)
    apply_learning_rates(model, rates)
    dataset = ConversationDataset(batch_records, processor, max_length=1024)
    batch = PackedCollator(processor.tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])
    tokens = int(batch["input_ids"].numel())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    vlm = base_of(model)
    cache = vlm.feature_cache
    model.train()

    def step():
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    forward_seconds = {name: 0.0 for name in MODULES}
    starts = {}
    for name in MODULES:
        module = getattr(vlm, name)
        module.register_forward_pre_hook(lambda m, a, name=name: starts.__setitem__(name, time.perf_counter()))
        module.register_forward_hook(lambda m, a, o, name=name: forward_seconds.__setitem__(
            name, forward_seconds[name] + time.perf_counter() - starts[name]))

    peak = common.matmul_peak("cpu", torch.float32, 2048)
    report = {"machine": common.machine(), "samples": len(dataset), "tokens_per_step": tokens,
              "fp32_matmul_peak_gflops": peak / 1e9, "settings": {}}
    for setting, use_cache in (("first epoch (every image encoded)", False), ("later epochs (features cached)", True)):
        vlm.feature_cache = cache if use_cache else None
        step()  # warm-up (and, with the cache, the features of every image stored)
        with FlopCounterMode(display=False) as counter:
            step()
        flops = counter.get_total_flops()
        counts = counter.get_flop_counts()  # keyed by module path, e.g. "PeftModel.base_model.model.projector"
        per_module = {name: max((sum(ops.values()) for key, ops in counts.items() if key.endswith(f".{name}")),
                                default=0) for name in MODULES}
        for name in MODULES:
            forward_seconds[name] = 0.0
        began = time.perf_counter()
        for _ in range(args.steps):
            step()
        seconds = (time.perf_counter() - began) / args.steps
        report["settings"][setting] = {
            "step_s": seconds, "samples_per_s": len(dataset) / seconds, "tokens_per_s": tokens / seconds,
            "gflops_per_step": flops / 1e9, "mfu": flops / seconds / peak,
            "flops_share": {name: value / flops for name, value in per_module.items()},
            "forward_share_of_step": {name: value / args.steps / seconds for name, value in forward_seconds.items()},
        }
    report["seconds"] = time.perf_counter() - started
    print(f"default recipe step ({len(dataset)} samples, {tokens} tokens, float32) on {common.machine_line()}")
    print(f"float32 matmul peak {peak / 1e9:.1f} GFLOP/s")
    for setting, row in report["settings"].items():
        shares = ", ".join(f"{n} {row['flops_share'][n]:.0%}" for n in MODULES)
        times = ", ".join(f"{n} {row['forward_share_of_step'][n]:.0%}" for n in MODULES)
        print(f"  {setting}: {row['step_s']:.2f} s/step, {row['samples_per_s']:.2f} samples/s, "
              f"{row['tokens_per_s']:.0f} tokens/s, MFU {row['mfu']:.2f}\n"
              f"    FLOPs: {row['gflops_per_step']:.0f} G a step ({shares}); forward time of the step: {times}")
    if args.out:
        common.write_json_atomic(args.out, report)


if __name__ == "__main__":
    main()
