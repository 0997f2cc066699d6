"""Continuous batching for `vlmkit serve`: a request that arrives while others generate joins them.

Each step decodes one token for every running request in one forward pass; between steps new
requests are prefilled and join the batch, and finished ones leave it (Orca's iteration-level
scheduling, as vLLM and TGI do). Decoding a 135M-parameter LM is bound by reading its weights,
so a step for 32 requests costs far less than 32 steps for one.

Hand-written on the model's forward and transformers' `DynamicCache`, not transformers'
continuous batching (`generate_batch`, `ContinuousBatchingManager`): that takes token ids
only, and a vlmkit prompt carries image features merged into its embeddings.

- **Prefill the requests that arrived together in one forward** (up to `max_prefill`), padded on
  the left with the attention mask hiding the padding and each row at its own positions, then
  join their KV cache to the batch's (the shorter side padded on the left again). Reading the
  weights once for several prompts is what makes it pay: 32 requests arriving at once would
  otherwise wait for 32 prefills in turn before the first of them got its second token.
- **Decode together**: every row's next token from one forward over the batch. Float32 sums
  over a batch can round differently from one row alone, so a greedy answer could in principle
  differ from the answer alone; the tests compare them (no difference seen so far).
- **Per-request settings**: greedy or sampling (each with its own seeded generator), top-k,
  top-p, temperature, repetition penalty, max tokens, stop strings; a request whose client
  left is dropped at the next step.
- Other work (`run`) runs on the same thread between steps. Embedding requests of a retriever
  (which has no chat) are batched too, across requests (`EmbeddingBatcher`).
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, TypeVar

import torch
from torch.nn import functional as F
from transformers import (DynamicCache, LogitsProcessorList, RepetitionPenaltyLogitsProcessor,
                          TemperatureLogitsWarper, TextStreamer, TopKLogitsWarper, TopPLogitsWarper)

from vlmkit.config import GenerationSettings
from vlmkit.processing.image_processing import concat_image_inputs
from vlmkit.serve.engine import Engine, Finished, Job
from vlmkit.serve.reply_control import ReplySettings, StopText

T = TypeVar("T")


class _Text(TextStreamer):
    """transformers' streamer logic (whole words, no half characters) for one request's tokens."""

    def __init__(self, tokenizer, emit: Callable[[str], None]):
        super().__init__(tokenizer, skip_special_tokens=True)
        self.emit = emit

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.emit(text)


@dataclass
class _Request:
    job: Job
    settings: ReplySettings
    put: Callable  # thread-safe: hands an item to the request's response
    ids: list[int] = field(default_factory=list)  # prompt and reply so far (the repetition penalty reads both)
    generated: int = 0
    stops: StopText | None = None
    text: _Text | None = None
    generator: torch.Generator | None = None
    processors: LogitsProcessorList | None = None

    def emit(self, piece: str) -> None:
        if shown := self.stops.feed(piece):
            self.put(shown)


class BatchingEngine(Engine):
    """Runs chat jobs in one continuously updated batch of at most `max_batch` on one thread."""

    def __init__(self, model, processor, max_waiting: int = 64, max_batch: int = 32, max_prefill: int = 8):
        super().__init__(model, processor, max_waiting)
        self.max_batch, self.max_prefill = max_batch, max_prefill
        self.suppressed = list(ReplySettings.of(GenerationSettings(), processor).suppressed)
        self.eos = set(_as_list(model.generation_config.eos_token_id))
        self._new: deque[_Request] = deque()
        self._calls: deque[tuple[Callable, Future]] = deque()
        self._running: list[_Request] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # (rows, cached tokens): 0 over each row's left padding
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="vlmkit-batch", daemon=True)
        self._thread.start()

    # -- called from the event loop ------------------------------------------------------------

    async def run(self, fn: Callable[[], T]) -> T:
        self._admit()
        future: Future = Future()
        with self._wake:
            self._calls.append((fn, future))
            self._wake.notify()
        return await asyncio.wrap_future(future)

    def submit(self, job: Job) -> AsyncIterator[str | Finished]:
        self._admit()
        loop = asyncio.get_running_loop()
        items: asyncio.Queue = asyncio.Queue()
        settings = ReplySettings.of(job.settings, self.processor)
        put = lambda item: loop.call_soon_threadsafe(items.put_nowait, item)  # noqa: E731
        with self._wake:
            self._new.append(_Request(job, settings, put))
            self._wake.notify()
        return self._results(items, settings)

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        super().close()

    # -- the batch thread -------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._wake:
                self._wake.wait_for(lambda: self._closed or self._new or self._calls or self._running)
                if self._closed:
                    break
                calls, self._calls = list(self._calls), deque()
                room = min(self.max_batch - len(self._running), self.max_prefill)
                joining = [self._new.popleft() for _ in range(min(room, len(self._new)))]
            try:
                for fn, future in calls:
                    self._started()
                    _settle(future, fn)
                for _ in joining:
                    self._started()
                if joining:
                    self._join(joining)
                if self._running:
                    self._step()
            except BaseException as err:  # noqa: BLE001 -- a fault outside the model calls (memory, decoding):
                self._fail([*self._running, *joining], err)  # those in flight learn it, the server goes on
        with self._wake:  # closed: nothing waiting is left to hang
            waiting, self._new, calls, self._calls = list(self._new), deque(), list(self._calls), deque()
        stopped = RuntimeError("the server is shutting down")
        self._fail([*self._running, *waiting], stopped)
        for _, future in calls:
            future.set_exception(stopped)

    def _fail(self, requests: list[_Request], err: BaseException) -> None:
        """Hand `err` to each of `requests` and start the batch afresh."""
        for request in {id(r): r for r in requests}.values():
            try:
                request.put(err)
            except RuntimeError:  # its event loop has closed: nobody is listening
                pass
        self._running, self._cache, self._mask = [], None, None

    def _join(self, requests: list[_Request]) -> None:
        """Prefill `requests` together, take each one's first token, and add them to the batch."""
        ready = []
        for request in requests:
            if request.settings.watch.cancelled:  # the client left while it waited
                continue
            try:
                ready.append((request, self._prompt_inputs(request)))
            except BaseException as err:  # noqa: BLE001 -- this request fails, the others go on
                request.put(err)
        if not ready:
            return
        requests = [request for request, _ in ready]
        prompts = [inputs.pop("input_ids") for _, inputs in ready]
        batch = self.processor.tokenizer.pad({"input_ids": [p.tolist() for p in prompts]}, padding_side="left",
                                             return_tensors="pt")
        mask = batch["attention_mask"].to(self.model.device)
        cache = DynamicCache()
        try:
            with torch.no_grad():
                logits = self.model(input_ids=batch["input_ids"].to(self.model.device), attention_mask=mask,
                                    position_ids=(mask.cumsum(1) - 1).clamp(min=0), cache=cache, use_cache=True,
                                    logits_to_keep=1, **concat_image_inputs([inputs for _, inputs in ready])
                                    ).logits[:, -1]
        except BaseException as err:  # noqa: BLE001 -- these requests fail, the running batch goes on
            for request in requests:
                request.put(err)
            return
        for request, prompt in zip(requests, prompts):
            self._prepare(request, prompt.tolist())
        self._add_rows(requests, cache, mask)
        self._advance(requests, self._choose(requests, logits))

    def _prompt_inputs(self, request: _Request) -> dict:
        """The request's prompt ids and image inputs (raises DataError on a marker/image mismatch)."""
        job, processor = request.job, self.processor
        plans = processor.plans(job.images, job.settings.max_slices)
        ids = processor.encode_text(job.messages, plans, add_generation_prompt=True)["input_ids"]
        inputs = {"input_ids": ids} | processor.image_inputs(job.images, job.settings.max_slices)
        return {key: value.to(self.model.device) for key, value in inputs.items()}

    def _prepare(self, request: _Request, prompt: list[int]) -> None:
        settings = request.settings
        request.ids = prompt
        request.stops = StopText(request.job.stop)
        request.text = _Text(self.processor.tokenizer, request.emit)
        processors = LogitsProcessorList()
        if settings.repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(settings.repetition_penalty))
        if settings.do_sample:  # in the order generate() applies them, each only where it changes something
            if settings.temperature != 1.0:
                processors.append(TemperatureLogitsWarper(settings.temperature))
            if settings.top_k:
                processors.append(TopKLogitsWarper(settings.top_k))
            if settings.top_p < 1.0:
                processors.append(TopPLogitsWarper(settings.top_p))
            request.generator = torch.Generator(self.model.device)
            if settings.seed is not None:
                request.generator.manual_seed(settings.seed)
            else:
                request.generator.seed()
        request.processors = processors

    def _choose(self, rows: list[_Request], logits: torch.Tensor) -> list[int]:
        """Each row's next token from its last position's logits: one argmax over the batch for
        the plain greedy rows, each row's own processors and generator for the others."""
        scores = logits.float()
        scores[:, self.suppressed] = float("-inf")
        greedy = scores.argmax(-1).tolist()
        tokens = []
        for i, request in enumerate(rows):
            if not request.processors and request.generator is None:
                tokens.append(greedy[i])
                continue
            row = request.processors(torch.tensor([request.ids], device=scores.device), scores[i : i + 1])
            tokens.append(int(row.argmax(-1)) if request.generator is None else
                          int(torch.multinomial(F.softmax(row, -1), 1, generator=request.generator)))
        return tokens

    def _add_rows(self, requests: list[_Request], cache: DynamicCache, mask: torch.Tensor) -> None:
        """Join prefilled rows (their cache, their attention mask) to the running batch."""
        if not self._running:
            self._cache, self._mask = cache, mask
        else:
            width = max(self._mask.shape[1], mask.shape[1])
            # DynamicCache() without a config holds plain DynamicLayers: keys and values (rows, heads,
            # tokens, dims) that the LM appends to, and that can be padded and joined here.
            for old, new in zip(self._cache.layers, cache.layers, strict=True):
                old.keys = torch.cat([_left_pad(old.keys, width), _left_pad(new.keys, width)])
                old.values = torch.cat([_left_pad(old.values, width), _left_pad(new.values, width)])
            self._mask = torch.cat([_left_pad(self._mask, width, dim=1), _left_pad(mask, width, dim=1)])
        self._running += requests

    def _step(self) -> None:
        """One token for every running request."""
        rows = self._running
        last = torch.tensor([[r.ids[-1]] for r in rows], device=self.model.device)
        self._mask = F.pad(self._mask, (0, 1), value=1)
        positions = self._mask.sum(1, keepdim=True) - 1  # each row's own count of real tokens
        try:
            with torch.no_grad():
                logits = self.model(input_ids=last, attention_mask=self._mask, position_ids=positions,
                                    cache=self._cache, use_cache=True).logits[:, -1]
            tokens = self._choose(rows, logits)
        except BaseException as err:  # noqa: BLE001 -- the batch is lost; each of its requests says why
            for request in rows:
                request.put(err)
            self._running, self._cache, self._mask = [], None, None
            return
        self._advance(rows, tokens)

    def _advance(self, rows: list[_Request], tokens: list[int]) -> None:
        """Record each row's new token, stream its text, and let finished rows leave the batch."""
        done = set()
        for request, token in zip(rows, tokens):
            settings = request.settings
            if settings.watch.cancelled:
                done.add(id(request))
                continue
            settings.watch.tokens += 1
            request.generated += 1
            reason = None
            if token in self.eos:
                reason = "stop"
            else:
                request.ids.append(token)
                request.text.put(torch.tensor([token]))
                if request.stops.hit:
                    reason = "stop"
                elif request.generated >= settings.max_new_tokens:
                    reason = "length"
            if reason:
                request.text.end()
                if rest := request.stops.flush():
                    request.put(rest)
                request.put(Finished("stop" if request.stops.hit else reason, request.generated))
                done.add(id(request))
        if done:
            self._drop(done)

    def _drop(self, done: set[int]) -> None:
        keep = [i for i, request in enumerate(self._running) if id(request) not in done]
        self._running = [self._running[i] for i in keep]
        if not keep:
            self._cache, self._mask = None, None
            return
        index = torch.tensor(keep, device=self.model.device)
        self._mask = self._mask[index]
        start = int((self._mask.sum(0) > 0).nonzero()[0])  # columns that are padding in every row go
        self._mask = self._mask[:, start:]
        for layer in self._cache.layers:
            layer.keys = layer.keys[index, :, start:]
            layer.values = layer.values[index, :, start:]


def _left_pad(tensor: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    """`tensor` padded with zeros on the left of `dim` up to `width`."""
    missing = width - tensor.shape[dim]
    if not missing:
        return tensor
    pad = [0, 0] * (tensor.dim() - dim - 1) + [missing, 0]
    return F.pad(tensor, pad)


def _as_list(value) -> list:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def _settle(future: Future, fn: Callable) -> None:
    try:
        future.set_result(fn())
    except BaseException as err:  # noqa: BLE001 -- raised again where the call is awaited
        future.set_exception(err)


class EmbeddingBatcher:
    """Concurrent embedding requests answered by one forward pass.

    Each request queues a flush on the engine's worker; the first flush to run takes every
    request waiting by then (up to `max_texts` texts) and embeds their texts together, so
    requests that arrived while the worker was busy share one batch, and the flushes queued
    after it find nothing left. `embed(texts)` returns the vectors and each text's token count;
    when it refuses the joined batch (an input beyond the context), each request is embedded
    alone, so only the one at fault fails.
    """

    def __init__(self, engine: Engine, embed: Callable[[list[str]], tuple[torch.Tensor, list[int]]],
                 max_texts: int = 256):
        self.engine, self.embed, self.max_texts = engine, embed, max_texts
        self._waiting: deque[tuple[list[str], asyncio.Future, asyncio.AbstractEventLoop]] = deque()
        self._lock = threading.Lock()

    async def __call__(self, texts: list[str]) -> tuple[torch.Tensor, int]:
        """The embeddings of `texts` and their token count (raises Busy when the queue is full)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        entry = (texts, future, loop)
        with self._lock:
            self._waiting.append(entry)
        try:
            await self.engine.run(self._flush)
        except BaseException:  # Busy: refused, so not embedded by a later flush either
            with self._lock:
                if entry in self._waiting:
                    self._waiting.remove(entry)
            raise
        return await future

    def _flush(self) -> None:
        with self._lock:
            batch, count = [], 0
            while self._waiting and (not batch or count + len(self._waiting[0][0]) <= self.max_texts):
                batch.append(self._waiting.popleft())
                count += len(batch[-1][0])
        if not batch:
            return
        try:
            vectors, tokens = self.embed([text for texts, _, _ in batch for text in texts])
        except BaseException:  # noqa: BLE001 -- each request alone, so only the one at fault fails
            for texts, future, loop in batch:
                _answer(future, loop, lambda texts=texts: self._alone(texts))
            return
        start = 0
        for texts, future, loop in batch:
            end = start + len(texts)
            _answer(future, loop, lambda s=start, e=end: (vectors[s:e], sum(tokens[s:e])))
            start = end

    def _alone(self, texts: list[str]) -> tuple[torch.Tensor, int]:
        vectors, tokens = self.embed(texts)
        return vectors, sum(tokens)


def _answer(future: asyncio.Future, loop: asyncio.AbstractEventLoop, fn: Callable) -> None:
    """Settle an event loop's `future` with `fn()` (or its exception), from this thread."""
    try:
        result = fn()
    except BaseException as err:  # noqa: BLE001 -- raised again where the future is awaited
        loop.call_soon_threadsafe(lambda error=err: future.done() or future.set_exception(error))
        return
    loop.call_soon_threadsafe(lambda: future.done() or future.set_result(result))
