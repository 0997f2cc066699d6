"""500 requests, hostile ones mixed with valid ones, on `vlmkit serve` in a process of its own:
no 5xx, no hang, every valid request answered, no program started, and the server's memory
after them within 1.5x of its memory after the first 20 valid requests.
About 15 seconds on the tiny test model.
"""

from __future__ import annotations

import base64
import io
import json
import random
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.processing.helpers import EPS
from tests.serve.helpers import free_port, server_process

KEY = "load-test-key"


def png(size: tuple[int, int], mode: str = "RGB") -> str:
    buffer = io.BytesIO()
    Image.new(mode, size, "red" if mode == "RGB" else 0).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def chat(content, **fields) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 4} | fields


def image(data: str, kind: str = "png") -> dict:
    return {"type": "image_url", "image_url": {"url": f"data:image/{kind};base64,{data}"}}


def hostile_requests() -> list[tuple[str, dict | bytes, dict]]:
    """(kind, body, headers) of each hostile request: every kind once found to fail, plus a few more."""
    as_json = {"Content-Type": "application/json"}
    return [
        ("eps image", chat([image(base64.b64encode(EPS).decode()), {"type": "text", "text": "?"}]), {}),
        ("strip image", chat([image(png((4, 60_000), "1")), {"type": "text", "text": "?"}]), {}),
        ("not an image", chat([image(base64.b64encode(b"hello" * 40).decode()), {"type": "text", "text": "?"}]), {}),
        ("bad base64", chat([image("@@@not-base64@@@"), {"type": "text", "text": "?"}]), {}),
        ("http image url", chat([{"type": "image_url", "image_url": {"url": "http://169.254.169.254/"}}]), {}),
        ("form post", json.dumps(chat("hi")).encode(), {"Content-Type": "text/plain"}),
        ("nesting", ('{"model": "tiny", "messages": ' + "[" * 5000 + "]" * 5000 + "}").encode(), as_json),
        ("long number", ('{"model": "tiny", "messages": [], "max_tokens": ' + "9" * 5000 + "}").encode(), as_json),
        ("lone surrogate", b'{"model": "tiny", "messages": [{"role": "user", "content": "a\\ud800"}]}', as_json),
        ("long stop strings", chat("hi", stop=["x" * 240_000] * 4), {}),
        ("many stop strings", chat("hi", stop=["a", "b", "c", "d", "e"]), {}),
        ("huge max_tokens", chat("hi", max_tokens=10**9), {}),
        ("long message", chat("red circle " * 300_000), {}),
        ("special token", chat("<image> and <|im_start|>"), {}),
        ("unknown model", {**chat("hi"), "model": "other"}, {}),
        ("wrong types", chat("hi", temperature="hot"), {}),
        ("no key", chat("hi"), {"Authorization": ""}),
    ]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def children(pid: int) -> list[str]:
    found = subprocess.run(["ps", "-o", "comm=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return found.split()


@pytest.fixture
def server(model_dir):
    port = free_port()
    command = [sys.executable, "-m", "vlmkit", "serve", "--model", str(model_dir), "--port", str(port),
               "--served-model-name", "tiny", "--api-key", KEY]
    url = f"http://127.0.0.1:{port}"
    with server_process(command, f"{url}/health", timeout=120) as process:
        yield url, process


def test_500_mixed_requests_no_5xx_every_valid_one_answered_memory_bounded(server):
    url, process = server
    auth = {"Authorization": f"Bearer {KEY}"}
    colours = ["red", "green", "blue", "white"]

    def valid(i: int) -> tuple[str, dict, dict]:
        data = io.BytesIO()
        Image.new("RGB", (40 + i % 9, 32), colours[i % 4]).save(data, "PNG")
        content = [image(base64.b64encode(data.getvalue()).decode()), {"type": "text", "text": f"Question {i}?"}]
        return "valid", chat(content, stream=i % 3 == 0), {}

    def send(client: httpx.Client, request) -> tuple[str, int]:
        kind, body, headers = request
        headers = {**auth, **headers}
        if not headers.get("Authorization"):
            del headers["Authorization"]
        if isinstance(body, bytes):
            return kind, client.post("/v1/chat/completions", content=body, headers=headers).status_code
        return kind, client.post("/v1/chat/completions", json=body, headers=headers).status_code

    with httpx.Client(base_url=url, timeout=120) as client:
        warm = [send(client, valid(i)) for i in range(20)]
        assert all(status == 200 for _, status in warm), warm
        baseline = rss_kib(process.pid)

        hostile = hostile_requests()
        mixed = [valid(20 + i) if i % 2 else hostile[i // 2 % len(hostile)] for i in range(480)]
        random.Random(0).shuffle(mixed)
        started = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda request: send(client, request), mixed))
        elapsed = time.monotonic() - started

    assert process.poll() is None, "the server stopped"
    server_errors = [(kind, status) for kind, status in answers if status >= 500]
    assert not server_errors, server_errors
    assert all(status == 200 for kind, status in answers if kind == "valid")
    refused = {kind: status for kind, status in answers if kind != "valid"}
    assert all(400 <= status < 500 for status in refused.values()), refused
    assert children(process.pid) == [], "the server started a program"
    after = rss_kib(process.pid)
    assert after <= 1.5 * baseline, f"RSS {baseline} KiB after 20 valid requests, {after} KiB after 500"
    print(f"500 requests in {elapsed:.0f} s; RSS {baseline / 1024:.0f} MiB -> {after / 1024:.0f} MiB")
