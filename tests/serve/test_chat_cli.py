"""`vlmkit chat` in a pseudo-terminal: type commands, read the screen (pyte renders it as a terminal would)."""

from __future__ import annotations

import os
import sys

import pytest
from PIL import Image

pexpect = pytest.importorskip("pexpect", reason="the serve extra is not installed (pip install -e '.[serve]')")
pyte = pytest.importorskip("pyte", reason="the serve extra is not installed (pip install -e '.[serve]')")

from vlmkit.processing.images import open_image  # noqa: E402
from vlmkit.serve.chat_cli import printable  # noqa: E402
from vlmkit.config import GenerationSettings  # noqa: E402
from vlmkit.serve.generation import stream_reply  # noqa: E402
from vlmkit.serve.reply_control import ReplySettings  # noqa: E402

PROMPT = "you> "


class Terminal:
    """A `vlmkit chat` process on a 120x40 pseudo-terminal, with the screen it would show."""

    def __init__(self, args: list[str], cwd):
        self.screen = pyte.Screen(120, 40)
        self._stream = pyte.ByteStream(self.screen)
        env = os.environ | {"OMP_NUM_THREADS": "1", "TERM": "xterm"}
        self.child = pexpect.spawn(sys.executable, ["-m", "vlmkit", "chat", *args], cwd=str(cwd), env=env,
                                   dimensions=(40, 120), timeout=120)
        self.transcript = ""
        self.wait()

    def wait(self) -> str:
        """Everything shown up to the next prompt (line endings as \\n)."""
        self.child.expect_exact(PROMPT)
        shown = self.child.before + self.child.after
        self._stream.feed(shown)
        text = shown.decode("utf-8", "replace").replace("\r\n", "\n")
        self.transcript += text
        return text

    def type(self, line: str) -> str:
        self.child.sendline(line)
        return self.wait()

    def lines(self) -> list[str]:
        return [line.rstrip() for line in self.screen.display]


def greedy(loaded, image, text: str, max_new_tokens: int, history=()) -> str:
    model, processor = loaded
    messages = [*history, {"role": "user", "content": text}]
    messages[0] = messages[0] | {"content": "<image>\n" + messages[0]["content"]}
    settings = ReplySettings.of(GenerationSettings(max_new_tokens=max_new_tokens), processor)
    return "".join(stream_reply(model, processor, messages, [image], settings))


def test_chat_session_in_a_pseudo_terminal(model_dir, loaded, tmp_path):
    Image.new("RGB", (40, 30), (200, 30, 10)).save(tmp_path / "red.png")
    (tmp_path / "notes.txt").write_text("not an image")
    image = open_image(tmp_path / "red.png")
    term = Terminal(["--model", str(model_dir), "--image", "red.png", "--max-new-tokens", "8"], cwd=tmp_path)
    assert "1 image(s)" in term.transcript

    assert ":img PATH..." in term.type(":help") and ":reset-conf" in term.transcript
    assert "images: red.png" in term.type(":img")
    assert "image file not found" in term.type(":img missing.png")
    assert "not a readable image" in term.type(":img notes.txt")
    assert "images: red.png" in term.type(":img"), "a bad path must keep the images"
    assert "unknown command :frobnicate" in term.type(":frobnicate")

    first = greedy(loaded, image, "What colour is it?", 8)
    assert f"vlm> {printable(first)}\n" in term.type("What colour is it?")
    history = [{"role": "user", "content": "What colour is it?"}, {"role": "assistant", "content": first.strip()}]
    second = greedy(loaded, image, "And its shape?", 8, history)
    assert f"vlm> {printable(second)}\n" in term.type("And its shape?")
    shown = term.type(":his")
    assert "images: red.png" in shown and "you: What colour is it?" in shown and "you: And its shape?" in shown

    assert "1 image(s) kept" in term.type(":clh")
    assert "(no history)" in term.type(":his")

    assert "do_sample = 'maybe' has the wrong type" in term.type(":conf max_new_tokens=2 do_sample=maybe")
    assert "max_new_tokens=8" in term.type(":conf"), "a failed :conf must change nothing"
    assert "max_new_tokens=2" in term.type(":conf max_new_tokens=2")
    short = greedy(loaded, image, "What colour is it?", 2)
    assert f"vlm> {printable(short)}\n" in term.type("What colour is it?")
    assert "seed=5" in term.type(":seed 5")
    assert "seed = 'five' has the wrong type" in term.type(":seed five")
    reset = term.type(":reset-conf")
    assert "max_new_tokens=8" in reset and "seed=None" in reset

    term.type(":clear")
    assert term.lines()[0] == PROMPT.strip() and not any(term.lines()[1:]), "the screen must be blank"

    term.child.sendline(":q")
    term.child.expect(pexpect.EOF)
    term.child.close()
    assert term.child.exitstatus == 0
