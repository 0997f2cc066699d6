"""GradCache's step time against a plain step and plain gradient accumulation, on one model.

    python benchmarks/gradcache_overhead.py [--model tiny|pretrained] [--batch 256] [--micro 8] [--image-size 224]

`tiny`: the retriever-tiny recipe with random weights on 64-px built-in pages (as
retrieval_gradcache_memory.py builds it). `pretrained`: the retriever-pretrained recipe
(DINOv2-small + SmolLM2-135M from `vlmkit models fetch`, one view a page, 224 px or
`--image-size`: at 112 px a page is 16 tokens and a batch of 256 fits in 24 GB). One
contrastive step on B queries and B pages, three ways: the whole batch back-propagated at once
(plain), micro-batches back-propagated one after another (accumulation: what any split of the
batch costs), and GradCache. Best of 2 steps each. It separates what GradCache adds (an
extra forward pass without a graph) from what micro-batching costs a model whose matrix
products are too small to run fast at the micro-batch size.
"""

from __future__ import annotations

import argparse
import time

import torch
from retrieval_gradcache_memory import batch, setup

from vlmkit.config import load_retriever_config
from vlmkit.train.contrastive import info_nce
from vlmkit.train.gradcache import grad_cache_step, split_batch
from vlmkit.train.retrieval import build_retriever, freeze_by_learning_rate


def pretrained_model(image_size: int):
    cfg = load_retriever_config("retriever-pretrained", ["model.max_slices=1", f"model.image_size={image_size}",
                                                         f"model.crop_size={image_size}"])
    torch.manual_seed(0)
    model, processor, random_modules = build_retriever(cfg, lambda: ["a query"])
    # As `vlmkit retriever train` sets it up: the recipe's frozen encoder, its features cached.
    freeze_by_learning_rate(cfg, model, random_modules, log=lambda _: None)
    return model.train(), processor, cfg.retrieval.temperature


def best_seconds(step, cache=None, repeats: int = 2) -> float:
    times = []
    for _ in range(repeats):
        if cache is not None:
            cache.clear()  # every step sees new pages, as in a first epoch
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "pretrained"], default="tiny")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--micro", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224, help="pretrained: the page view's side in pixels")
    args = parser.parse_args()
    if args.model == "tiny":
        model, processor, _, _ = setup("cpu", args.micro)
        temperature, size = 0.05, 64
    else:
        (model, processor, temperature), size = pretrained_model(args.image_size), args.image_size
    inputs = batch(model, processor, args.batch, size, "cpu")

    def loss_fn(reps):
        return info_nce(reps[0], reps[1], temperature, reps[0].shape[0], reps[1].shape[0])

    def plain():
        loss_fn([model(**inputs[t]) for t in ("query", "doc")]).backward()

    def accumulation():
        for tower in ("query", "doc"):
            for micro in split_batch(inputs[tower], args.micro):
                model(**micro).sum().backward()

    def grad_cache():
        grad_cache_step(lambda b: model(**b), [inputs["query"], inputs["doc"]], loss_fn, args.micro)

    plain()  # warm-up; leaves .grad allocated, as in training
    cache = getattr(model.vlm, "feature_cache", None)
    seconds = {name: best_seconds(step, cache) for name, step in
               (("plain", plain), ("accumulation", accumulation), ("GradCache", grad_cache))}
    print(f"{args.model}, global batch {args.batch}, micro-batch {args.micro}:")
    for name, value in seconds.items():
        print(f"  {name:<13} {value:7.2f} s  {value / seconds['plain']:.2f}x plain")
    print(f"  GradCache / accumulation: {seconds['GradCache'] / seconds['accumulation']:.2f}")


if __name__ == "__main__":
    main()
