"""The Gradio page in a real headless browser (Debian's Chromium driven by playwright).

A person's session: upload two images, ask, ask again, change the decoding panel and
regenerate, try a file that is not an image, clear; then search pages in the Retrieval tab.
Replies must equal the library's, and pages come in the library's order with its scores.
Screenshots go to runs/test-screenshots/.
"""

from __future__ import annotations

import copy
import io
import os
import re
import shutil
import socket
import time
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

pytest.importorskip("gradio", reason="the serve extra is not installed (pip install -e '.[serve]')")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[serve]')")

from vlmkit.data.page_store import PageStoreWriter  # noqa: E402
from vlmkit.model.retriever import VLMRetriever  # noqa: E402
from vlmkit.processing.images import open_image  # noqa: E402
from vlmkit.config import GenerationSettings  # noqa: E402
from vlmkit.serve.generation import stream_reply  # noqa: E402
from vlmkit.serve.page_search import PageSearch  # noqa: E402
from vlmkit.serve.reply_control import ReplySettings  # noqa: E402
from vlmkit.serve.web import launch  # noqa: E402

CHROMIUM = os.environ.get("VLMKIT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(not CHROMIUM, reason="no Chromium browser: `make test` installs Debian's chromium "
                                "package (apt-get install chromium); or point VLMKIT_CHROMIUM at one")
SCREENSHOT = Path(__file__).resolve().parents[2] / "runs" / "test-screenshots" / "web-chat.png"
BOT = '#chat [data-testid="bot"]'


def words(text: str) -> str:
    """Letters and digits only: what survives the page's escaping and line wrapping unchanged."""
    return re.sub(r"[^A-Za-z0-9]", "", text)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition, what, timeout: float = 60):
    """Poll `condition` until it holds; `what` (text, or a function giving it) explains a timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what() if callable(what) else what}")


@pytest.fixture(scope="module")
def search(loaded, tmp_path_factory):
    """Page search over six pages of coloured shapes, with a retriever made from the chat model's weights."""
    model, processor = loaded
    store = tmp_path_factory.mktemp("pages") / "pages.h5"
    with PageStoreWriter(store) as writer:
        for i, colour in enumerate(["red", "green", "blue", "orange", "purple", "black"]):
            image = Image.new("RGB", (48, 64), "white")
            ImageDraw.Draw(image).rectangle((4 + 4 * i, 8, 30, 40 + 3 * i), fill=colour)
            buffer = io.BytesIO()
            image.save(buffer, "PNG")
            writer.add(f"page-{i}", buffer.getvalue())
    return PageSearch(VLMRetriever.from_vlm(copy.deepcopy(model)).eval(), processor, store)


@pytest.fixture(scope="module")
def page(loaded, search):
    model, processor = loaded
    ui, url = launch("tiny", model, processor, search=search, port=free_port(), block=False)
    try:
        with sync_api.sync_playwright() as playwright:
            # --no-sandbox: CI containers run as root, where Chromium's sandbox refuses to start.
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(url)
            page.wait_for_selector("#message textarea")
            yield page
            browser.close()
    finally:
        ui.close()


def expected(loaded, messages: list[dict], images: list, **settings) -> str:
    """The library's reply with the page's default settings, changed by `settings`."""
    model, processor = loaded
    settings = ReplySettings.of(GenerationSettings(**settings), processor)
    return "".join(stream_reply(model, processor, messages, images, settings))


def ask(page, text: str, files=()) -> None:
    if files:
        page.locator("#message input[type=file]").set_input_files([str(f) for f in files])
        wait_for(lambda: page.locator("#message img").count() == len(files), "the thumbnails of the upload")
    page.locator("#message textarea").fill(text)
    page.locator("#message textarea").press("Enter")


def set_value(page, selector: str, value: str) -> None:
    """Type into a field and leave it, as a person would: Gradio takes the value when the field loses focus."""
    field = page.locator(selector)
    field.fill(value)
    field.press("Tab")


def last_reply_is(page, text: str, n_replies: int) -> None:
    def shown():
        bots = page.locator(BOT)
        return bots.count() == n_replies and words(bots.last.inner_text()) == words(text)

    def problem():
        bots = page.locator(BOT)
        return f"reply {n_replies} to read {text!r}; the page has {bots.count()}, the last {bots.last.inner_text()!r}"

    wait_for(shown, problem)


def test_chat_in_a_real_browser(page, loaded, tmp_path):
    paths = [tmp_path / "red.png", tmp_path / "green.png"]
    Image.new("RGB", (40, 30), (200, 30, 10)).save(paths[0])
    Image.new("RGB", (30, 40), (10, 180, 30)).save(paths[1])
    images = [open_image(p) for p in paths]

    ask(page, "What colour is the circle?", paths)
    history = [{"role": "user", "content": "<image>\n<image>\nWhat colour is the circle?"}]
    first = expected(loaded, history, images)
    assert words(first), "the test model should say something"
    last_reply_is(page, first, 1)
    assert page.locator('#chat [data-testid="user"] img').count() == 2, "both uploads shown in the chat"

    ask(page, "And the square?")
    history += [{"role": "assistant", "content": first.strip()}, {"role": "user", "content": "And the square?"}]
    last_reply_is(page, expected(loaded, history, images), 2)
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)

    # Decoding panel: fewer tokens, then seeded sampling, each applied by Regenerate.
    set_value(page, "#max-new-tokens input[type=number]", "3")
    wait_for(lambda: page.locator("#max-new-tokens input[type=range]").input_value() == "3", "the slider to follow")
    page.locator("#regenerate").click()
    last_reply_is(page, expected(loaded, history, images, max_new_tokens=3), 2)
    page.get_by_label("sampling").check()
    set_value(page, "#seed textarea", "7")
    # Computed before clicking: sampling here while the page samples would share torch's global RNG.
    sampled = expected(loaded, history, images, max_new_tokens=3, do_sample=True, seed=7)
    page.locator("#regenerate").click()
    last_reply_is(page, sampled, 2)

    (tmp_path / "notes.png").write_text("not an image")
    ask(page, "What is this?", [tmp_path / "notes.png"])
    wait_for(lambda: "not a readable image" in page.content(), "the warning about the bad file")
    assert page.locator(BOT).count() == 2, "a bad upload must leave the conversation as it was"

    page.locator("#clear").click()
    wait_for(lambda: page.locator(BOT).count() == 0 and page.locator('#chat [data-testid="user"]').count() == 0,
             "an empty chat")


def test_retrieval_tab_shows_the_top_pages_with_scores(page, search):
    page.reload()  # a fresh page, without the chat test's notices
    page.get_by_role("tab", name="Retrieval").click()
    query = page.locator("#query textarea")
    query.fill("the red rectangle")
    query.press("Enter")
    hits = search.top("the red rectangle", 5)
    captions = [f"{hit.score:.4f} · {hit.doc_id}" for hit in hits]
    wait_for(lambda: page.locator("#pages img").count() == 5, "five thumbnails")
    shown = page.locator("#pages").inner_text()
    assert [c for c in captions if c in shown] == captions
    positions = [shown.index(c) for c in captions]
    assert positions == sorted(positions), "best page first"
    page.screenshot(path=str(SCREENSHOT.with_name("web-retrieval.png")))
