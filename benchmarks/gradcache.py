"""GradCache: peak memory and step time for global batches of 8 to 1024 at a fixed micro-batch.

    python benchmarks/gradcache.py [--small] [--micro 8] [--batches 8,16,...,1024] [--plain-max N]

The retriever-tiny recipe (as retrieval_gradcache_memory.py builds it: random weights, the
built-in pages at 64 px) takes one contrastive step (InfoNCE over in-batch negatives) on a
global batch of B queries and B pages: a GradCache step with micro-batches of `--micro`,
and a plain step that back-propagates the whole batch at once, where it fits: it is skipped
(and the entry says so) when the last plain step's own memory, scaled to B, would pass 80%
of the memory available (and above `--plain-max`).

Memory is the resident-set high-water mark (VmHWM, what getrusage's ru_maxrss reports) of
a fresh process per setting, since one process's peak never comes down. It is what the
operating system has to provide (allocator caches and fragmentation included), where the
exact tensor-byte tracking of retrieval_gradcache_memory.py counts tensors only, and
tracemalloc sees no torch memory at all. Two figures per setting: the whole process's
peak (Python, torch, model and inputs included) and the step's own: its peak above the
memory in use just before it (the high-water mark is reset there). On a GPU both come from
the CUDA allocator instead (every live tensor, and the step's peak above those before it).
Target: GradCache at 1024 within 1.3x of the peak of one plain micro-batch step
(whole-process figures). Step time: median of two steps (one from B = 256).
Expected time here: about 4 minutes full size, 1 minute small.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import common
import torch


def child(job: dict) -> dict:
    """One step kind at one global batch, in this fresh process."""
    from retrieval_gradcache_memory import batch, setup

    dev = common.device()
    model, processor, plain, cached = setup(dev, job["micro"])
    inputs = batch(model, processor, job["batch"], job["size"], dev)
    plain(batch(model, processor, job["micro"], job["size"], dev))  # warm-up; leaves .grad allocated, as in training
    step = cached if job["mode"] == "gradcache" else plain
    setup_peak, before = common.peak_rss_mib(), common.rss_mib()
    common.reset_peak_rss()
    if dev == "cuda":  # the GPU's figures: the CUDA allocator's, every live tensor included
        before = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
    timing = common.timed(lambda: step(inputs), warmup=0, repeats=job["repeats"])
    step_peak = torch.cuda.max_memory_allocated() / 2**20 if dev == "cuda" else common.peak_rss_mib()
    peak = step_peak if dev == "cuda" else max(setup_peak, step_peak)
    return {**job, **timing, "peak_mib": peak, "before_step_mib": before, "step_extra_mib": step_peak - before}


def available_mib() -> float:
    """Memory a new setting may use: free GPU memory, or the system's MemAvailable."""
    if torch.cuda.is_available():
        return torch.cuda.mem_get_info()[0] / 2**20
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**10
    return float("inf")


def plain_skip(results: list[dict], size: int, plain_max: int) -> str:
    """Why a plain step of `size` is not run ("" if it is): above --plain-max, or it would not fit.

    Its memory is scaled from the last plain step: the step's own part grows with the batch,
    the rest of the process hardly does; over 80% of the memory available, it is not run.
    """
    if size > plain_max:
        return f"plain steps only up to --plain-max {plain_max}"
    last = next((r for r in reversed(results) if r["mode"] == "plain"), None)
    need = last["before_step_mib"] + last["step_extra_mib"] * size / last["batch"] if last else 0
    if need > 0.8 * available_mib():
        return f"plain step not run: about {need:.0f} MiB needed, {available_mib():.0f} available"
    return ""


def run_setting(mode: str, size: int, args) -> dict:
    job = {"mode": mode, "batch": size, "micro": args.micro, "size": args.size, "repeats": 1 if size >= 256 else 2}
    code, output, seconds = common.run_python([__file__, "--child", json.dumps(job)], timeout=1200)
    if code != 0:
        raise RuntimeError(f"{mode} batch {size} failed:\n{output[-3000:]}")
    r = common.child_result(output)
    print(f"{mode} {size}: peak {r['peak_mib']:.0f} MiB (step {r['step_extra_mib']:.0f}), "
          f"{r['median_s']:.2f} s/step ({seconds:.0f} s)", flush=True)
    return r


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, style in (("gradcache", "o-"), ("plain", "s--")):
        rows = [r for r in results if r["mode"] == mode]
        xs = [r["batch"] for r in rows]
        ax.plot(xs, [r["peak_mib"] for r in rows], style, label=f"{mode}: process peak")
        ax.plot(xs, [r["step_extra_mib"] for r in rows], style, alpha=0.5, label=f"{mode}: step's own")
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel(f"global batch (micro-batch {results[0]['micro']})")
    ax.set_ylabel("peak memory (MiB): " + ("CUDA allocated" if common.device() == "cuda" else "resident set"))
    ax.set_title(f"GradCache memory ({common.machine_line()})", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = common.parser(__doc__, child_jobs=True)
    parser.add_argument("--micro", type=int, default=8)
    parser.add_argument("--batches", help="global batches (default 8,16,...,1024; small 8,32,128)")
    parser.add_argument("--plain-max", type=int, help="largest batch for plain steps (default: all that fit; small 32)")
    parser.add_argument("--size", type=int, default=64, help="page image side in pixels")
    parser.add_argument("--plot", type=Path, default=common.OUT_DIR / "bench_gradcache_memory.png")
    args = parser.parse_args()
    if common.ran_child(args, child):
        return
    started = time.perf_counter()
    batches = [int(b) for b in args.batches.split(",")] if args.batches else \
        ([8, 32, 128] if args.small else [8 * 2**i for i in range(8)])
    plain_max = args.plain_max or (32 if args.small else max(batches))

    results, not_run = [], {}
    for mode in ("plain", "gradcache"):
        for size in batches:
            why = plain_skip(results, size, plain_max) if mode == "plain" else ""
            if why:
                not_run[size] = why
                continue
            results.append(run_setting(mode, size, args))
    plain = {r["batch"]: r for r in results if r["mode"] == "plain"}
    micro_step = plain.get(args.micro)
    entries = []
    for r in (r for r in results if r["mode"] == "gradcache"):
        same = plain.get(r["batch"])
        details = {k: r[k] for k in ("micro", "before_step_mib", "step_extra_mib", "times_s")}
        entries += [
            common.entry(f"gradcache b{r['batch']} peak memory", r["peak_mib"], "MiB", same and same["peak_mib"],
                         "plain step, same batch, MiB", note=not_run.get(r["batch"], ""),
                         plain_step_extra_mib=same and same["step_extra_mib"], **details),
            common.entry(f"gradcache b{r['batch']} step time", r["median_s"], "s", same and same["median_s"],
                         "plain step, same batch, s"),
        ]
    largest = max((r for r in results if r["mode"] == "gradcache"), key=lambda r: r["batch"])
    if micro_step:
        entries.append(common.entry(
            f"gradcache b{largest['batch']} vs one micro-batch step", largest["peak_mib"], "MiB",
            micro_step["peak_mib"], f"plain step of {args.micro}, MiB", target_max=1.3,
            step_extra_mib=largest["step_extra_mib"], micro_step_extra_mib=micro_step["step_extra_mib"]))
    plot(results, args.plot)
    common.save_entries(args.out, entries, started)


if __name__ == "__main__":
    main()
