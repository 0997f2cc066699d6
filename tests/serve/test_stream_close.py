"""A streamed reply whose client leaves closes its generation at once, not when the garbage collector runs."""

import asyncio

from vlmkit.serve.api import ClosingStreamingResponse, sse

HEAD = {"id": "chatcmpl-test", "created": 0, "model": "tiny"}  # what every chunk repeats


def test_a_stream_cancelled_in_send_closes_the_generation_behind_it():
    closed = []

    async def pieces():  # stands in for Engine.submit's results, whose `finally` stops generate()
        try:
            while True:
                yield "word"
                await asyncio.sleep(0)
        finally:
            closed.append(True)

    async def scenario() -> None:
        client_left, sent = asyncio.Event(), []

        async def receive() -> dict:
            await client_left.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message["type"])
            if sent.count("http.response.body") == 3:  # role, a word, then the client leaves while this waits
                client_left.set()
                await asyncio.Event().wait()

        response = ClosingStreamingResponse(sse(pieces(), HEAD, 0, False), media_type="text/event-stream")
        await response({"type": "http", "asgi": {"spec_version": "2.3"}}, receive, send)
        assert closed == [True]  # while `response` still holds the body: no garbage collection involved

    asyncio.run(scenario())
