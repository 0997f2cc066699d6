"""Continuous batching (`vlmkit.serve.batching`): requests that join a running batch get the
greedy answers they get alone, with their own settings, stop strings and limits; a client that
leaves frees its row; a failing request fails alone."""

from __future__ import annotations

import asyncio
import copy
import time

import pytest
import torch
from PIL import Image, ImageDraw

from vlmkit.config import GenerationSettings
from vlmkit.serve.batching import BatchingEngine
from vlmkit.serve.engine import Finished, Job, whole_reply
from vlmkit.serve.generation import stream_reply
from vlmkit.serve.reply_control import ReplySettings

COLOURS = ["red", "green", "blue", "orange", "purple", "black", "yellow", "white"]
QUESTIONS = ["What is this?", "Describe the picture in detail, please.", "Colour?",
             "Is there a circle in the image, and where is it?"]


def picture(colour: str, shape: int, size: int = 64) -> Image.Image:
    image = Image.new("RGB", (size, size), "grey")
    box = (8 + 3 * shape, 10, 40 + 2 * shape, 50)
    (ImageDraw.Draw(image).ellipse if shape % 2 else ImageDraw.Draw(image).rectangle)(box, fill=colour)
    return image


def jobs(n: int, max_tokens=lambda i: 6 + i % 7) -> list[Job]:
    """`n` different image questions: other colours, shapes and wordings, one or two images, other lengths."""
    made = []
    for i in range(n):
        images = [picture(COLOURS[i % 8], i % 5)] + ([picture(COLOURS[(i + 3) % 8], i % 3)] if i % 4 == 3 else [])
        text = "<image>\n" * len(images) + QUESTIONS[i % len(QUESTIONS)]
        made.append(Job([{"role": "user", "content": text}], images, GenerationSettings(max_new_tokens=max_tokens(i))))
    return made


def alone(model, processor, job: Job) -> str:
    settings = ReplySettings.of(job.settings, processor)
    return "".join(stream_reply(model, processor, job.messages, job.images, settings))


def together(engine: BatchingEngine, batch: list[Job], stagger: float = 0.0) -> list[tuple[str, Finished]]:
    """Every job submitted to `engine`, `stagger` seconds apart (so later ones join a running batch)."""

    async def main():
        tasks = []
        for job in batch:
            tasks.append(asyncio.create_task(whole_reply(engine.submit(job))))
            await asyncio.sleep(stagger)
        return await asyncio.gather(*tasks)

    return asyncio.run(main())


@pytest.fixture
def engine(loaded):
    model, processor = loaded
    made = BatchingEngine(model, processor, max_batch=5)
    yield made
    made.close()


def test_greedy_answers_in_a_batch_equal_the_answers_alone(loaded, engine):
    model, processor = loaded
    batch = jobs(14)  # more than max_batch: some wait for a row, some join a batch mid-reply
    results = together(engine, batch, stagger=0.01)
    for job, (text, finished) in zip(batch, results):
        assert text == alone(model, processor, job)
        # The tiny model never ends a reply early: each takes its own max_tokens.
        assert finished == Finished("length", job.settings.max_new_tokens)
    assert len({text for text, _ in results}) > 7  # the questions get different answers


def test_stop_strings_sampling_and_a_client_that_leaves(loaded, engine):
    model, processor = loaded
    plain = jobs(1, max_tokens=lambda i: 12)[0]
    full = alone(model, processor, plain)
    stop = full[4:7]
    stopped = Job(plain.messages, plain.images, GenerationSettings(max_new_tokens=12), stop=[stop])
    sampled = [Job(plain.messages, plain.images, GenerationSettings(max_new_tokens=12, do_sample=True, seed=7,
                                                                    temperature=0.9, top_k=0, top_p=0.8))
               for _ in range(2)]

    async def main():
        leaving = engine.submit(jobs(1, max_tokens=lambda i: 500)[0])
        first = await leaving.__anext__()  # the reply has begun, then the client goes
        await leaving.aclose()
        rest = await asyncio.gather(*(whole_reply(engine.submit(job)) for job in [stopped, *sampled, plain]))
        return first, rest

    first, (cut, *seeded, again) = asyncio.run(main())
    assert isinstance(first, str)
    assert cut[0] == full[: full.index(stop)] and cut[1].finish_reason == "stop"
    assert seeded[0] == seeded[1]  # the seed gives each request its own generator
    assert again[0] == full  # the row of the client that left was freed; the batch went on
    deadline = time.monotonic() + 5  # the batch thread drops finished rows just after their last text
    while engine._running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine._running == []


def test_a_request_that_fails_fails_alone(loaded, engine):
    model, processor = loaded
    good = jobs(2)
    bad = Job([{"role": "user", "content": "<image>\n<image>\nTwo markers, one image."}], [picture("red", 1)],
              GenerationSettings(max_new_tokens=4))

    async def main():
        return await asyncio.gather(*(whole_reply(engine.submit(job)) for job in [good[0], bad, good[1]]),
                                    return_exceptions=True)

    first, failure, second = asyncio.run(main())
    assert isinstance(failure, Exception) and "marker" in str(failure)
    assert first[0] == alone(model, processor, good[0]) and second[0] == alone(model, processor, good[1])


def test_32_image_questions_on_the_pretrained_weights_match_their_answers_alone(pretrained_checkpoints):
    from vlmkit.config import ModelConfig
    from vlmkit.model.build import build

    torch.manual_seed(0)  # DINOv2-small + SmolLM2-135M-Instruct, a new projector, 16 tokens an image
    built = build(ModelConfig(vision="facebook/dinov2-small", lm="HuggingFaceTB/SmolLM2-135M-Instruct",
                              projector="mlp", vision_feature_layer=-2, image_size=56))
    model, processor = built.model.eval(), built.processor
    batch = jobs(32, max_tokens=lambda i: 8)
    engine = BatchingEngine(model, processor, max_batch=32)
    try:
        results = together(engine, batch)
    finally:
        engine.close()
    answers = [text for text, _ in results]
    assert answers == [alone(model, processor, job) for job in batch]
    assert len(set(answers)) > 8


def test_concurrent_embedding_requests_share_a_forward_and_get_their_own_vectors(loaded):
    from vlmkit.eval.retrieval import encode_queries
    from vlmkit.model.retriever import VLMRetriever
    from vlmkit.serve.batching import EmbeddingBatcher
    from vlmkit.serve.engine import Engine

    model, processor = loaded
    retriever = VLMRetriever.from_vlm(copy.deepcopy(model)).eval()
    calls = []

    def embed(texts):
        calls.append(len(texts))
        if any("too long" in t for t in texts):
            raise ValueError("an input is longer than the context")
        inputs = processor.tokenizer(texts, padding=True)
        return encode_queries(retriever, processor, texts), [sum(m) for m in inputs["attention_mask"]]

    engine = Engine(retriever, processor)
    batcher = EmbeddingBatcher(engine, embed)
    requests = [["a red circle"], ["two blue squares", "a green cross on the left"], ["x too long"], ["purple"]]

    async def main():
        blocker = asyncio.create_task(engine.run(lambda: time.sleep(0.3)))  # the worker is busy ...
        await asyncio.sleep(0.05)
        answers = await asyncio.gather(*(batcher(texts) for texts in requests), return_exceptions=True)  # ... meanwhile
        await blocker
        return answers

    try:
        answers = asyncio.run(main())
    finally:
        engine.close()
    assert calls[0] == 5  # the four requests waited together and went in one forward
    assert isinstance(answers[2], ValueError)  # the request at fault fails alone ...
    for texts, answer in zip(requests, answers):
        if texts == ["x too long"]:
            continue
        vectors, tokens = answer
        # ... and the others get the vectors they get alone (padding in a batch changes nothing but rounding).
        assert torch.allclose(vectors, encode_queries(retriever, processor, texts), atol=1e-5) and tokens > 0


def test_a_fault_outside_the_model_fails_the_requests_in_flight_and_the_engine_serves_on(loaded, engine, monkeypatch):
    model, processor = loaded
    job = jobs(1, max_tokens=lambda i: 5)[0]
    choose = engine._choose
    faults = []

    def fails_once(rows, logits):
        if not faults:
            faults.append(len(rows))
            raise MemoryError("out of memory while choosing")
        return choose(rows, logits)

    monkeypatch.setattr(engine, "_choose", fails_once)

    async def main(jobs_now):
        return await asyncio.gather(*(whole_reply(engine.submit(j)) for j in jobs_now), return_exceptions=True)

    failed = asyncio.run(main([job]))
    assert faults and isinstance(failed[0], MemoryError)
    assert asyncio.run(main([job]))[0][0] == alone(model, processor, job)  # the engine thread lives on


def test_closing_the_engine_answers_every_waiting_request(loaded):
    model, processor = loaded
    engine = BatchingEngine(model, processor, max_batch=2)

    async def main():
        items = [engine.submit(job) for job in jobs(3, max_tokens=lambda i: 400)]
        first = await items[0].__anext__()  # the batch is running; the third request waits for a row
        engine.close()
        return first, await asyncio.wait_for(asyncio.gather(*(whole_reply(i) for i in items),
                                                            return_exceptions=True), timeout=30)

    first, ends = asyncio.run(main())
    assert isinstance(first, str)
    assert all(isinstance(end, RuntimeError) and "shutting down" in str(end) for end in ends)
