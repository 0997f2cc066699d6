"""A LoRA run saved as adapters alone (`lora.save: adapter`) is a model folder like any other: `vlmkit chat`,
`serve`, `web` and `eval` load it (merged) and answer as the merged model does, greedy, word for word."""

from __future__ import annotations

import base64
import json

import pytest
from PIL import Image

openai = pytest.importorskip("openai", reason="the serve extra is not installed (pip install -e '.[serve]')")

from tests.finetune.helpers import make_config, run  # noqa: E402
from vlmkit.cli import main  # noqa: E402
from vlmkit.data.records import read_records  # noqa: E402
from vlmkit.eval.vqa import evaluate  # noqa: E402
from vlmkit.model.modeling import VLMForConditionalGeneration  # noqa: E402
from vlmkit.processing.images import open_image  # noqa: E402
from vlmkit.serve import api  # noqa: E402
from vlmkit.config import GenerationSettings  # noqa: E402
from vlmkit.serve.generation import stream_reply, with_image_markers  # noqa: E402
from vlmkit.serve.page_search import is_retriever  # noqa: E402
from vlmkit.serve.reply_control import ReplySettings  # noqa: E402
from vlmkit.train import lora  # noqa: E402

TOKENS = 12
COLOURS = {"red": (200, 30, 10), "green": (20, 180, 40), "blue": (30, 40, 210)}
QUESTIONS = ["What colour is the shape?", "How many objects are there?", "Describe the image."]


@pytest.fixture(scope="module")
def adapter_dir(model_dir, synth_dir, tmp_path_factory):
    """Adapters of a 3-step LoRA run on the serving tests' model, saved alone (the base named by its path).
    High rates, so that the adapters change the greedy answers and loading the base alone would show."""
    out = tmp_path_factory.mktemp("lora") / "adapters"
    run(make_config(synth_dir / "train.jsonl", out, ["lora.enabled=true", "lora.save=adapter", "train.max_steps=3",
                                                      "train.lr.lm=1e-2", "train.lr.projector=1e-2",
                                                      f"model.init_from={model_dir}"]))
    assert lora.is_adapter(out) and not (out / "config.json").exists()
    return out


@pytest.fixture(scope="module")
def merged(adapter_dir):
    """The reference: the adapters merged into their base by PEFT, loaded apart from any vlmkit command."""
    model, processor = lora.load(adapter_dir, merge=True)
    return model.eval(), processor


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    for name, colour in COLOURS.items():
        Image.new("RGB", (40, 30), colour).save(folder / f"{name}.png")
    return {name: folder / f"{name}.png" for name in COLOURS}


def greedy(loaded, question: str, image_path, reply_settings: bool = False) -> str:
    """The greedy answer of `loaded` = (model, processor); with `reply_settings` as the API and web page
    decode (never emitting <image>), else as `vlmkit chat` does."""
    model, processor = loaded
    settings = GenerationSettings(max_new_tokens=TOKENS)
    settings = ReplySettings.of(settings, processor) if reply_settings else settings
    messages = with_image_markers([{"role": "user", "content": question}], 1)
    return "".join(stream_reply(model, processor, messages, [open_image(image_path)], settings))


def data_url(path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def cases(images) -> list[tuple[str, object]]:
    return [(question, images[colour]) for question in QUESTIONS for colour in COLOURS]


def test_the_adapters_change_the_answers(adapter_dir, merged, loaded, images):
    """Without this, loading the base model alone would pass the tests below."""
    assert not is_retriever(adapter_dir)
    changed = [greedy(merged, *case) != greedy(loaded, *case) for case in cases(images)]
    assert sum(changed) >= len(changed) / 2, changed


def test_chat_answers_as_the_merged_model(adapter_dir, merged, images, capsys):
    for question, image in cases(images)[:4]:
        assert main(["chat", question, "--model", str(adapter_dir), "--image", str(image),
                     "--max-new-tokens", str(TOKENS)]) == 0
        assert capsys.readouterr().out == greedy(merged, question, image) + "\n"


def test_serve_answers_as_the_merged_model(adapter_dir, merged, images, monkeypatch):
    """`vlmkit serve` up to its server, which runs in the background here while the openai client asks."""
    replies = {}

    def serve_briefly(app, host, port):
        with api.background_server(app, host) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
            assert [m.id for m in client.models.list().data] == [adapter_dir.name]
            for question, image in cases(images):
                content = [{"type": "image_url", "image_url": {"url": data_url(image)}},
                           {"type": "text", "text": question}]
                reply = client.chat.completions.create(model=adapter_dir.name, temperature=0, max_tokens=TOKENS,
                                                       messages=[{"role": "user", "content": content}])
                replies[question, image] = reply.choices[0].message.content

    monkeypatch.setattr(api, "run_server", serve_briefly)
    assert main(["serve", "--model", str(adapter_dir)]) == 0
    assert replies == {case: greedy(merged, *case, reply_settings=True) for case in cases(images)}


def test_web_loads_the_merged_model(adapter_dir, merged, images, monkeypatch):
    """`vlmkit web` up to launching: it builds the page on the merged model, which answers as the reference."""
    web = pytest.importorskip("vlmkit.serve.web", reason="the serve extra is not installed (pip install -e '.[serve]')")
    launched = {}

    def build_only(title, model=None, processor=None, search=None, **kwargs):
        launched.update(title=title, model=model, processor=processor, search=search, ui=web.build_ui(title, model,
                        processor, search))

    monkeypatch.setattr(web, "launch", build_only)
    assert main(["web", "--model", str(adapter_dir)]) == 0
    assert launched["title"] == adapter_dir.name and launched["search"] is None
    model, processor = launched["model"], launched["processor"]
    assert type(model) is VLMForConditionalGeneration and not model.training  # merged: no PEFT wrapper left
    for case in cases(images):
        assert greedy((model, processor), *case, reply_settings=True) == greedy(merged, *case, reply_settings=True)


def test_eval_scores_the_merged_model(adapter_dir, merged, synth_dir, tmp_path):
    output = tmp_path / "metrics.json"
    assert main(["eval", "--model", str(adapter_dir), "--data", str(synth_dir / "val.jsonl"), "--limit", "4",
                 "--output", str(output)]) == 0
    records = read_records(synth_dir / "val.jsonl")[0][:4]
    _, rows = evaluate(*merged, records, progress=False)
    written = output.with_suffix(".predictions.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in written] == rows
