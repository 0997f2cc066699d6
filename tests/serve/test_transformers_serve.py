"""A vlmkit model's LLaVA export under `transformers serve` answers an OpenAI-client image request
as `vlmkit serve` answers it: the field's own server runs vlmkit's models."""

from __future__ import annotations

import base64
import io
import shutil
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

openai = pytest.importorskip("openai", reason="the serve extra is not installed (pip install -e '.[serve]')")

from tests.serve.helpers import free_port, server_process  # noqa: E402
from vlmkit.export.llava import save_llava  # noqa: E402
from vlmkit.serve.api import background_server, create_app  # noqa: E402

TRANSFORMERS = shutil.which("transformers", path=str(Path(sys.executable).parent))


def image_url(colour: str) -> str:
    image = Image.new("RGB", (48, 40), "white")
    ImageDraw.Draw(image).ellipse((6, 6, 30, 34), fill=colour)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def ask(base_url: str, model: str, colour: str) -> str:
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0, timeout=120)
    content = [{"type": "image_url", "image_url": {"url": image_url(colour)}},
               {"type": "text", "text": "What colour is the circle?"}]
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                           temperature=0, max_tokens=8)
    return reply.choices[0].message.content


@pytest.mark.skipif(TRANSFORMERS is None, reason="transformers' command line is not installed beside this Python")
def test_the_llava_export_under_transformers_serve_answers_as_vlmkit_serve(loaded, tmp_path):
    model, processor = loaded
    export = save_llava(model, processor, tmp_path / "llava")
    port = free_port()
    url = f"http://localhost:{port}"
    with server_process([TRANSFORMERS, "serve", str(export), "--port", str(port)], f"{url}/v1/models"):
        theirs = [ask(url, str(export), colour) for colour in ("red", "blue", "green")]
    with background_server(create_app(model, processor, "tiny")) as ours_url:
        ours = [ask(ours_url, "tiny", colour) for colour in ("red", "blue", "green")]
    assert theirs == ours
    assert len(set(ours)) > 1  # the pictures change the answers, so the images reached both models
