"""Latency and throughput of `vlmkit serve` on this machine, and what `--quantize int8` changes.

    python benchmarks/serve_latency.py --model runs/demo/model                 # float32
    python benchmarks/serve_latency.py --model runs/demo/model --quantize int8
    python benchmarks/serve_latency.py --model runs/demo/model --accuracy data/synth/test.jsonl

Everything goes through the real HTTP API (uvicorn on 127.0.0.1, in this process) with the
official openai client, streaming, so the time to the first token is seen as a client sees it:

- single request, repeated: time to first token, total latency, decode tokens/s (medians);
- N concurrent requests (default 8): wall time and completion tokens per second overall.

Without --model, the model of `make demo` before training is built from
configs/demo-align.yaml: the pretrained DINOv2-small and SmolLM2-135M-Instruct (as `vlmkit
models fetch` stores them) joined by a new MLP projector. It runs at the trained model's
speed, but its answers mean nothing, and they are as long as SmolLM2 makes them, up to
--max-tokens. `--accuracy` scores float32 and int8 on a test split with `vlmkit.eval.vqa` and
reports the change.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from vlmkit.serve.api import background_server, create_app
from vlmkit.serve.generation import load_for_inference
from vlmkit.serve.quantize import quantize

QUESTION = "Describe the picture."


def untrained_demo_model(out: Path) -> Path:
    """`make demo`'s model before training (demo-align.yaml: pretrained parts, a new projector), saved to `out`."""
    from vlmkit.config import load_config
    from vlmkit.model.build import build

    cfg = load_config("demo-align", []).model
    torch.manual_seed(0)
    words = "a red circle left of a blue square above the small green triangle with text".split()
    built = build(cfg, training_texts=lambda: [" ".join(words[i:] + words[:i]) for i in range(len(words))] * 20)
    built.model.save_pretrained(out)
    built.processor.save_pretrained(out)
    return out


def scene_data_url(seed: int) -> str:
    """A small scene of coloured shapes, as a data: URL."""
    image = Image.new("RGB", (64, 64), "white")
    draw = ImageDraw.Draw(image)
    colours = ["red", "green", "blue", "orange", "purple"]
    for i in range(3):
        x, y = (seed * 17 + i * 23) % 44, (seed * 29 + i * 13) % 44
        draw.ellipse((x, y, x + 18, y + 18), fill=colours[(seed + i) % len(colours)])
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def one_request(client, name: str, seed: int, max_tokens: int) -> dict:
    """Stream one request; returns its timings and token count."""
    content = [{"type": "image_url", "image_url": {"url": scene_data_url(seed)}}, {"type": "text", "text": QUESTION}]
    start = time.perf_counter()
    first, tokens = None, 0
    stream = client.chat.completions.create(model=name, messages=[{"role": "user", "content": content}],
                                            temperature=0, max_tokens=max_tokens, stream=True,
                                            stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.perf_counter()
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    first = first or end
    return {"ttft": first - start, "latency": end - start, "tokens": tokens,
            "decode_tokens_per_s": (tokens - 1) / (end - first) if tokens > 1 and end > first else None}


def measure(model_dir: Path, quantize_mode: str | None, repeats: int, concurrent: int, max_tokens: int) -> dict:
    import openai

    model, processor = load_for_inference(model_dir, device="cpu")
    model = quantize(model, quantize_mode)
    app = create_app(model, processor, "bench")
    with background_server(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
        one_request(client, "bench", 0, max_tokens)  # warm-up: first calls pay one-off costs
        single = [one_request(client, "bench", i, max_tokens) for i in range(repeats)]
        start = time.perf_counter()
        with ThreadPoolExecutor(concurrent) as pool:
            batch = list(pool.map(lambda i: one_request(client, "bench", i, max_tokens), range(concurrent)))
        wall = time.perf_counter() - start
    speeds = [r["decode_tokens_per_s"] for r in single if r["decode_tokens_per_s"]]
    return {
        "quantize": quantize_mode or "none",
        "single": {"ttft_s": statistics.median(r["ttft"] for r in single),
                   "latency_s": statistics.median(r["latency"] for r in single),
                   "completion_tokens": statistics.median(r["tokens"] for r in single),
                   "decode_tokens_per_s": statistics.median(speeds) if speeds else None},
        "concurrent": {"requests": concurrent, "wall_s": wall, "completion_tokens": sum(r["tokens"] for r in batch),
                       "tokens_per_s": sum(r["tokens"] for r in batch) / wall,
                       "requests_per_s": concurrent / wall,
                       "mean_latency_s": statistics.mean(r["latency"] for r in batch)},
    }


def accuracy(model_dir: Path, data: Path, limit: int | None) -> dict:
    """Exact-match accuracy of float32 and int8 on `data`, and how often their answers agree."""
    from vlmkit.data.records import read_records
    from vlmkit.eval.vqa import evaluate

    records = read_records(data)[0][:limit] if limit else read_records(data)[0]
    results = {}
    for mode in (None, "int8"):
        model, processor = load_for_inference(model_dir, device="cpu")
        start = time.perf_counter()
        metrics, rows = evaluate(quantize(model, mode), processor, records, progress=False)
        results[mode or "float32"] = {"accuracy": metrics["accuracy"], "n": metrics["n"],
                                      "eval_s": time.perf_counter() - start, "rows": rows}
    pairs = zip(results["float32"]["rows"], results["int8"]["rows"], strict=True)
    same = sum(a["prediction"] == b["prediction"] for a, b in pairs)
    for result in results.values():
        del result["rows"]
    return results | {"change": results["int8"]["accuracy"] - results["float32"]["accuracy"],
                      "same_answer": same / max(1, results["float32"]["n"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="saved model (default: make demo's composition untrained: pretrained DINOv2-small and SmolLM2, a new projector)")
    parser.add_argument("--quantize", choices=["int8"], help="measure int8 too, beside float32")
    parser.add_argument("--repeats", type=int, default=5, help="single requests to take the median of")
    parser.add_argument("--concurrent", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--accuracy", type=Path, help="a JSONL test split: score float32 vs int8 on it")
    parser.add_argument("--limit", type=int, help="with --accuracy: only the first N records")
    parser.add_argument("--out", type=Path, help="also write the results here as JSON")
    args = parser.parse_args()

    model_dir = args.model or untrained_demo_model(Path(tempfile.mkdtemp(prefix="vlmkit-bench-")))
    report = {"model": str(args.model or "make demo's composition, untrained projector"), "torch_threads": torch.get_num_threads()}
    if args.accuracy:
        report["accuracy"] = accuracy(model_dir, args.accuracy, args.limit)
    else:
        modes = [None, "int8"] if args.quantize else [None]
        report["runs"] = [measure(model_dir, m, args.repeats, args.concurrent, args.max_tokens) for m in modes]
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
