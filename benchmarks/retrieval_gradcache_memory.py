"""Peak memory of a GradCache step with a global batch 64x the micro-batch, against one plain micro-batch step.

    python benchmarks/retrieval_gradcache_memory.py [--micro 8] [--factor 64] [--size 64]

Memory is that of tensors allocated during the step (activations, gradients, cached
representations, the score matrix), measured exactly: on a GPU by the CUDA allocator's
peak, on a CPU by a dispatch mode that follows every tensor storage the step creates and
frees. Parameters and the input batch, which exist before the step, are reported apart.
The model is the `retriever-tiny` recipe (random weights: memory does not depend on them).
"""

from __future__ import annotations

import argparse
import io
import random
import time
from importlib import resources

import torch
from PIL import Image
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from vlmkit.data.synth_docs import ALL_KEYS, query, render_page
from vlmkit.model.retriever import encode_inputs
from vlmkit.train.contrastive import info_nce, model_inputs
from vlmkit.train.gradcache import grad_cache_step
from vlmkit.config import load_retriever_config
from vlmkit.train.retrieval import build_retriever


class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of live tensor storages created while the mode is active (CPU or GPU)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # A view or an in-place result shares an argument's storage: it allocated nothing.
        used = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            if storage.data_ptr() not in self.live and storage.data_ptr() not in used:
                self.live[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


def measure(step, device: str) -> int:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    with PeakTensorMemory() as tracker:
        step()
    return tracker.peak


def batch(model, processor, n: int, size: int, device: str) -> dict:
    keys = [ALL_KEYS[i % len(ALL_KEYS)] for i in range(n)]
    images = [Image.open(io.BytesIO(_png(render_page(k, i, size)))) for i, k in enumerate(keys)]
    rng = random.Random(0)
    texts = [f"{query(k, rng)} #{i}" for i, k in enumerate(keys)]  # distinct queries, as a real batch has
    out = {"query": encode_inputs(processor, model.config, queries=texts),
           "doc": encode_inputs(processor, model.config, images=images)}
    return {t: {k: v.to(device) for k, v in model_inputs(b).items()} for t, b in out.items()}


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def setup(device: str, micro: int):
    """The retriever-tiny model in training mode, with its plain step and its GradCache step."""
    config = resources.files("vlmkit").joinpath("configs/retriever-tiny.yaml")
    cfg = load_retriever_config(str(config), [])
    torch.manual_seed(0)
    model, processor, _ = build_retriever(cfg, lambda: [query(k, random.Random(0)) for k in ALL_KEYS])
    model = model.to(device).train()

    def loss_fn(reps):
        return info_nce(reps[0], reps[1], 0.05, reps[0].shape[0], reps[1].shape[0])

    def plain(inputs):
        reps = [model(**inputs[t]) for t in ("query", "doc")]
        loss_fn(reps).backward()

    def cached(inputs):
        grad_cache_step(lambda b: model(**b), [inputs["query"], inputs["doc"]], loss_fn, micro)

    return model, processor, plain, cached


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--micro", type=int, default=8)
    parser.add_argument("--factor", type=int, default=64)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, processor, plain, cached = setup(device, args.micro)
    small = batch(model, processor, args.micro, args.size, device)
    large = batch(model, processor, args.micro * args.factor, args.size, device)
    plain(small)  # warm-up; also leaves .grad allocated, as in training after the first step
    results = {}
    for name, step, inputs in (("plain micro-batch", plain, small), ("GradCache", cached, large)):
        start = time.perf_counter()
        results[name] = measure(lambda step=step, inputs=inputs: step(inputs), device)
        seconds = time.perf_counter() - start
        n_inputs = sum(v.numel() * v.element_size() for b in inputs.values() for v in b.values())
        print(f"{name:18s} batch {inputs['query']['input_ids'].shape[0]:5d}: peak step memory "
              f"{results[name] / 2**20:8.2f} MiB (inputs {n_inputs / 2**20:.2f} MiB), {seconds:.1f}s")
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"parameters {params / 2**20:.2f} MiB; device {device}")
    print(f"ratio GradCache / plain micro-batch step: {results['GradCache'] / results['plain micro-batch']:.3f}")


if __name__ == "__main__":
    main()
