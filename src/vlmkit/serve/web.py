"""`vlmkit web`: a chat page for a model (Gradio), on http://127.0.0.1:7860 unless told otherwise.

A chat model gets a Chat tab; a retriever (or `--retriever`) with a page store gets a
Retrieval tab: type a query, see the top pages as thumbnails with their scores.

Images uploaded with a message belong to that message: their markers go at its start, as in
vlmkit's training data. The decoding panel maps one to one onto `GenerationSettings`. One
reply is generated at a time, whichever browser asked: sending and regenerating share one
slot of Gradio's queue. Replies are shown as plain text, never rendered as Markdown or HTML,
so a reply cannot make the browser load an outside address (a Markdown image would).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import gradio as gr

from vlmkit.config import GenerationSettings
from vlmkit.errors import ConfigError, VlmkitError
from vlmkit.processing.images import open_image
from vlmkit.serve.generation import stream_reply, with_image_markers
from vlmkit.serve.page_search import PageSearch
from vlmkit.serve.reply_control import ReplySettings

# System fonts only: the default theme would ask Google Fonts, which an offline machine cannot reach.
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


@dataclass
class Conversation:
    """One browser session's conversation: vlmkit messages (with image markers) and their images, in order."""

    messages: list[dict] = field(default_factory=list)
    images: list = field(default_factory=list)


def settings_of(decoding: str, temperature, top_p, top_k, max_new_tokens, repetition_penalty, seed: str):
    """GenerationSettings from the decoding panel (raises ConfigError for a bad value)."""
    settings = GenerationSettings(
        max_new_tokens=int(max_new_tokens), do_sample=decoding == "sampling", temperature=float(temperature),
        top_p=float(top_p), top_k=int(top_k), repetition_penalty=float(repetition_penalty),
    )
    settings.update("seed", seed.strip() or "none")  # checks the others too
    return settings


def chat_tab(model, processor) -> None:
    """The Chat tab (conversation, message box with image upload, regenerate, clear, decoding panel)."""
    defaults = GenerationSettings()

    def reply(chat: list, conversation: Conversation, messages: list, images: list, controls) -> Iterator:
        """Stream the answer to `messages` into the last chat bubble; on success, remember the turn."""
        settings = ReplySettings.of(settings_of(*controls), processor)
        answer = ""
        for piece in stream_reply(model, processor, messages, images, settings):
            answer += piece
            chat[-1]["content"] = answer
            yield chat, conversation
        done = Conversation(messages + [{"role": "assistant", "content": answer.strip()}], images)
        yield chat, done

    def send(message: dict, chat: list, conversation: Conversation, *controls):
        text, paths = (message or {}).get("text", "").strip(), (message or {}).get("files", [])
        if not text and not paths:
            yield chat, conversation, gr.update()
            return
        try:
            new_images = [open_image(path) for path in paths]
            turn = {"role": "user", "content": text}
            messages = conversation.messages + with_image_markers([turn], len(new_images))
            shown = chat + [{"role": "user", "content": {"path": p}} for p in paths]
            shown += [{"role": "user", "content": text}, {"role": "assistant", "content": ""}]
            for chat_now, conversation_now in reply(shown, conversation, messages, conversation.images + new_images,
                                                    controls):
                yield chat_now, conversation_now, None
        except VlmkitError as err:  # unreadable image, bad setting, marker typed as text: keep the session
            gr.Warning(str(err))
            yield chat, conversation, message

    def regenerate(chat: list, conversation: Conversation, *controls):
        if not conversation.messages:
            gr.Info("nothing to regenerate yet")
            yield chat, conversation
            return
        messages = conversation.messages[:-1]  # drop the last answer, keep its question
        shown = chat[:-1] + [{"role": "assistant", "content": ""}]
        try:
            yield from reply(shown, conversation, messages, conversation.images, controls)
        except VlmkitError as err:
            gr.Warning(str(err))
            yield chat, conversation

    conversation = gr.State(Conversation())
    with gr.Tab("Chat"):
        with gr.Row():
            with gr.Column(scale=3):
                chat = gr.Chatbot(elem_id="chat", height=600, render_markdown=False, show_label=False,
                                  feedback_options=None)
                box = gr.MultimodalTextbox(
                    elem_id="message", file_types=["image"], file_count="multiple", sources=["upload"],
                    show_label=False, placeholder="Ask about your images (attach them with the clip)",
                )
                with gr.Row():
                    again = gr.Button("Regenerate", elem_id="regenerate")
                    clear = gr.Button("Clear", elem_id="clear")
            with gr.Column(scale=1, min_width=240):
                controls = [
                    gr.Radio(["greedy", "sampling"], value="sampling" if defaults.do_sample else "greedy",
                             label="Decoding", elem_id="decoding"),
                    gr.Slider(0.05, 2.0, value=defaults.temperature, step=0.05, label="Temperature"),
                    gr.Slider(0.05, 1.0, value=defaults.top_p, step=0.05, label="Top-p"),
                    gr.Slider(0, 200, value=defaults.top_k, step=1, label="Top-k (0: off)"),
                    gr.Slider(1, 1024, value=defaults.max_new_tokens, step=1, label="Max new tokens",
                              elem_id="max-new-tokens"),
                    gr.Slider(0.5, 2.0, value=defaults.repetition_penalty, step=0.05, label="Repetition penalty"),
                    gr.Textbox(value="", label="Seed (empty: none)", elem_id="seed"),
                ]
    box.submit(send, [box, chat, conversation, *controls], [chat, conversation, box], concurrency_id="generate")
    again.click(regenerate, [chat, conversation, *controls], [chat, conversation], concurrency_id="generate")
    clear.click(lambda: ([], Conversation(), None), None, [chat, conversation, box], queue=False)
    chat.clear(lambda: Conversation(), None, conversation, queue=False)  # the chat's own bin icon


def retrieval_tab(search: PageSearch) -> None:
    """The Retrieval tab: a query, and the top pages as thumbnails captioned with score and page id."""

    def find(query: str, k: float):
        try:
            hits = search.top(query, int(k))
        except VlmkitError as err:
            gr.Warning(str(err))
            return gr.update()
        return [(hit.image, f"{hit.score:.4f} · {hit.doc_id}") for hit in hits]

    with gr.Tab("Retrieval"):
        with gr.Row():
            query = gr.Textbox(label="Query", elem_id="query", scale=4, placeholder="Describe the page you want")
            k = gr.Slider(1, 20, value=5, step=1, label="Pages", scale=1)
        pages = gr.Gallery(elem_id="pages", label="Top pages (score · page id)", columns=5, height=420, format="png")
    query.submit(find, [query, k], pages, concurrency_id="search")


def build_ui(title: str, model=None, processor=None, search: PageSearch | None = None) -> gr.Blocks:
    """The page: a Chat tab for a chat model, a Retrieval tab when there is a page search."""
    # Uploaded images stay on disk only for an hour (checked hourly).
    with gr.Blocks(title=f"vlmkit · {title}", analytics_enabled=False, delete_cache=(3600, 3600)) as ui:
        gr.Markdown(f"### vlmkit · {title}")
        if model is not None:
            chat_tab(model, processor)
        if search is not None:
            retrieval_tab(search)
    ui.queue(default_concurrency_limit=1)
    return ui


def read_logins(path: str | Path) -> list[tuple[str, str]]:
    """`USER:PASSWORD` per line (blank lines and `#` comments ignored), for Gradio's login page.

    A file, not a flag: a password on the command line shows in `ps` and the shell's history."""
    logins = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"--auth-file {path}: cannot read it ({err})") from None
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, colon, password = line.partition(":")
        if not colon or not user or not password:
            raise ConfigError(f"--auth-file {path}, line {number}: expected USER:PASSWORD")
        logins.append((user, password))
    if not logins:
        raise ConfigError(f"--auth-file {path} holds no USER:PASSWORD line")
    return logins


def launch(title: str, model=None, processor=None, search: PageSearch | None = None, host: str = "127.0.0.1",
           port: int = 7860, block: bool = True, logins: list[tuple[str, str]] | None = None):
    """Serve the page (until interrupted, or in the background with `block=False`); returns (ui, url).
    With `logins`, Gradio asks for one of those user names and passwords first."""
    ui = build_ui(title, model, processor, search)
    ui.launch(server_name=host, server_port=port, prevent_thread_lock=not block, theme=THEME, footer_links=[],
              show_error=True, quiet=not block, max_file_size="32mb", auth=logins or None)
    return ui, ui.local_url
