"""`vlmkit serve`: an OpenAI-compatible HTTP API in front of one model (FastAPI + uvicorn).

Routes: `GET /v1/models`, `POST /v1/chat/completions` for a chat model (plain or streamed
as server-sent events), `POST /v1/embeddings` for a retriever (query embeddings) and
`GET /health`. Responses are built with the `openai` package's own types; every error is a
JSON body in OpenAI's shape; bad input gets a 4xx and never stops the server. Chat requests
are batched continuously (`vlmkit.serve.batching`: one that arrives while others generate joins
them); with `max_batch=1` they run one at a time (`vlmkit.serve.engine`).

Cheap limits come before expensive work: the key, then the content type and the body's size
(before it is read), then the prompt's length in characters (before it is tokenised) and each
image's header (before it is decoded).
"""

from __future__ import annotations

import base64
import hmac
import json
import logging
import threading
import time
import uuid
from contextlib import aclosing, contextmanager
from typing import AsyncIterator, Iterator

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from openai.types import CompletionUsage, CreateEmbeddingResponse, Embedding, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessage
from openai.types.chat.chat_completion import Choice
from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice
from openai.types.chat.chat_completion_chunk import ChoiceDelta
from openai.types.create_embedding_response import Usage
from starlette.exceptions import HTTPException

from vlmkit.errors import ConfigError, VlmkitError
from vlmkit.model.retriever import VLMRetriever, encode_inputs
from vlmkit.serve.batching import BatchingEngine, EmbeddingBatcher
from vlmkit.serve.engine import Busy, Engine, Finished, Job, whole_reply
from vlmkit.serve.openai_schema import ApiError, ChatRequest, EmbeddingRequest, embedding_texts, parse, to_job

LOG = logging.getLogger("vlmkit.serve")
MAX_BODY_BYTES = 32 * 1024 * 1024  # enough for a few large base64 images
MAX_PIXELS = 16_000_000  # per image, checked from its header before decoding
DEFAULT_MAX_BATCH = 32


def create_app(model, processor, model_name: str, api_key: str | None = None, max_waiting: int = 64,
               max_batch: int = DEFAULT_MAX_BATCH) -> FastAPI:
    """The API app for one loaded model; `api_key` set: every /v1 request needs `Authorization: Bearer KEY`.
    At most `max_batch` chat replies are generated together (1: one at a time)."""
    if max_batch < 1:
        raise ConfigError(f"max_batch must be at least 1, not {max_batch}")
    retriever = isinstance(model, VLMRetriever)
    # A retriever answers embeddings only, each request one batched forward already.
    engine = BatchingEngine(model, processor, max_waiting, max_batch) if max_batch > 1 and not retriever else \
        Engine(model, processor, max_waiting)
    context = model.config.text_config.max_position_embeddings
    embedding_size = (model.config.multi_vector_dim or model.config.text_config.hidden_size) if retriever else None
    tokenizer = processor.tokenizer
    special_tokens = {str(t) for t in tokenizer.added_tokens_decoder.values() if t.special}
    created = int(time.time())
    app = FastAPI(title="vlmkit", docs_url=None, redoc_url=None, openapi_url=None)  # no pages that need a CDN
    app.state.engine = engine

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:  # unknown route, wrong method
        return JSONResponse(ApiError(err.status_code, str(err.detail)).body(), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def server_error(request: Request, err: Exception) -> JSONResponse:
        LOG.exception("request failed")
        body = ApiError(500, f"internal error ({err.__class__.__name__})", kind="server_error").body()
        return JSONResponse(body, status_code=500)

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        # Before anything reads the body, so a caller without the key learns nothing else.
        if api_key and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, f"Bearer {api_key}".encode()):
                error = ApiError(401, "missing or incorrect API key (Authorization: Bearer KEY)",
                                 code="invalid_api_key")
                return JSONResponse(error.body(), status_code=401)
        return await call_next(request)

    def model_card() -> dict:
        return Model(id=model_name, object="model", created=created, owned_by="vlmkit").model_dump()

    def check_model(name: str) -> None:
        if name != model_name:
            raise ApiError(404, f"the model {name!r} does not exist; this server has {model_name!r}", "model",
                           code="model_not_found")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str) -> dict:
        check_model(name)
        return model_card()

    @torch.no_grad()
    def embed(texts: list[str]) -> tuple[torch.Tensor, list[int]]:
        """Query embeddings of `texts` and each one's token count (on the worker: it uses the tokenizer's padding)."""
        inputs = encode_inputs(processor, model.config, queries=texts)
        if inputs["input_ids"].shape[1] > context:
            raise ApiError(400, f"an input is longer than this model's context of {context} tokens", "input",
                           code="context_length_exceeded")
        vectors = model(**{k: v.to(model.device) for k, v in inputs.items()})
        return vectors.float().cpu(), inputs["attention_mask"].sum(1).tolist()

    # Concurrent embedding requests share one forward pass (one at a time with max_batch=1).
    embed_requests = EmbeddingBatcher(engine, embed) if max_batch > 1 else None

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> dict:
        ask = parse(await read_body(request), EmbeddingRequest)
        check_model(ask.model)
        if not retriever:
            raise ApiError(400, f"{model_name!r} is a generative model; /v1/embeddings needs a retriever model",
                           "model", code="model_not_retriever")
        if model.config.multi_vector_dim:
            raise ApiError(400, f"{model_name!r} gives one vector per token (late interaction), which OpenAI's "
                                "embedding format cannot carry", "model", code="multi_vector_model")
        if ask.dimensions not in (None, embedding_size):
            raise ApiError(400, f"this model's embeddings have {embedding_size} dimensions", "dimensions")
        texts = embedding_texts(ask, special_tokens, context)
        try:
            if embed_requests is not None:
                vectors, tokens = await embed_requests(texts)
            else:
                vectors, counts = await engine.run(lambda: embed(texts))
                tokens = sum(counts)
        except Busy as err:
            raise ApiError(429, str(err), code="server_busy", kind="rate_limit_error") from None
        data = [Embedding(object="embedding", index=i, embedding=v.tolist()) for i, v in enumerate(vectors)]
        usage = Usage(prompt_tokens=tokens, total_tokens=tokens)
        body = CreateEmbeddingResponse(object="list", data=data, model=model_name, usage=usage).model_dump()
        if ask.encoding_format == "base64":  # the type holds the floats; the client asked for their bytes
            for item, vector in zip(body["data"], vectors):
                item["embedding"] = base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode()
        return body

    def fit_context(chat: ChatRequest, job: Job, prompt_tokens: int) -> None:
        """Refuse what the context cannot hold; without max_tokens, shorten the default to fit."""
        room = context - prompt_tokens
        asked = chat.max_completion_tokens or chat.max_tokens
        if room < 1 or (asked and asked > room):
            raise ApiError(400, f"this model's context is {context} tokens; the prompt takes {prompt_tokens}"
                                + (f" and max_tokens asks for {asked} more" if asked else ""),
                           "messages", code="context_length_exceeded")
        job.settings.max_new_tokens = min(job.settings.max_new_tokens, room)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        chat = parse(await read_body(request), ChatRequest)
        check_model(chat.model)
        if retriever:
            raise ApiError(400, f"{model_name!r} is a retriever: it answers /v1/embeddings, not chat", "model",
                           code="model_not_generative")
        job = await run_in_threadpool(to_job, chat, special_tokens, MAX_PIXELS, context)  # decoding images: slow
        try:
            prompt_tokens = await run_in_threadpool(engine.prompt_tokens, job.messages, job.images,
                                                    job.settings.max_slices)
        except VlmkitError as err:  # markers and images that disagree
            raise ApiError(400, str(err), "messages") from None
        fit_context(chat, job, prompt_tokens)
        try:
            items = engine.submit(job)
        except Busy as err:
            raise ApiError(429, str(err), code="server_busy", kind="rate_limit_error") from None
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}
        if chat.stream:
            include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
            events = sse(items, head, prompt_tokens, include_usage)
            return ClosingStreamingResponse(events, media_type="text/event-stream")
        text, finished = await whole_reply(items)
        message = ChatCompletionMessage(role="assistant", content=text)
        choice = Choice(index=0, message=message, finish_reason=finished.finish_reason)
        usage = usage_of(prompt_tokens, finished)
        reply = ChatCompletion(**head, object="chat.completion", choices=[choice], usage=usage)
        return reply.model_dump(exclude_unset=True)

    return app


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The JSON request body: 415 unless sent as application/json; 413 past `limit` bytes.

    Only JSON's content type is accepted so that a web page cannot post to this server from the
    user's browser: a form or text/plain post goes out without asking, application/json only after
    a CORS preflight, which this server does not grant. A declared length over `limit` is refused
    before a byte is read; a chunked body as soon as it grows past `limit`.
    """
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise ApiError(415, f"the request body must be JSON sent with Content-Type: application/json, not "
                            f"{media_type or 'no content type'}", code="unsupported_media_type")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and (len(declared) > 15 or int(declared) > limit):  # 16+ digits: over any limit
        raise ApiError(413, f"the request body is over {limit // 2**20} MiB", code="request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"the request body is over {limit // 2**20} MiB", code="request_too_large")
    return bytes(body)


def usage_of(prompt_tokens: int, finished: Finished) -> CompletionUsage:
    completion = finished.completion_tokens
    total = prompt_tokens + completion
    return CompletionUsage(prompt_tokens=prompt_tokens, completion_tokens=completion, total_tokens=total)


class ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that closes its body when it ends, whether or not the client stayed.

    When the client leaves, Starlette cancels the stream wherever it waits. If that is in `send`,
    the body generator stays open until the garbage collector closes it, and until then the
    engine's `finally`, which stops generation, does not run: the abandoned reply kept generating.
    """

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


async def sse(items: AsyncIterator, head: dict, prompt_tokens: int, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events as OpenAI streams them: role, content pieces, finish reason, [usage], [DONE].

    `head` holds the id, created and model that every chunk repeats. Closing this generator
    closes `items` too, which stops the generation behind them.
    """

    def event(choices: list[ChunkChoice], **extra) -> str:
        chunk = ChatCompletionChunk(**head, object="chat.completion.chunk", choices=choices, **extra)
        return f"data: {chunk.model_dump_json(exclude_unset=True)}\n\n"

    def choice(finish_reason: str | None = None, **delta) -> ChunkChoice:
        return ChunkChoice(index=0, delta=ChoiceDelta(**delta), finish_reason=finish_reason)

    async with aclosing(items):
        yield event([choice(role="assistant", content="")])
        try:
            async for item in items:
                if isinstance(item, Finished):
                    yield event([choice(item.finish_reason)])
                    if include_usage:
                        yield event([], usage=usage_of(prompt_tokens, item))
                else:
                    yield event([choice(content=item)])
        except Exception as err:  # noqa: BLE001 -- the status line has gone; say it in the stream
            LOG.exception("streamed request failed")
            yield f"data: {json.dumps(ApiError(500, str(err), kind='server_error').body())}\n\n"
        yield "data: [DONE]\n\n"


def run_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve `app` until interrupted (loopback only unless `host` says otherwise)."""
    if host not in ("127.0.0.1", "localhost", "::1"):
        LOG.warning("listening on %s: other machines can reach this server; protect it with --api-key", host)
    uvicorn.run(app, host=host, port=port, log_level="info")


@contextmanager
def background_server(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve `app` from a thread while the block runs (port 0: a free one); yields the base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the API server did not start")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        app.state.engine.close()
