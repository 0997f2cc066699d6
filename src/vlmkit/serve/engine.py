"""One model in memory, one generation at a time (`vlmkit serve --max-batch 1`, and retrievers'
embeddings): the API's requests wait in a first-come queue. The default engine batches
continuously on top of this one (`vlmkit.serve.batching`).

Requests run one by one on a single worker thread, so a greedy answer is the same whether it
was asked alone or among many (no batch padding to change the arithmetic). The event loop
never waits for the model: it only moves text from the worker into each response.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, TypeVar

from PIL import Image

from vlmkit.config import GenerationSettings
from vlmkit.serve.generation import stream_reply
from vlmkit.serve.reply_control import ReplySettings, StopText

T = TypeVar("T")


class Busy(Exception):
    """More requests are waiting than the queue takes."""


@dataclass
class Job:
    """One chat request, checked and ready to run."""

    messages: list[dict]  # vlmkit messages: string contents with one <image> marker per image
    images: list[Image.Image]
    settings: GenerationSettings
    stop: list[str] = field(default_factory=list)


@dataclass
class Finished:
    """The last item of a reply stream: what ended it and how many tokens it took."""

    finish_reason: str  # "stop" (end of turn or a stop string) or "length" (max tokens reached)
    completion_tokens: int


async def whole_reply(items: AsyncIterator[str | Finished]) -> tuple[str, Finished]:
    """The text of a reply stream (an engine's `submit`) and the `Finished` that ends it."""
    text, finished = "", None
    async for item in items:
        if isinstance(item, Finished):
            finished = item
        else:
            text += item
    return text, finished


class Engine:
    """Runs jobs on one worker thread, in the order they came; at most `max_waiting` wait."""

    def __init__(self, model, processor, max_waiting: int = 64):
        self.model, self.processor, self.max_waiting = model, processor, max_waiting
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlmkit-generate")
        self._waiting = 0
        self._lock = threading.Lock()

    def prompt_tokens(self, messages: list[dict], images: list[Image.Image], max_slices: int | None = None) -> int:
        """Length of the prompt `stream_reply` will build (raises DataError on a marker/image mismatch)."""
        plans = self.processor.plans(images, max_slices)
        return self.processor.encode_text(messages, plans, add_generation_prompt=True)["input_ids"].numel()

    def _admit(self) -> None:
        with self._lock:
            if self._waiting >= self.max_waiting:
                raise Busy(f"{self._waiting} requests are already waiting; try again shortly")
            self._waiting += 1

    def _started(self) -> None:
        with self._lock:
            self._waiting -= 1

    async def run(self, fn: Callable[[], T]) -> T:
        """`fn()` on the worker thread, after the jobs queued before it (for work other than chat, e.g. embeddings)."""
        self._admit()

        def work() -> T:
            self._started()
            return fn()

        return await asyncio.get_running_loop().run_in_executor(self._worker, work)

    def submit(self, job: Job) -> AsyncIterator[str | Finished]:
        """Queue `job` now (or raise Busy); iterate the result for its text pieces, then a `Finished`.

        Closing the iterator early (the client left) stops generation at the next token.
        Call from the event loop.
        """
        self._admit()
        loop = asyncio.get_running_loop()
        items: asyncio.Queue = asyncio.Queue()
        settings = ReplySettings.of(job.settings, self.processor)

        def put(item) -> None:
            loop.call_soon_threadsafe(items.put_nowait, item)

        def work() -> None:
            self._started()
            try:
                if settings.watch.cancelled:  # the client left while waiting
                    return
                stops = StopText(job.stop)
                for piece in stream_reply(self.model, self.processor, job.messages, job.images, settings):
                    if text := stops.feed(piece):
                        put(text)
                    if stops.hit:
                        settings.watch.cancel()  # and drain: stream_reply ends once generate() has
                if rest := stops.flush():
                    put(rest)
                at_limit = settings.watch.tokens >= job.settings.max_new_tokens and not stops.hit
                put(Finished("length" if at_limit else "stop", settings.watch.tokens))
            except BaseException as err:  # noqa: BLE001 -- raised again in the request's task
                put(err)

        loop.run_in_executor(self._worker, work)
        return self._results(items, settings)

    @staticmethod
    async def _results(items: asyncio.Queue, settings: ReplySettings) -> AsyncIterator[str | Finished]:
        try:
            while True:
                item = await items.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, Finished):
                    return
        finally:
            settings.watch.cancel()

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)
