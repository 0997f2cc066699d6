"""Generation speed: prefill time and decode tokens/s, against the LLaVA export and against no KV cache.

    python benchmarks/generation.py [--small] [--model tiny] [--new-tokens 64]

The model is built as `vlmkit train` builds it (random weights, tokenizer trained on the
built-in data; speed does not depend on the weights). The same weights are exported with
`vlmkit export --format llava` and loaded as transformers' LlavaForConditionalGeneration;
both get the same input ids and pixels. Greedy decoding, exactly `--new-tokens` tokens
(min_new_tokens = max_new_tokens, as random weights would stop anywhere). With t(n) the
median time of `generate` for n new tokens over 5 runs (2 with --small):

- prefill = t(1): encoding the image and the prompt, and the first token;
- decode tokens/s = batch x (n - 1) / (t(n) - t(1)): the later tokens alone;
- at batch 1 and 8 (8 prompts of the same length, different images), with the KV cache
  (vlmkit, LLaVA) and without it (vlmkit, use_cache=False: every step re-encodes everything).

The three must generate the same tokens; the script checks it and reports it. On a GPU
the `gpu` model runs in bfloat16. Expected time here: about 20 s full size, 15 s small.
"""

from __future__ import annotations

import tempfile
import time

import common
import torch
from PIL import Image
from train_throughput import DATA_RECORDS, build_for_training
from transformers import LlavaForConditionalGeneration

from vlmkit.processing.markers import IMAGE_MARKER
from vlmkit.export.llava import save_llava

QUESTION = "Describe the picture."


def prompt_batch(processor, collator, records, size: int, dev: str) -> dict:
    """`size` one-image prompts of equal length (so no padding), each with its own image."""
    images = [Image.open(r.images[0]) for r in records if len(r.images) == 1][:size]
    messages = [{"role": "user", "content": f"{IMAGE_MARKER}\n{QUESTION}"}]
    items = [processor.encode_conversation(messages, [image], add_generation_prompt=True) for image in images]
    batch = collator(items)
    del batch["labels"]
    return {k: v.to(dev) for k, v in batch.items()}


def measure(model, inputs: dict, new_tokens: int, use_cache: bool, repeats: int, pad: int) -> dict:
    """Prefill time, decode tokens/s and the generated tokens of one model on one batch."""
    outputs = {}

    def generate(n: int) -> None:
        with torch.no_grad():
            outputs[n] = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                        use_cache=use_cache, pad_token_id=pad)

    first = common.timed(lambda: generate(1), warmup=1, repeats=repeats)["median_s"]
    full = common.timed(lambda: generate(new_tokens), warmup=0, repeats=repeats)["median_s"]
    batch, prompt = inputs["input_ids"].shape
    return {"prefill_s": first, "total_s": full, "decode_tokens_per_s": batch * (new_tokens - 1) / (full - first),
            "tokens": outputs[new_tokens][:, prompt:].cpu()}


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--model", help="tiny (default on a CPU) or another name of train_throughput.MODELS")
    parser.add_argument("--new-tokens", type=int, help="tokens generated per prompt (default 64, small 16)")
    args = parser.parse_args()
    started = time.perf_counter()
    dev = common.device()
    name = args.model or ("gpu" if dev == "cuda" else "tiny")
    new_tokens = args.new_tokens or (16 if args.small else 64)
    repeats = 2 if args.small else 5  # the median of 5 in full size

    model, dataset, collator = build_for_training(name, common.synth_train_data(DATA_RECORDS))
    processor, pad = dataset.processor, dataset.processor.tokenizer.pad_token_id
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    model = model.to(dev, dtype).eval()
    with tempfile.TemporaryDirectory(prefix="vlmkit-llava-") as tmp:
        save_llava(model, processor, tmp)  # what `vlmkit export --format llava` writes
        llava = LlavaForConditionalGeneration.from_pretrained(tmp, dtype=dtype).to(dev).eval()
    records = [e.record for e in dataset.examples]

    entries = []
    for batch in (1, 8):
        inputs = prompt_batch(processor, collator, records, batch, dev)
        runs = {"vlmkit": measure(model, inputs, new_tokens, True, repeats, pad),
                "llava": measure(llava, inputs, new_tokens, True, repeats, pad),
                "no_cache": measure(model, inputs, new_tokens, False, repeats, pad)}
        same = {k: bool(torch.equal(runs["vlmkit"]["tokens"], r["tokens"])) for k, r in runs.items() if k != "vlmkit"}
        print(f"batch {batch}: same tokens as vlmkit with cache: {same}", flush=True)
        details = {"model": name, "batch": batch, "prompt_tokens": inputs["input_ids"].shape[1],
                   "new_tokens": new_tokens, "same_tokens": same}
        note = "" if all(same.values()) else f"generated tokens differ: {same}"
        ours, exported, no_cache = runs["vlmkit"], runs["llava"], runs["no_cache"]
        entries += [
            common.entry(f"generate {name} b{batch} prefill", ours["prefill_s"] * 1e3, "ms",
                         exported["prefill_s"] * 1e3, "LLaVA export, ms", note=note, **details),
            common.entry(f"generate {name} b{batch} decode", ours["decode_tokens_per_s"], "tokens/s",
                         exported["decode_tokens_per_s"], "LLaVA export, tokens/s", note=note, **details),
            common.entry(f"generate {name} b{batch} decode, KV cache vs none", ours["decode_tokens_per_s"], "tokens/s",
                         no_cache["decode_tokens_per_s"], "use_cache=False, tokens/s", note=note, **details),
        ]
    common.save_entries(args.out, entries, started)


if __name__ == "__main__":
    main()
