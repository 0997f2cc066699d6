"""Images whose every chunk checksum is right but whose pixel data is garbage: PIL's verify() passes
them, only decoding fails. Preparing the dataset decodes each image once, so such a record is a
DataError (file, line, id, image) before training starts, and skipped with skip_bad."""

import io
import json
import random
import struct
import zlib

import pytest
from PIL import Image

from tests.conftest import TEST_TEXT, TEST_VISION
from vlmkit.cli import main
from vlmkit.data.dataset import ConversationDataset
from vlmkit.errors import DataError

MAX_LENGTH = 200

# IDAT contents, each with a correct CRC: what a broken encoder or a bit flip before checksumming leaves.
BAD_PIXELS = {
    "random": bytes(random.Random(0).randrange(256) for _ in range(200)),  # not a zlib stream
    "short": zlib.compress(b"\0" * 50),  # a valid stream, far too few pixels
    "bad-filter": zlib.compress(bytes([9] + [0] * 96) * 32),  # PNG filter types stop at 4
}


def with_idat(png: bytes, data: bytes) -> bytes:
    """`png` with its pixel data (the IDAT chunks) replaced by `data`, every chunk's CRC recomputed."""
    out, pos, replaced = bytearray(png[:8]), 8, False
    while pos < len(png):
        (length,) = struct.unpack(">I", png[pos : pos + 4])
        kind, body = png[pos + 4 : pos + 8], png[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IDAT":
            if replaced:
                continue
            body, replaced = data, True
        out += struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return bytes(out)


def corrupt_png(tmp_path, case: str):
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(buffer, "PNG")
    path = tmp_path / f"{case}.png"
    path.write_bytes(with_idat(buffer.getvalue(), BAD_PIXELS[case]))
    Image.open(path).verify()  # the premise: the file's structure and checksums are sound
    return path


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize("case", BAD_PIXELS)
def test_found_while_preparing_with_file_line_id_and_image(processor, good, tmp_path, case):
    image = corrupt_png(tmp_path, case)
    bad = {**good[1], "id": "bad", "images": [str(image)]}
    path = write_jsonl(tmp_path / "data.jsonl", [good[0], bad, good[2]])
    with pytest.raises(DataError) as err:
        ConversationDataset.from_jsonl(path, processor, max_length=MAX_LENGTH)  # before any item is fetched
    assert str(err.value).startswith(f"{path}:2 (id 'bad'): image {image}: image data is corrupt or truncated")

    dataset = ConversationDataset.from_jsonl(path, processor, max_length=MAX_LENGTH, skip_bad=True)
    assert [(e.line, e.record_id) for e in dataset.skipped] == [(2, "bad")]
    assert [e.record.id for e in dataset.examples] == [good[0]["id"], good[2]["id"]]
    assert all(dataset[i]["pixel_values"].shape[0] == 1 for i in range(len(dataset)))  # what is left loads


def test_cli_train_with_skip_bad_skips_it_and_finishes(good, tmp_path, capsys):
    image = corrupt_png(tmp_path, "random")
    records = [good[0], good[1], {**good[2], "id": "bad", "images": [str(image)]}, {**good[2], "id": "ok"}]
    path = write_jsonl(tmp_path / "train.jsonl", records)
    out = tmp_path / "model"
    args = ["train", "--train-data", str(path), "--output-dir", str(out), "--max-steps", "2", "--skip-bad",
            "--set", f"model.vision_config={json.dumps(TEST_VISION)}", f"model.text_config={json.dumps(TEST_TEXT)}",
            "model.vocab_size=400", "model.vision=null", "model.lm=null",  # all from scratch: seconds on a CPU
            "train.batch_size=3", "train.report_to=[]"]
    assert main(args) == 0
    assert f"the first: {path}:3 (id 'bad'): image {image}: image data is corrupt" in capsys.readouterr().out
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["skipped_records"] == 1 and summary["n_train"] == 3 and summary["steps"] == 2
