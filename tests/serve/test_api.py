"""The OpenAI-compatible API against a live server on 127.0.0.1, driven by the official `openai` client.

Pins: greedy answers equal `stream_reply`'s, streamed or not, alone or 32 at once; stop,
max_tokens and seed behave as OpenAI documents; every response body is a valid instance of
the `openai` package's type for it; 200 malformed requests each get a 4xx error in OpenAI's
shape and the server keeps answering.
"""

from __future__ import annotations

import base64
import copy
import io
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pydantic
import pytest
import torch
from PIL import Image

openai = pytest.importorskip("openai", reason="the serve extra is not installed (pip install -e '.[serve]')")

from vlmkit.cli import build_parser  # noqa: E402
from vlmkit.eval.retrieval import encode_queries  # noqa: E402
from vlmkit.model.retriever import VLMRetriever  # noqa: E402
from vlmkit.processing.images import open_image  # noqa: E402
from openai.types import CreateEmbeddingResponse, Model  # noqa: E402
from openai.types.chat import ChatCompletion, ChatCompletionChunk  # noqa: E402
from openai.types.shared import ErrorObject  # noqa: E402

from tests.processing.helpers import EPS  # noqa: E402
from vlmkit.serve.api import background_server, create_app  # noqa: E402
from vlmkit.config import GenerationSettings  # noqa: E402
from vlmkit.serve.generation import stream_reply  # noqa: E402
from vlmkit.serve.openai_schema import MAX_STOP_CHARS  # noqa: E402
from vlmkit.serve.reply_control import ReplySettings  # noqa: E402

KEY = "test-key"
NAME = "tiny"


def png_bytes(size=(40, 30), colour=(200, 30, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return buffer.getvalue()


def data_url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


def user_turn(text: str, *images: bytes) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": data_url(raw)}} for raw in images]
    return {"role": "user", "content": parts + [{"type": "text", "text": text}]}


@pytest.fixture(scope="module")
def server(loaded):
    model, processor = loaded
    with background_server(create_app(model, processor, NAME, api_key=KEY)) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)


def expected_greedy(loaded, text: str, *images: bytes, max_new_tokens: int = 12) -> str:
    model, processor = loaded
    messages = [{"role": "user", "content": "<image>\n" * len(images) + text}]
    settings = ReplySettings.of(GenerationSettings(max_new_tokens=max_new_tokens), processor)
    return "".join(stream_reply(model, processor, messages, [open_image(raw) for raw in images], settings))


def as_openai(kind: type[pydantic.BaseModel], body: dict) -> pydantic.BaseModel:
    """`body` validated as the openai type `kind`: nothing coerced, no field anywhere that the type does not declare."""
    value = kind.model_validate(body)
    assert value.model_dump(exclude_unset=True) == body
    inside = [value]
    while inside:
        item = inside.pop()
        if isinstance(item, pydantic.BaseModel):
            assert not item.model_extra, f"{type(item).__name__} has undeclared fields {item.model_extra}"
            inside += [getattr(item, name) for name in type(item).model_fields]
        elif isinstance(item, list):
            inside += item
    return value


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert client.models.retrieve(NAME).owned_by == "vlmkit"


def test_greedy_answer_matches_the_library_streamed_or_not(client, loaded):
    image = png_bytes()
    expected = expected_greedy(loaded, "What colour is the circle?", image)
    kwargs = {"model": NAME, "messages": [user_turn("What colour is the circle?", image)], "temperature": 0,
              "max_tokens": 12}
    reply = client.chat.completions.create(**kwargs)
    assert reply.choices[0].message.content == expected
    assert reply.usage.completion_tokens <= 12 and reply.usage.prompt_tokens > 16  # 16 image tokens
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].usage.total_tokens == reply.usage.total_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reply.choices[0].finish_reason


def test_two_images_and_a_second_turn(client, loaded):
    model, processor = loaded
    first, second = png_bytes(), png_bytes((30, 50), (10, 200, 10))
    messages = [user_turn("Compare them.", first, second), {"role": "assistant", "content": "ok"},
                {"role": "user", "content": "And now?"}]
    reply = client.chat.completions.create(model=NAME, messages=messages, temperature=0, max_tokens=8)
    library = [{"role": "user", "content": "<image>\n<image>\nCompare them."}, {"role": "assistant", "content": "ok"},
               {"role": "user", "content": "And now?"}]
    images = [open_image(first), open_image(second)]
    settings = ReplySettings.of(GenerationSettings(max_new_tokens=8), processor)
    expected = "".join(stream_reply(model, processor, library, images, settings))
    assert reply.choices[0].message.content == expected


def test_max_tokens_stop_and_seed(client, loaded):
    base = {"model": NAME, "messages": [user_turn("Describe it.", png_bytes())]}
    short = client.chat.completions.create(temperature=0, max_tokens=3, **base)
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"

    full = client.chat.completions.create(temperature=0, max_tokens=16, **base).choices[0].message.content
    stop = full[len(full) // 2:][:2]
    cut = client.chat.completions.create(temperature=0, max_tokens=16, stop=[stop], **base).choices[0]
    assert stop and cut.message.content == full[: full.index(stop)] and cut.finish_reason == "stop"

    sampled = [client.chat.completions.create(temperature=1.5, top_p=0.95, seed=seed, max_tokens=10, **base)
               for seed in (7, 7, 8)]
    texts = [s.choices[0].message.content for s in sampled]
    assert texts[0] == texts[1], "the same seed must give the same sample"


def test_a_stop_string_cuts_the_streamed_reply_before_it(client):
    base = {"model": NAME, "messages": [user_turn("Describe it.", png_bytes())], "temperature": 0, "max_tokens": 16}
    full = client.chat.completions.create(**base).choices[0].message.content
    assert len(full) >= 2
    for stop in (full[len(full) // 2:][:2], full[:1]):  # one in the middle, one that ends the reply before it starts
        chunks = list(client.chat.completions.create(stream=True, stop=stop, **base))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == full[: full.index(stop)], stop
        assert chunks[-1].choices[0].finish_reason == "stop"


def test_four_stop_strings_of_240k_characters_get_a_400(client):
    long_stops = ["x" * 240_000, "y" * 240_000, "z" * 240_000, "w" * 240_000]
    with pytest.raises(openai.BadRequestError, match=f"at most {MAX_STOP_CHARS} characters") as refused:
        client.chat.completions.create(model=NAME, messages=[user_turn("Describe it.", png_bytes())], max_tokens=2,
                                       stop=long_stops)
    assert refused.value.param == "stop[0]"
    reply = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert reply.usage.completion_tokens <= 2


def test_every_response_is_a_valid_openai_type(server):
    body = {"model": NAME, "messages": [user_turn("Describe it.", png_bytes())], "temperature": 0, "max_tokens": 6}
    streamed = body | {"stream": True, "stream_options": {"include_usage": True}}
    with httpx.Client(base_url=server, timeout=60, headers={"Authorization": f"Bearer {KEY}"}) as http:
        models = http.get("/v1/models").json()
        assert models["object"] == "list" and [as_openai(Model, m).id for m in models["data"]] == [NAME]
        assert as_openai(Model, http.get(f"/v1/models/{NAME}").json()).owned_by == "vlmkit"
        reply = as_openai(ChatCompletion, http.post("/v1/chat/completions", json=body).json())
        with http.stream("POST", "/v1/chat/completions", json=streamed) as response:
            events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
        refused = http.post("/v1/chat/completions", json=body | {"temperature": 5})
    assert events[-1] == "[DONE]"
    chunks = [as_openai(ChatCompletionChunk, json.loads(event)) for event in events[:-1]]
    assert {chunk.id for chunk in chunks} == {chunks[0].id} and chunks[0].id != reply.id
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply.choices[0].message.content
    assert chunks[-1].usage.total_tokens == reply.usage.total_tokens
    assert as_openai(ErrorObject, refused.json()["error"]).param == "temperature"


def test_32_concurrent_requests_equal_sequential_greedy_answers(client):
    prompts = [user_turn(f"Question {i}: what is shown?", png_bytes(colour=(30 * i, 90, 200 - 20 * i)))
               for i in range(8)]

    def ask(turn):
        reply = client.chat.completions.create(model=NAME, messages=[turn], temperature=0, max_tokens=8)
        return reply.choices[0].message.content

    sequential = [ask(turn) for turn in prompts]
    with ThreadPoolExecutor(32) as pool:
        concurrent = list(pool.map(ask, prompts * 4))
    assert concurrent == sequential * 4


def test_embeddings_explain_that_the_model_is_no_retriever(client):
    with pytest.raises(openai.BadRequestError, match="needs a retriever model"):
        client.embeddings.create(model=NAME, input="red circle")


def _bomb_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (20_000, 20_000)).save(buffer, "PNG")  # 400 megapixels in a small file
    return buffer.getvalue()


def _strip_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (4, 60_000)).save(buffer, "PNG")  # a few KB, but padded to a square 60000x60000
    return buffer.getvalue()


def malformed_requests() -> list[tuple[str, dict, int]]:
    """(what, httpx request arguments, expected status) for each kind of bad request."""
    auth = {"Authorization": f"Bearer {KEY}"}
    ok_turn = {"role": "user", "content": "hi"}

    def chat(**fields):
        body = {"model": NAME, "messages": [ok_turn]} | fields
        return {"method": "POST", "url": "/v1/chat/completions", "headers": auth, "json": body}

    def raw(content: bytes, headers=auth | {"Content-Type": "application/json"}):
        return {"method": "POST", "url": "/v1/chat/completions", "headers": headers, "content": content}

    def image_turn(url: str):
        return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]

    png = png_bytes()
    return [
        ("invalid JSON", raw(b'{"model": "tiny", "messages": ['), 400),
        ("not UTF-8", raw(b"\xff\xfe{}"), 400),
        ("JSON array body", raw(b"[1, 2]"), 400),
        ("empty body", raw(b""), 400),
        ("missing messages", chat(messages=None) | {"json": {"model": NAME}}, 400),
        ("missing model", chat() | {"json": {"messages": [ok_turn]}}, 400),
        ("empty messages", chat(messages=[]), 400),
        ("messages not a list", chat(messages="hi"), 400),
        ("content a number", chat(messages=[{"role": "user", "content": 5}]), 400),
        ("unknown role", chat(messages=[{"role": "robot", "content": "hi"}]), 400),
        ("unknown part type", chat(messages=[{"role": "user", "content": [{"type": "video"}]}]), 400),
        ("temperature a string", chat(temperature="hot"), 400),
        ("temperature too high", chat(temperature=5), 400),
        ("stream a string", chat(stream="yes"), 400),
        ("max_tokens zero", chat(max_tokens=0), 400),
        ("max_tokens a float", chat(max_tokens=2.5), 400),
        ("n above one", chat(n=3), 400),
        ("five stop strings", chat(stop=["a", "b", "c", "d", "e"]), 400),
        ("a stop string too long", chat(stop=["a", "x" * (MAX_STOP_CHARS + 1)]), 400),
        ("a lone stop string too long", chat(stop="x" * (MAX_STOP_CHARS + 1)), 400),
        ("negative seed", chat(seed=-1), 400),
        ("last message from the assistant", chat(messages=[{"role": "assistant", "content": "hi"}]), 400),
        ("image marker typed as text", chat(messages=[{"role": "user", "content": "<image> hi"}]), 400),
        ("http image URL", chat(messages=image_turn("http://127.0.0.1:1/cat.png")), 400),
        ("https image URL", chat(messages=image_turn("https://example.com/cat.png")), 400),
        ("file image URL", chat(messages=image_turn("file:///etc/passwd")), 400),
        ("data URL without base64", chat(messages=image_turn("data:image/png,abc")), 400),
        ("bad base64", chat(messages=image_turn("data:image/png;base64,@@@@")), 400),
        ("non-image bytes", chat(messages=image_turn(data_url(b"this is not an image at all"))), 400),
        ("truncated PNG", chat(messages=image_turn(data_url(png[: len(png) // 2]))), 400),
        ("decompression bomb", chat(messages=image_turn(data_url(_bomb_png()))), 400),
        ("EPS image (Ghostscript)", chat(messages=image_turn(data_url(EPS))), 400),
        ("image of 4x60000 pixels", chat(messages=image_turn(data_url(_strip_png()))), 400),
        ("body sent as text/plain", raw(b'{"model": "tiny"}', headers=auth | {"Content-Type": "text/plain"}), 415),
        ("prompt longer than the context", chat(messages=[{"role": "user", "content": "red circle " * 600}]), 400),
        ("max_tokens beyond the context", chat(max_tokens=100_000), 400),
        ("unknown model", chat(model="gpt-4o"), 404),
        ("no API key", {**chat(), "headers": {}}, 401),
        ("wrong API key", {**chat(), "headers": {"Authorization": "Bearer nope"}}, 401),
        ("unknown route", {"method": "POST", "url": "/v1/completion", "headers": auth, "json": {}}, 404),
        ("wrong method", {"method": "GET", "url": "/v1/chat/completions", "headers": auth}, 405),
        ("embeddings input a number", {"method": "POST", "url": "/v1/embeddings", "headers": auth,
                                       "json": {"model": NAME, "input": 3}}, 400),
    ]


def test_200_malformed_requests_get_4xx_json_errors_and_the_server_keeps_serving(server, client):
    cases = malformed_requests()
    with httpx.Client(base_url=server, timeout=60) as http:
        for what, request, status in itertools.islice(itertools.cycle(cases), 200):
            response = http.request(**request)
            assert response.status_code == status, (what, response.text)
            error = response.json()["error"]
            assert isinstance(error["message"], str) and error["message"] and "type" in error, what
        oversize = http.post("/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}",
                             "Content-Type": "application/json"}, content=b" " * (33 * 2**20))
        assert oversize.status_code == 413 and oversize.json()["error"]["code"] == "request_too_large"
    reply = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], temperature=0,
                                           max_tokens=4)
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_a_client_that_leaves_mid_stream_stops_its_generation(server, client, loaded):
    model = loaded[0]
    body = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "temperature": 0, "max_tokens": 400}
    assert client.chat.completions.create(**body).usage.completion_tokens == 400  # it would go on that long
    steps = []

    def step(*args) -> None:
        steps.append(1)
        time.sleep(0.01)  # a floor on each step, so that the check below does not depend on the host's speed

    hook = model.language_model.register_forward_hook(step)
    try:
        with httpx.Client(base_url=server, timeout=60) as http:
            with http.stream("POST", "/v1/chat/completions", json=body | {"stream": True},
                             headers={"Authorization": f"Bearer {KEY}"}) as response:
                lines = (line for line in response.iter_lines() if line.startswith("data: {"))
                chunks = (json.loads(line.removeprefix("data: ")) for line in lines)
                next(c for c in chunks if c["choices"][0]["delta"].get("content"))  # generation is under way
                started = len(steps)
        # Queued behind the abandoned request, this one finishes only after it has stopped.
        after = client.chat.completions.create(**body | {"max_tokens": 2})
    finally:
        hook.remove()
    assert after.usage.completion_tokens == 2
    assert len(steps) - started < 100, f"{len(steps) - started} more steps: the abandoned request kept generating"


def test_vlmkit_serve_command_listens_on_loopback_by_default(model_dir):
    for command in ("serve", "web"):
        assert build_parser().parse_args([command, "--model", "m"]).host == "127.0.0.1"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = os.environ | {"OMP_NUM_THREADS": "1", "VLMKIT_API_KEY": KEY}
    command = [sys.executable, "-m", "vlmkit", "serve", "--model", str(model_dir), "--port", str(port)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                assert process.poll() is None and time.monotonic() < deadline, "vlmkit serve did not start"
                time.sleep(0.25)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0)
        assert [m.id for m in client.models.list().data] == [model_dir.name]  # the key came from VLMKIT_API_KEY
    finally:
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=30)
    assert f"running on http://127.0.0.1:{port}" in output


def test_a_retriever_serves_embeddings_equal_to_the_library(loaded):
    model, processor = loaded
    retriever = VLMRetriever.from_vlm(copy.deepcopy(model)).eval()
    texts = ["a red circle", "two blue squares on the left"]
    expected = encode_queries(retriever, processor, texts)
    with background_server(create_app(retriever, processor, "tiny-retriever")) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        reply = client.embeddings.create(model="tiny-retriever", input=texts)  # base64 on the wire
        assert torch.allclose(torch.tensor([d.embedding for d in reply.data]), expected, atol=1e-6)
        assert reply.usage.prompt_tokens > len(texts)
        plain = httpx.post(f"{url}/v1/embeddings", json={"model": "tiny-retriever", "input": texts[0]}).json()
        as_openai(CreateEmbeddingResponse, plain)
        assert torch.allclose(torch.tensor(plain["data"][0]["embedding"]), expected[0], atol=1e-6)
        for bad in ({"input": []}, {"input": [""]}, {"input": "<image>"}, {"dimensions": 3}):
            response = httpx.post(f"{url}/v1/embeddings", json={"model": "tiny-retriever", "input": "x"} | bad)
            assert response.status_code == 400 and response.json()["error"]["message"], bad
        with pytest.raises(openai.BadRequestError, match="is a retriever"):
            client.chat.completions.create(model="tiny-retriever", messages=[{"role": "user", "content": "hi"}])
