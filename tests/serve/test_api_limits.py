"""The API against hostile requests: each gets a 4xx before any expensive or dangerous
work, runs no program, keeps memory bounded, and the server answers the next request.

- an EPS file in an image part is refused without starting Ghostscript;
- a body not sent as application/json is refused (415), so a web page cannot post one;
- a body over the size limit is refused from its Content-Length, before it is read, and a
  chunked one as it streams in (413);
- a 31 MB message is refused from its character count, before tokenising (400);
- a 4x60000 PNG (a few KB) is refused from its header, before padding it to a square (400);
- an embedding input beyond the context is refused from its length, like a chat prompt;
- JSON nested 5000 deep, a 5000-digit number and a lone surrogate are 400s that say so.
"""

from __future__ import annotations

import base64
import io
import os
import socket
import subprocess
import threading
import time
from contextlib import contextmanager
from urllib.parse import urlsplit

import httpx
import pytest
from PIL import Image

pytest.importorskip("openai", reason="the serve extra is not installed (pip install -e '.[serve]')")

from tests.processing.helpers import EPS  # noqa: E402
from vlmkit.processing.images import MAX_ASPECT_RATIO  # noqa: E402
from vlmkit.serve.api import MAX_BODY_BYTES, background_server, create_app  # noqa: E402
from vlmkit.serve.openai_schema import MAX_CHARS_PER_TOKEN, ApiError, EmbeddingRequest, embedding_texts  # noqa: E402

KEY = "test-key"
NAME = "tiny"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def app(loaded):
    model, processor = loaded
    return create_app(model, processor, NAME, api_key=KEY)


@pytest.fixture(scope="module")
def server(app):
    with background_server(app) as url:
        yield url


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server, timeout=60, headers=AUTH) as client:
        yield client


def chat(content, **fields) -> dict:
    return {"model": NAME, "messages": [{"role": "user", "content": content}], "max_tokens": 2} | fields


def image_part(raw: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{base64.b64encode(raw).decode()}"}}


def assert_still_serving(http: httpx.Client) -> None:
    reply = http.post("/v1/chat/completions", json=chat("hi"))
    assert reply.status_code == 200 and reply.json()["choices"][0]["finish_reason"] in ("stop", "length")


def rss() -> int:
    """This process's resident memory in bytes (the server runs in it, on a thread)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def rss_growth():
    """Yields a list that holds, once the block ends, the peak resident memory growth in bytes during it."""
    start, peak, done = rss(), [rss()], threading.Event()

    def sample():
        while not done.wait(0.005):
            peak[0] = max(peak[0], rss())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    growth = []
    try:
        yield growth
    finally:
        done.set()
        sampler.join()
        growth.append(max(peak[0], rss()) - start)


def test_an_eps_image_is_refused_without_starting_a_program(http, monkeypatch):
    started = []

    def refuse(args, *rest, **kwargs):
        started.append(args)
        raise OSError(f"the test refuses to start {args!r}")

    monkeypatch.setattr(subprocess, "Popen", refuse)  # the server runs in this process
    response = http.post("/v1/chat/completions", json=chat([image_part(EPS), {"type": "text", "text": "What?"}]))
    assert started == []
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_image" and error["param"] == "messages[0].content[0]"
    assert "PNG, JPEG" in error["message"]
    monkeypatch.undo()
    assert_still_serving(http)


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/jsonp"])
@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/embeddings"])
def test_a_body_not_sent_as_json_gets_415(http, content_type, route):
    # What a web page can send another origin without a CORS preflight: a form or text/plain.
    fields = {"model": NAME, "input": "hi"} if route == "/v1/embeddings" else chat("hi")
    body = httpx.Request("POST", "/", json=fields).content  # valid JSON all the same
    headers = {"Content-Type": content_type} if content_type else {}
    response = http.post(route, content=body, headers=headers)
    assert response.status_code == 415, response.text
    assert response.json()["error"]["code"] == "unsupported_media_type"


def test_json_with_a_charset_is_json(http):
    body = httpx.Request("POST", "/", json=chat("hi")).content
    headers = {"Content-Type": "application/json; charset=utf-8"}
    assert http.post("/v1/chat/completions", content=body, headers=headers).status_code == 200


def test_a_declared_oversize_body_gets_413_before_it_is_sent(server):
    # Headers only: a server that waited for the body would never answer.
    url = urlsplit(server)
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {url.netloc}\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {MAX_BODY_BYTES + 1}\r\n\r\n")
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        sock.sendall(head.encode())
        status = sock.recv(4096).split(b"\r\n", 1)[0]
    assert status.startswith(b"HTTP/1.1 413"), status


def test_a_chunked_oversize_body_gets_413_as_it_streams_in(http):
    sent = []

    def chunks():
        for _ in range(MAX_BODY_BYTES // 2**20 + 8):
            sent.append(2**20)
            yield b" " * 2**20

    try:
        response = http.post("/v1/chat/completions", content=chunks(), headers={"Content-Type": "application/json"})
        assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    except (httpx.WriteError, httpx.RemoteProtocolError):
        pass  # the server answered and closed while the client still sent: refused all the same
    assert sum(sent) <= MAX_BODY_BYTES + 8 * 2**20
    assert_still_serving(http)


def test_a_31_mb_message_gets_400_before_tokenising_and_memory_stays_bounded(app, http, monkeypatch):
    tokenised = []
    count = app.state.engine.prompt_tokens

    def guarded(messages, *args, **kwargs):
        # Tokenising tens of MB takes gigabytes (the bug); refuse it here rather than run out of memory.
        chars = sum(len(m["content"]) for m in messages)
        tokenised.append(chars)
        if chars > 1_000_000:
            raise AssertionError(f"asked to tokenise {chars} characters")
        return count(messages, *args, **kwargs)

    monkeypatch.setattr(app.state.engine, "prompt_tokens", guarded)
    text = "red circle " * (31 * 10**6 // 11)
    body = httpx.Request("POST", "/", json=chat(text)).content
    assert len(body) < MAX_BODY_BYTES  # under the body limit: the length check must refuse it
    started = time.monotonic()
    with rss_growth() as growth:
        response = http.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text[:300]
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
    assert f"{len(text)} characters" in error["message"]
    assert tokenised == [] and time.monotonic() - started < 10
    # The client's and the server's copies of the body (about 5x in all, measured), not gigabytes.
    assert growth[0] < 8 * len(body), f"memory grew by {growth[0] / 2**20:.0f} MiB"
    del text, body
    assert_still_serving(http)
    # The bound is generous: a prompt just under it still reaches the tokenizer (and the context check).
    context = app.state.engine.model.config.text_config.max_position_embeddings
    near = http.post("/v1/chat/completions", json=chat("x" * (context * MAX_CHARS_PER_TOKEN - 100)))
    assert near.status_code == 400 and tokenised and "tokens" in near.json()["error"]["message"]


def test_an_image_beyond_the_aspect_ratio_limit_gets_400(http):
    buffer = io.BytesIO()
    Image.new("1", (4, 60_000)).save(buffer, "PNG")  # a few KB, under the pixel limit
    with rss_growth() as growth:
        response = http.post("/v1/chat/completions", json=chat([image_part(buffer.getvalue()),
                                                                 {"type": "text", "text": "What?"}]))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_image" and error["param"] == "messages[0].content[0]"
    assert "4x60000" in error["message"] and f"1:{MAX_ASPECT_RATIO}" in error["message"]
    assert growth[0] < 50 * 2**20, f"memory grew by {growth[0] / 2**20:.0f} MiB"
    assert_still_serving(http)


def test_an_embedding_input_beyond_the_context_is_refused_before_tokenising():
    request = EmbeddingRequest(model=NAME, input=["red circle", "x" * (512 * MAX_CHARS_PER_TOKEN + 1)])
    with pytest.raises(ApiError) as err:
        embedding_texts(request, set(), context=512)
    assert (err.value.status, err.value.param, err.value.code) == (400, "input[1]", "context_length_exceeded")
    assert embedding_texts(request.model_copy(update={"input": ["red circle"]}), set(), 512) == ["red circle"]


@pytest.mark.parametrize("body, named", [
    ('{"model": "tiny", "messages": ' + "[" * 5000 + "]" * 5000 + "}", "nested too deeply"),
    ('{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": ' + "9" * 5000 + "}",
     "number too long"),
    ('{"model": "tiny", "messages": [{"role": "user", "content": "a\\ud800b"}]}', "surrogate"),
], ids=["nesting-5000-deep", "5000-digit-max-tokens", "lone-surrogate"])
def test_malformed_json_values_get_400_naming_the_problem(http, body, named):
    reply = http.post("/v1/chat/completions", content=body.encode(), headers={"Content-Type": "application/json"})
    assert reply.status_code == 400, reply.text
    assert named in reply.json()["error"]["message"]
    assert_still_serving(http)
