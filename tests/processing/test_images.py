"""`open_image` against hostile and unlucky files: only an allow-list of formats is decoded (EPS
would run Ghostscript), and an extreme aspect ratio is refused from the header, before padding to
a square could ask for gigabytes. Every refusal is a DataError naming the image.
"""

from __future__ import annotations

import io
import json
import os
import subprocess

import pytest
import torch
from PIL import Image

from tests.conftest import tiny_model_config
from tests.processing.helpers import EPS  # a complete EPS file: PIL opens it, decoding it would run Ghostscript
from vlmkit.data.dataset import ConversationDataset
from vlmkit.errors import DataError
from vlmkit.processing.images import ALLOWED_FORMATS, MAX_ASPECT_RATIO, open_image

def encoded(image_format: str, size=(16, 12)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 10)).save(buffer, image_format)
    return buffer.getvalue()


@pytest.fixture
def no_child_process(monkeypatch):
    """Every program started while the test runs, refused and recorded (an empty list: none was)."""
    started = []

    def refuse(args, *rest, **kwargs):
        started.append(args)
        raise OSError(f"the test refuses to start {args!r}")

    monkeypatch.setattr(subprocess, "Popen", refuse)
    return started


@pytest.mark.parametrize("image_format", ALLOWED_FORMATS)
def test_each_allowed_format_decodes(image_format):
    image = open_image(encoded(image_format))
    assert image.size == (16, 12) and image.mode == "RGB"


@pytest.mark.parametrize("decode", [True, False])
def test_an_eps_file_is_refused_without_running_ghostscript(no_child_process, tmp_path, decode):
    path = tmp_path / "picture.png"  # the name says PNG; the bytes decide
    path.write_bytes(EPS)
    for source, name in ((EPS, "image bytes"), (path, str(path))):
        with pytest.raises(DataError) as err:
            open_image(source, decode=decode)
        assert no_child_process == []
        assert err.value.path == name
        assert "not a readable image" in err.value.problem and "PNG, JPEG" in err.value.problem


@pytest.mark.parametrize("image_format", ["PPM", "PCX", "SGI", "IM", "DDS", "QOI"])
def test_formats_outside_the_allow_list_are_refused(image_format):
    raw = encoded(image_format)
    assert Image.open(io.BytesIO(raw)).format == image_format  # PIL itself would decode it
    with pytest.raises(DataError, match="not a readable image"):
        open_image(raw)


def aspect_png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (width, height)).save(buffer, "PNG")
    return buffer.getvalue()


def test_an_extreme_aspect_ratio_is_refused_from_the_header(tmp_path):
    path = tmp_path / "needle.png"
    path.write_bytes(aspect_png(4, 60_000))  # 240,000 pixels, a few KB: under every pixel limit
    assert path.stat().st_size < 5_000
    for decode in (True, False):
        with pytest.raises(DataError) as err:
            open_image(path, decode=decode)
        assert err.value.path == str(path)
        assert "4x60000" in err.value.problem and f"1:{MAX_ASPECT_RATIO}" in err.value.problem
    with pytest.raises(DataError, match=f"1:{MAX_ASPECT_RATIO}"):
        open_image(aspect_png(60_000, 4))  # lying down too
    assert open_image(aspect_png(4, 4 * MAX_ASPECT_RATIO)).size == (4, 4 * MAX_ASPECT_RATIO)  # the bound itself is fine


def test_skip_bad_skips_a_record_with_an_extreme_aspect_ratio(train_records, tmp_path):
    from vlmkit.model.build import build
    from vlmkit.train.run import _texts

    torch.manual_seed(0)
    processor = build(tiny_model_config(), training_texts=lambda: _texts(train_records)).processor
    needle = tmp_path / "needle.png"
    needle.write_bytes(aspect_png(4, 60_000))
    good = [r.to_json() for r in train_records if len(r.images) == 1][:2]
    lines = [good[0], {**good[1], "id": "needle", "images": [str(needle)]}]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))

    dataset = ConversationDataset.from_jsonl(path, processor, max_length=200, skip_bad=True)
    assert len(dataset) == 1 and [e.line for e in dataset.skipped] == [2]
    problem = str(dataset.skipped[0])
    assert problem.startswith(f"{path}:2 (id 'needle'): image {needle}: ") and f"1:{MAX_ASPECT_RATIO}" in problem
    with pytest.raises(DataError, match=f"id 'needle'.*1:{MAX_ASPECT_RATIO}"):
        ConversationDataset.from_jsonl(path, processor, max_length=200)


def test_a_long_strip_is_shrunk_before_it_is_padded_to_a_square(monkeypatch):
    from vlmkit.processing import image_processing

    strip = Image.new("RGB", (566, 28284), (200, 10, 10))  # 1:50, at 16 MP: a 800 MP square unshrunk
    small = Image.new("RGB", (20, 30))
    canvases = []
    real_new = Image.new
    monkeypatch.setattr(image_processing.Image, "new", lambda mode, size, *a: canvases.append(size) or real_new(mode, size, *a))
    processor = image_processing.VLMImageProcessor(size=32)
    assert processor.to_square(strip).size == (32, 32)
    assert canvases and max(max(size) for size in canvases) <= image_processing.PAD_LIMIT * 32
    canvases.clear()  # within the limit: padded as it is, pixel for pixel
    processor.to_square(small)
    assert canvases == [(30, 30)]


def test_a_fifo_or_folder_is_refused_at_once_not_read(tmp_path):
    fifo = tmp_path / "image.png"
    os.mkfifo(fifo)  # opening it for reading would wait for a writer forever
    for path in (fifo, tmp_path):
        with pytest.raises(DataError, match="not a regular file") as err:
            open_image(path)
        assert str(path) in str(err.value)
