"""`vlmkit chat --model DIR` without a prompt: an interactive session in the terminal.

Lines starting with `:` are commands (the set MiniGPT4Qwen's CLI made familiar); anything
else is a message. The images belong to the whole conversation: their markers go in its
first user message, so `:img` changes what the model sees for every turn, and `:clh`
starts over about the same images. Nothing a user types ends the session except `:exit`,
`:q` and Ctrl-D; Ctrl-C stops a reply.
"""

from __future__ import annotations

import dataclasses
import shlex
from typing import Callable

from vlmkit.errors import ConfigError, VlmkitError
from vlmkit.processing.images import open_image
from vlmkit.config import GenerationSettings
from vlmkit.serve.generation import stream_reply, with_image_markers
from vlmkit.serve.reply_control import ReplySettings

HELP = """commands:
  :help               this text
  :exit, :q           leave (or Ctrl-D)
  :clear              clear the screen
  :clh                clear the history, keep the images
  :his                show the history
  :img PATH...        use these images from now on; :img alone lists them
  :seed N             fix the sampling seed (:seed none to unset)
  :conf KEY=VALUE...  change decoding settings, e.g. :conf do_sample=true temperature=0.9;
                      :conf alone shows them
  :reset-conf         back to the settings the session started with
Ctrl-C stops a reply; anything else you type is a message."""

CLEAR_SCREEN = "\033[2J\033[3J\033[H"  # erase the screen and the scroll-back, cursor home
QUIT = object()  # what `command` returns for :exit


def printable(text: str) -> str:
    """`text` with control characters written as escapes, so that no reply can drive the terminal."""
    return "".join(c if c.isprintable() or c in "\n\t" else repr(c)[1:-1] for c in text)


class ChatSession:
    """One conversation: its history (without image markers), its images and its decoding settings."""

    def __init__(self, model, processor, settings: GenerationSettings, images=(), image_paths=(),
                 system: str | None = None):
        self.model, self.processor = model, processor
        # None keeps the chat template's own default (SmolLM2's writes a system line of its own).
        self.system = [{"role": "system", "content": system}] if system else []
        self.settings = settings
        self.initial_settings = dataclasses.replace(settings)
        self.history: list[dict] = []
        self.images, self.image_paths = list(images), [str(p) for p in image_paths]
        self.commands: dict[str, Callable[[list[str]], object]] = {
            "help": lambda args: HELP, "exit": lambda args: QUIT, "q": lambda args: QUIT,
            "clear": lambda args: CLEAR_SCREEN, "clh": self.clear_history, "his": self.show_history,
            "img": self.set_images, "seed": self.set_seed, "conf": self.configure, "reset-conf": self.reset_settings,
        }

    def command(self, line: str) -> object:
        """Run one `:command` line; returns the text to show, or QUIT."""
        try:
            name, *args = shlex.split(line[1:]) or [""]
        except ValueError as err:  # an unclosed quote
            return f"cannot read that command ({err})"
        if name not in self.commands:
            return f"unknown command :{name}; :help lists the commands"
        return self.commands[name](args)

    def clear_history(self, args: list[str]) -> str:
        self.history = []
        return f"history cleared; {len(self.images)} image(s) kept"

    def show_history(self, args: list[str]) -> str:
        lines = [f"images: {', '.join(self.image_paths)}"] if self.image_paths else []
        turns = [f"{'you' if m['role'] == 'user' else 'vlm'}: {printable(m['content'])}" for m in self.history]
        return "\n".join(lines + (turns or ["(no history)"]))

    def set_images(self, paths: list[str]) -> str:
        if not paths:
            return "images: " + (", ".join(self.image_paths) or "(none)")
        images = [open_image(p) for p in paths]  # all or nothing: one bad path keeps the old images
        self.images, self.image_paths = images, paths
        return f"{len(images)} image(s) set" + ("; the history now refers to them" if self.history else "")

    def set_seed(self, args: list[str]) -> str:
        if len(args) != 1:
            return "usage: :seed N (or :seed none)"
        self.settings.update("seed", args[0])
        return f"seed={self.settings.seed}"

    def configure(self, pairs: list[str]) -> str:
        changed = dataclasses.replace(self.settings)  # all or nothing, like :img
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep:
                raise ConfigError(f"{pair!r} is not KEY=VALUE; e.g. :conf max_new_tokens=64")
            changed.update(key.strip(), value.strip())
        self.settings = changed
        return "  ".join(f"{k}={v}" for k, v in vars(self.settings).items())

    def reset_settings(self, args: list[str]) -> str:
        self.settings = dataclasses.replace(self.initial_settings)
        return self.configure([])

    def reply(self, text: str, show: Callable[[str], None]) -> str:
        """Answer `text`, passing each piece to `show` as it comes; Ctrl-C keeps what came so far."""
        messages = self.history + [{"role": "user", "content": text}]
        # with_image_markers marks the last message it is given: here, the first user message.
        messages = self.system + with_image_markers(messages[:1], len(self.images)) + messages[1:]
        settings = ReplySettings.of(self.settings, self.processor)
        answer = ""
        try:
            for piece in stream_reply(self.model, self.processor, messages, self.images, settings):
                answer += piece
                show(piece)
        except KeyboardInterrupt:
            settings.watch.cancel()  # generate() stops at its next token
            show(" [stopped]")
        self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": answer.strip()}]
        return answer


def interactive(model, processor, settings: GenerationSettings, images: list, image_paths: list[str],
                system: str | None = None) -> None:
    """The read-eval-print loop; returns on :exit, :q or end of input."""
    try:
        import readline  # noqa: F401 -- line editing and up-arrow history for input()
    except ImportError:
        pass
    session = ChatSession(model, processor, settings, images, image_paths, system)
    print(f"vlmkit chat with {len(images)} image(s); :help lists the commands, :exit leaves")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return
        if not line:
            continue
        try:
            if line.startswith(":"):
                shown = session.command(line)
                if shown is QUIT:
                    return
                print(shown, end="" if shown == CLEAR_SCREEN else "\n", flush=True)
                continue
            print("vlm> ", end="", flush=True)
            session.reply(line, lambda piece: print(printable(piece), end="", flush=True))
            print()
        except VlmkitError as err:  # a bad path, setting or prompt must not end the session
            print(f"error: {err}")
