"""Load on `vlmkit serve`: N concurrent clients, with continuous batching on and off, in one run.

    python benchmarks/serve_load.py                          # make demo's composition, untrained projector
    python benchmarks/serve_load.py --model runs/demo/model --clients 1 4 8 32 --rounds 2

Each of N clients (threads with the official `openai` client, streaming) sends `--rounds`
greedy image questions one after another, each with its own picture. The server is `vlmkit
serve` in a process of its own on 127.0.0.1 (so the clients' Python does not share its
interpreter), started afresh for each setting and warmed up with one request. For each setting
(`--max-batch 32`, then `--max-batch 1`, one reply at a time) and each N it prints aggregate
completion tokens/s, time to first token (median) and latency (median, p95), and writes them
as JSON with `--out`. The ratio of the two settings is the figure to read; absolute figures
depend on the host, and are taken under load if anything else runs.

Without --model, the model is `make demo`'s composition before training (see
serve_latency.py): it runs at the trained model's speed, and its answers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx

from serve_latency import one_request, untrained_demo_model


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


@contextmanager
def server(command: list[str], port: int):
    """A server command in a process of its own; yields its base URL once `/v1/models` answers."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://localhost:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if process.poll() is not None:
                raise SystemExit(f"{' '.join(command[:3])} stopped: {process.stderr.read()[-2000:]}")
            try:
                if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"{' '.join(command[:3])} did not answer within 300 s")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=60)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def vlmkit_serve(model_dir: Path, max_batch: int):
    port = free_port()
    return server([sys.executable, "-m", "vlmkit", "serve", "--model", str(model_dir), "--port", str(port),
                   "--served-model-name", "bench", "--max-batch", str(max_batch)], port)


def transformers_serve(export_dir: Path):
    """transformers' own server on the LLaVA export (its model id is the folder's path)."""
    port = free_port()
    return server([str(Path(sys.executable).with_name("transformers")), "serve", str(export_dir), "--port",
                   str(port)], port)


def load(url: str, clients: int, rounds: int, max_tokens: int, model: str = "bench") -> dict:
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=1200)

    def session(c: int) -> list[dict]:
        return [one_request(client, model, 1000 * c + r, max_tokens) for r in range(rounds)]

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for rows in pool.map(session, range(clients)) for r in rows]
    wall = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in results)
    return {"clients": clients, "requests": len(results), "wall_s": round(wall, 2),
            "completion_tokens": tokens, "tokens_per_s": round(tokens / wall, 1),
            "ttft_median_s": round(statistics.median(r["ttft"] for r in results), 3),
            "latency_median_s": round(statistics.median(r["latency"] for r in results), 3),
            "latency_p95_s": round(percentile([r["latency"] for r in results], 0.95), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="saved model (default: make demo's composition, untrained)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 32])
    parser.add_argument("--rounds", type=int, default=2, help="requests each client sends, one after another")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, nargs="+", default=[32, 1], help="server settings to compare")
    parser.add_argument("--transformers-serve", action="store_true",
                        help="also `transformers serve` on the model's LLaVA export, as a reference")
    parser.add_argument("--out", type=Path, help="also write the results here as JSON")
    args = parser.parse_args()

    model_dir = args.model or untrained_demo_model(Path(tempfile.mkdtemp(prefix="vlmkit-bench-")))
    report = {"model": str(args.model or "make demo's composition, untrained projector"),
              "max_tokens": args.max_tokens, "runs": []}
    servers = [(f"vlmkit --max-batch {n}", lambda n=n: vlmkit_serve(model_dir, n), "bench") for n in args.max_batch]
    if args.transformers_serve:
        from vlmkit.export.llava import save_llava
        from vlmkit.serve.generation import load_for_inference

        export = save_llava(*load_for_inference(model_dir, device="cpu"), Path(tempfile.mkdtemp()) / "llava")
        servers.append(("transformers serve", lambda: transformers_serve(export), str(export)))
    for name, start, model in servers:
        with start() as url:
            load(url, 1, 1, args.max_tokens, model)  # warm-up: first calls pay one-off costs
            for clients in args.clients:
                row = {"server": name, **load(url, clients, args.rounds, args.max_tokens, model)}
                report["runs"].append(row)
                print(json.dumps(row), flush=True)
    print(f"\n{'server':<22}  clients  tokens/s  TTFT median  latency median  p95")
    for row in report["runs"]:
        print(f"{row['server']:<22}  {row['clients']:>7}  {row['tokens_per_s']:>8}  {row['ttft_median_s']:>11}"
              f"  {row['latency_median_s']:>14}  {row['latency_p95_s']:>5}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
