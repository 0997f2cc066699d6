"""`make gpu-check`: the figures a GPU is lent for, in one script of at most about 8 minutes.

    PYTHONPATH=src python benchmarks/gpu_check.py --out runs/gpu_check.json     # on the GPU machine
    python benchmarks/gpu_check.py --dry-run                                    # tiny shapes, any CPU

It needs a stock CUDA PyTorch with transformers (and vlmkit's source on the path) and downloads
nothing: the models are random weights in the shapes of the default composition, since the
pretrained checkpoints are too large to carry along. It measures, and writes as one JSON:

- the bf16 and float32 matmul peaks (the best of five 8192^3 products);
- training MFU in bf16 of the default composition's shapes (DINOv2-small at 224 px, 256 image
  tokens, an MLP projector, SmolLM2-135M; the tower frozen, as the default recipe has it) and of
  a 0.4B-parameter Llama alone; FLOPs counted by torch's FlopCounterMode over one step, so every
  module's work is in, over the bf16 peak;
- greedy generation throughput of the composition at batch 1 and 32 (one image each);
- exact search of 1,000 queries over 1,000,000 pages of 256 dimensions (vlmkit's
  `search_topk`), against the float32 peak.

`--dry-run` runs every part on tiny shapes on the CPU in seconds; `make test` runs it, so the
script cannot rot between the rare times a GPU is available.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from vlmkit.eval.exact_search import search_topk
from vlmkit.model.configuration import VLMConfig
from vlmkit.model.modeling import VLMForConditionalGeneration

# (full size, dry run)
DINOV2_SMALL = ({"model_type": "dinov2", "hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6,
                 "intermediate_size": 1536, "patch_size": 14, "image_size": 224},
                {"model_type": "dinov2", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                 "intermediate_size": 64, "patch_size": 14, "image_size": 56})
SMOLLM2_135M = ({"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                 "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True,
                 "max_position_embeddings": 2048},
                {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                 "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 512, "tie_word_embeddings": True,
                 "max_position_embeddings": 512})
LLAMA_04B = ({"model_type": "llama", "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
              "num_attention_heads": 16, "num_key_value_heads": 8, "vocab_size": 49152, "tie_word_embeddings": True,
              "max_position_embeddings": 2048},
             {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 512})
# batch, text tokens per sample, timed steps; generation: new tokens; search: queries, pages, dims
SIZES = ({"batch": 16, "text": 256, "steps": 10, "llm_batch": 8, "llm_seq": 1024, "new_tokens": 64,
          "search": (1000, 1_000_000, 256), "matmul": 8192},
         {"batch": 2, "text": 16, "steps": 2, "llm_batch": 2, "llm_seq": 32, "new_tokens": 4,
          "search": (10, 2000, 32), "matmul": 256})


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: str, dtype: torch.dtype, n: int) -> float:
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    torch.mm(a, b)
    best = float("inf")
    for _ in range(5):
        sync(device)
        start = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def composition(dry: bool, device: str) -> VLMForConditionalGeneration:
    text = dict(SMOLLM2_135M[dry])
    vision_config = AutoConfig.for_model(**DINOV2_SMALL[dry])
    text_config = AutoConfig.for_model(**text)
    model = VLMForConditionalGeneration(
        VLMConfig(vision_config=vision_config, text_config=text_config, projector_type="mlp",
                  vision_feature_layer=-2, image_token_id=text["vocab_size"] - 1),
        vision_tower=AutoModel.from_config(vision_config), language_model=AutoModelForCausalLM.from_config(text_config))
    return model.to(device)


def vlm_inputs(model, batch: int, text: int, device: str) -> dict:
    side = model.config.vision_config.image_size
    tokens_per_image = (side // model.config.vision_config.patch_size) ** 2
    ids = torch.randint(0, model.config.text_config.vocab_size - 1, (batch, tokens_per_image + text), device=device)
    ids[:, :tokens_per_image] = model.config.image_token_id
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(),
            "pixel_values": torch.randn(batch, 3, side, side, device=device)}


def train_mfu(model, inputs: dict, steps: int, device: str, peak: float, trainable) -> dict:
    """Step time and MFU of bf16-autocast training (AdamW on `trainable`), FLOPs counted over one step."""
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16)

    def step():
        with autocast:
            loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    model.train()
    step()  # warm-up: kernels chosen, optimizer state made
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    seconds = (time.perf_counter() - start) / steps
    tokens = inputs["input_ids"].numel()
    return {"step_s": seconds, "tokens_per_s": tokens / seconds, "tflops": flops / seconds / 1e12,
            "mfu": flops / seconds / peak}


def generation(model, batch: int, new_tokens: int, device: str) -> dict:
    model.eval()
    inputs = vlm_inputs(model, batch, 8, device)
    del inputs["labels"]
    with torch.no_grad(), torch.autocast(device_type=device, dtype=torch.bfloat16):
        model.generate(**inputs, max_new_tokens=2, do_sample=False, min_new_tokens=2)  # warm-up
        sync(device)
        start = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        sync(device)
    seconds = time.perf_counter() - start
    made = (out.shape[1] - inputs["input_ids"].shape[1]) * batch
    return {"batch": batch, "new_tokens": made, "seconds": seconds, "tokens_per_s": made / seconds}


def search(queries: int, pages: int, dims: int, device: str, peak: float) -> dict:
    q = torch.nn.functional.normalize(torch.randn(queries, dims, device=device), dim=-1)
    d = torch.nn.functional.normalize(torch.randn(pages, dims, device=device), dim=-1)
    search_topk(q[:2], d[:1000], 10)  # warm-up
    sync(device)
    start = time.perf_counter()
    search_topk(q, d, 10)
    sync(device)
    seconds = time.perf_counter() - start
    return {"queries": queries, "pages": pages, "dims": dims, "seconds": seconds,
            "queries_per_s": queries / seconds, "share_of_fp32_peak": 2 * queries * pages * dims / seconds / peak}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on whatever device there is")
    parser.add_argument("--out", type=Path, help="write the results here as JSON")
    args = parser.parse_args(argv)
    dry = args.dry_run
    device = "cuda" if torch.cuda.is_available() and not dry else "cpu"
    sizes = SIZES[dry]
    torch.manual_seed(0)
    started = time.perf_counter()
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "dry_run": dry,
              "torch": torch.__version__}
    peaks = {name: matmul_peak(device, dtype, sizes["matmul"])
             for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32))}
    report["matmul_peak_tflops"] = {name: peak / 1e12 for name, peak in peaks.items()}

    model = composition(dry, device)
    model.vision_tower.requires_grad_(False)  # frozen, as the default recipe has it
    trainable = [p for p in model.parameters() if p.requires_grad]
    report["train_composition"] = train_mfu(model, vlm_inputs(model, sizes["batch"], sizes["text"], device),
                                            sizes["steps"], device, peaks["bf16"], trainable)
    report["generation"] = [generation(model, batch, sizes["new_tokens"], device) for batch in (1, 32)]
    del model
    lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(**LLAMA_04B[dry])).to(device)
    ids = torch.randint(0, lm.config.vocab_size, (sizes["llm_batch"], sizes["llm_seq"]), device=device)
    report["train_llama_0.4b"] = {"parameters": lm.num_parameters(), **train_mfu(
        lm, {"input_ids": ids, "labels": ids}, sizes["steps"], device, peaks["bf16"], list(lm.parameters()))}
    del lm
    report["search"] = search(*sizes["search"], device, peaks["fp32"])
    report["seconds"] = time.perf_counter() - started

    composition_row, llama_row = report["train_composition"], report["train_llama_0.4b"]
    print(f"gpu-check on {report['device']}{' (dry run)' if dry else ''}: {report['seconds']:.0f} s")
    print(f"  matmul peak           bf16 {peaks['bf16'] / 1e12:.1f} TFLOP/s, fp32 {peaks['fp32'] / 1e12:.1f}")
    print(f"  train, composition    MFU {composition_row['mfu']:.1%}, {composition_row['tokens_per_s']:,.0f} tokens/s")
    print(f"  train, Llama 0.4B     MFU {llama_row['mfu']:.1%}, {llama_row['tokens_per_s']:,.0f} tokens/s")
    for row in report["generation"]:
        print(f"  generate, batch {row['batch']:<3}   {row['tokens_per_s']:,.0f} tokens/s")
    print(f"  search                {report['search']['queries_per_s']:,.0f} queries/s, "
          f"{report['search']['share_of_fp32_peak']:.0%} of the fp32 peak")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
